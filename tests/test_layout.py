"""The house rules of the code base: no import circles, no module importing a layer above its own,
``pages/`` holding exactly the pages the sidebar shows, and no private Streamlit API."""

from __future__ import annotations

import ast
import re

from tests.import_graph import cycles, graph, modules
from tests.locations import ROOT

# bottom first; a module may import its own layer and the ones below (docs/architecture.md draws the same)
LAYERS = [
    ("mactuner", "mactuner.paths", "mactuner.fileio", "mactuner.locks", "mactuner.safe_yaml", "mactuner.safe_text",
     "mactuner.file_checks"),
    ("mactuner.devices", "mactuner.settings"),
    ("mactuner.models", "mactuner.config", "mactuner.data", "mactuner.adapters", "mactuner.fingerprint",
     "mactuner.checkpoints", "mactuner.run_folder", "mactuner.quantize.kernels", "mactuner.quantize.methods", "mactuner.quantize"),
    ("mactuner.training", "mactuner.train", "mactuner.recommend"),
    ("mactuner.runs", "mactuner.chat", "mactuner.rag", "mactuner.export", "mactuner.evaluate",
     "mactuner.quantize.compare"),
    ("mactuner.commands", "mactuner.cli", "mactuner.__main__"),
]


def layer_of(module: str) -> int:
    """The layer of the longest matching prefix in ``LAYERS``."""
    best, best_len = None, -1
    for number, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = number, len(prefix)
    assert best is not None, f"{module} is in no layer of tests/test_layout.py: add it"
    return best


def test_there_are_no_import_circles():
    assert cycles(graph()) == []


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    return [f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
            for module, targets in edges.items() for target in targets if layer_of(target) > layer_of(module)]


def test_no_module_imports_a_layer_above_its_own():
    assert upward_imports(graph()) == []


def test_the_checks_catch_an_upward_import_and_a_circle():
    # the checks themselves can fail: a devices module importing the trainer, the chat engine importing
    # the variant comparison (which imports it back)
    assert upward_imports({"mactuner.devices.probe": {"mactuner.training.trainer"}}) != []
    assert upward_imports({"mactuner.chat.engine": {"mactuner.quantize.kernels"}}) == []
    circle = {"mactuner.chat.engine": {"mactuner.quantize.compare"}, "mactuner.quantize.compare": {"mactuner.chat.engine"}}
    assert cycles(circle) == [["mactuner.chat.engine", "mactuner.quantize.compare"]]


def test_every_module_is_in_a_layer():
    for module in modules():
        layer_of(module)


def registered_pages() -> set[str]:
    """The page files app.py hands to ``st.Page``."""
    tree = ast.parse((ROOT / "app.py").read_text())
    names = {node.targets[0].id: node.value.value for node in tree.body
             if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
             and isinstance(node.targets[0], ast.Name)}
    pages = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "Page" and node.args:
            arg = node.args[0]
            pages.add(arg.value if isinstance(arg, ast.Constant) else names[arg.id])
    return pages


def test_pages_holds_exactly_the_registered_pages():
    on_disk = {f"pages/{path.name}" for path in (ROOT / "pages").glob("*.py")}
    assert on_disk == registered_pages()


def test_no_private_streamlit_api():
    private = re.compile(r"_mpa_v1|PagesManager|streamlit\.runtime|from streamlit\.[a-z_.]*\b import _|st\._[a-z]")
    offenders = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
                 for folder in ("pages", "ui") for path in sorted((ROOT / folder).glob("*.py"))
                 for number, line in enumerate(path.read_text().splitlines(), 1) if private.search(line)]
    offenders += [f"app.py:{n}" for n, line in enumerate((ROOT / "app.py").read_text().splitlines(), 1) if private.search(line)]
    assert offenders == []
