"""The user docs say what the code does: README length, the architecture table, the example
config and the command-line reference are checked against the tree and the parser."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import yaml

from tests.locations import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
ARCHITECTURE = DOCS / "architecture.md"
CLI_DOC = DOCS / "cli.md"
EXAMPLE_CONFIG = ROOT / "configs" / "example.yaml"
README_MAX_LINES = 220
# the folders whose every Python file the architecture table must list
CODE_FOLDERS = ("mactuner", "ui", "pages")


# --- README ---------------------------------------------------------------------------------


def test_readme_is_at_most_220_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail into docs/")


def markdown_links(path: Path) -> list[str]:
    """Relative link targets of a Markdown file (images included), without #anchors."""
    targets = re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8"))
    return [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def test_every_relative_link_in_the_docs_points_at_a_file():
    pages = [README, *sorted(DOCS.glob("*.md"))]
    missing = [f"{page.relative_to(ROOT)} -> {target}"
               for page in pages for target in markdown_links(page)
               if not (page.parent / target).exists()]
    assert not missing, f"links to nothing: {missing}"


def test_the_old_notes_and_architecture_file_are_gone_and_nothing_points_at_them():
    assert not (ROOT / "docs" / "notes").exists()
    assert not (ROOT / "ARCHITECTURE.md").exists()
    stale = []
    for folder in (*CODE_FOLDERS, "tests", "bench", "docs", "configs"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".md", ".yaml", ".sh") and path.resolve() != Path(__file__).resolve():
                text = path.read_text(encoding="utf-8", errors="replace")
                if "docs/notes" in text or "ARCHITECTURE.md" in text:
                    stale.append(str(path.relative_to(ROOT)))
    for top in ("README.md", "app.py", "Makefile", "pyproject.toml"):
        text = (ROOT / top).read_text(encoding="utf-8")
        if "docs/notes" in text or "ARCHITECTURE.md" in text:
            stale.append(top)
    assert not stale, f"still pointing at docs/notes or ARCHITECTURE.md: {stale}"


# --- docs/architecture.md: one row per module ------------------------------------------------


def code_modules() -> set[str]:
    """Every Python file under mactuner/, ui/ and pages/, as a path from the repository root."""
    return {
        path.relative_to(ROOT).as_posix()
        for folder in CODE_FOLDERS
        for path in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in path.parts
    }


def table_modules(text: str) -> list[str]:
    """The paths in the first column of the "where does X live" tables: rows like | `mactuner/x.py` | … |."""
    section = text.split("## Where does X live", 1)
    assert len(section) == 2, "docs/architecture.md has no '## Where does X live' section"
    body = re.split(r"\n## ", section[1], maxsplit=1)[0]
    return re.findall(r"^\|\s*`([^`]+\.py)`\s*\|", body, flags=re.MULTILINE)


def test_architecture_table_lists_every_module_once_and_only_modules_that_exist():
    listed = table_modules(ARCHITECTURE.read_text(encoding="utf-8"))
    on_disk = code_modules()
    assert len(on_disk) > 50  # the glob found the code (a wrong ROOT would pass vacuously)
    twice = sorted({m for m in listed if listed.count(m) > 1})
    assert not twice, f"listed more than once in docs/architecture.md: {twice}"
    assert not sorted(on_disk - set(listed)), f"modules missing from docs/architecture.md: {sorted(on_disk - set(listed))}"
    assert not sorted(set(listed) - on_disk), f"docs/architecture.md lists modules that do not exist: {sorted(set(listed) - on_disk)}"


def test_the_table_parser_sees_a_missing_and_an_invented_module():
    text = ARCHITECTURE.read_text(encoding="utf-8")
    listed = table_modules(text)
    first = listed[0]
    dropped = re.sub(rf"^\|\s*`{re.escape(first)}`.*\n", "", text, count=1, flags=re.MULTILINE)
    assert first not in table_modules(dropped)
    invented = text.replace(f"| `{first}` |", "| `mactuner/nowhere.py` | x |\n| `" + first + "` |", 1)
    assert "mactuner/nowhere.py" in table_modules(invented)


# --- configs/example.yaml equals TrainConfig's defaults -------------------------------------


def test_example_config_holds_every_field_at_its_default():
    from mactuner.config import TrainConfig

    values = yaml.safe_load(EXAMPLE_CONFIG.read_text(encoding="utf-8"))
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert list(values) == fields, "example.yaml must list every TrainConfig field, in the dataclass's order"
    defaults = TrainConfig().to_dict()
    differ = {
        key: (value, defaults[key])
        for key, value in values.items()
        # the one field without a usable default: the example names the demo dataset
        if key != "dataset" and (value != defaults[key] or type(value) is str and type(defaults[key]) is not str)
    }
    assert not differ, f"example.yaml value vs TrainConfig default: {differ}"
    assert (ROOT / values["dataset"]).is_file()
    TrainConfig.load(EXAMPLE_CONFIG)  # and it loads as a config


# --- docs/cli.md: every command and flag exists, and every one is documented ----------------


def full_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The CLI's parser with every command loaded (the CLI itself loads only the one asked for)."""
    from mactuner import cli

    parser = argparse.ArgumentParser(prog="python -m mactuner")
    sub = parser.add_subparsers(dest="command")
    commands = {}
    for name in cli.COMMANDS:
        commands[name] = sub.add_parser(name)
        cli._load(name).add_arguments(commands[name])
    return parser, commands


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def positional_choices(parser: argparse.ArgumentParser) -> set[str]:
    return {c for a in parser._actions if not a.option_strings and a.choices and not isinstance(a.choices, dict)
            for c in a.choices}


def long_options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}


def documented_invocations(text: str) -> list[list[str]]:
    """The words after `python -m mactuner` on every line of the doc that runs it."""
    found = []
    for line in text.splitlines():
        for match in re.finditer(r"python -m mactuner((?:\s+[^\s`|#]+)*)", line):
            found.append(match.group(1).split())
    return found


def invocation_problems(words: list[str], commands: dict[str, argparse.ArgumentParser]) -> list[str]:
    if not words:
        return []
    name, rest = words[0], words[1:]
    if name.startswith("-") or name.isupper():  # `python -m mactuner --help`, `python -m mactuner COMMAND`
        return []
    if name not in commands:
        return [f"no command {name!r}"]
    parser = commands[name]
    problems = []
    actions = subcommands(parser)
    if actions and rest and not rest[0].startswith("-") and not rest[0].isupper():
        if rest[0] not in actions:
            return [f"{name}: no action {rest[0]!r}"]
        parser = actions[rest[0]]
    elif positional_choices(parser) and rest and not rest[0].startswith("-") and not rest[0].isupper():
        if rest[0] not in positional_choices(parser):
            problems.append(f"{name}: no action {rest[0]!r}")
    known = long_options(parser)
    for word in rest:
        flag = word.strip("[]").split("=")[0]
        if flag.startswith("--") and flag not in known:
            problems.append(f"{name}: no option {flag}")
    return problems


def test_every_command_in_cli_md_exists_in_the_parser():
    _, commands = full_parser()
    invocations = documented_invocations(CLI_DOC.read_text(encoding="utf-8"))
    assert len(invocations) >= len(commands)
    problems = [f"`python -m mactuner {' '.join(words)}`: {p}"
                for words in invocations for p in invocation_problems(words, commands)]
    assert not problems, "docs/cli.md names what the CLI does not have:\n" + "\n".join(problems)


def test_the_invocation_check_sees_an_invented_command_action_and_flag():
    _, commands = full_parser()
    assert invocation_problems(["teach", "x.yaml"], commands)
    assert invocation_problems(["rag", "forget", "wiki"], commands)
    assert invocation_problems(["devices", "reboot"], commands)
    assert invocation_problems(["train", "x.yaml", "--max-stepz", "3"], commands)
    assert not invocation_problems(["train", "x.yaml", "--max-steps", "3", "--no-packing"], commands)
    assert not invocation_problems(["rag", "ask", "wiki", "q", "--top-k", "3"], commands)


def cli_sections(text: str) -> dict[str, str]:
    """`## python -m mactuner NAME` sections of docs/cli.md (rag's `### rag ACTION` inside its own)."""
    parts = re.split(r"^## `python -m mactuner (\w[\w-]*)`", text, flags=re.MULTILINE)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def test_cli_md_documents_every_command_action_and_flag():
    _, commands = full_parser()
    sections = cli_sections(CLI_DOC.read_text(encoding="utf-8"))
    assert set(sections) == set(commands), f"sections {sorted(sections)} vs commands {sorted(commands)}"
    missing = []
    for name, parser in commands.items():
        body = sections[name]
        parsers = {name: parser, **{f"{name} {a}": p for a, p in subcommands(parser).items()}}
        for label, p in parsers.items():
            if label != name and f"`{label.split()[1]}`" not in body:
                missing.append(f"{label} (the action)")
            for option in long_options(p):
                if not re.search(rf"`[^`]*{re.escape(option)}\b", body):
                    missing.append(f"{label} {option}")
        for choice in positional_choices(parser):
            if f"`{choice}`" not in body:
                missing.append(f"{name} {choice} (the action)")
    assert not missing, "not documented in docs/cli.md: " + ", ".join(sorted(missing))


def stated_default_problems(parser: argparse.ArgumentParser, label: str) -> list[str]:
    """Options whose help says "(default X)" while the parser's default is something else."""
    problems = []
    for action in parser._actions:
        match = re.search(r"\(default:? ([^)]+)\)", action.help or "")
        if match and action.default not in (None, False, [], argparse.SUPPRESS):
            stated = match.group(1).strip()
            if stated != str(action.default):
                problems.append(f"{label} {action.option_strings or action.dest}: help says {stated!r}, "
                                f"default is {action.default!r}")
    return problems


def test_help_texts_state_the_real_defaults():
    _, commands = full_parser()
    problems = []
    for name, parser in commands.items():
        problems += stated_default_problems(parser, name)
        for action, sub_parser in subcommands(parser).items():
            problems += stated_default_problems(sub_parser, f"{name} {action}")
    assert not problems, "\n".join(problems)
    wrong = argparse.ArgumentParser()
    wrong.add_argument("--top-k", type=int, default=5, help="chunks retrieved (default 4)")
    assert stated_default_problems(wrong, "check")  # the check itself can fail
