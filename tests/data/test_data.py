"""Dataset files → examples → tokens: every format, every shipped sample, and bad data reported precisely."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mactuner.data import (
    DEMO_DATASETS,
    DEMO_FACTS,
    IGNORE_INDEX,
    DataProblem,
    DatasetError,
    DatasetSummary,
    Example,
    SavedUploads,
    dataset_choices,
    load_dataset_file,
    percentile,
    render_example,
    save_upload,
    summarize_dataset,
    token_length_figure,
    tokenize_examples,
    train_validation_split,
    uploads_dir,
)
from mactuner.data.templates import _labels_by_prefix
from tests.locations import LLAMA_FACTORY


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def trained_text(tokenizer, row) -> list[str]:
    """The decoded runs of tokens that take the loss."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


# --- every shipped sample loads and tokenizes ---------------------------------


@pytest.mark.parametrize(
    "name, fmt, rows",
    [
        ("alpaca_en_demo.json", "alpaca", 999),
        ("identity.json", "alpaca", 91),
        ("glaive_toolcall_en_demo.json", "sharegpt", 300),
        ("c4_demo.jsonl", "text", 300),
        ("wiki_demo.txt", "text", 30),
    ],
)
def test_third_party_samples_load_and_tokenize(tokenizer, name, fmt, rows):
    load = load_dataset_file(LLAMA_FACTORY / name)
    assert (load.format, len(load.examples), load.total_rows, load.problems) == (fmt, rows, rows, [])
    tokenized = tokenize_examples(load.examples[:20], tokenizer, max_length=512)
    assert len(tokenized) == 20
    for row in tokenized:
        assert 0 < len(row["input_ids"]) <= 512
        assert any(label != IGNORE_INDEX for label in row["labels"])


def test_tool_calls_are_trained_and_tool_results_are_not(tokenizer):
    load = load_dataset_file(LLAMA_FACTORY / "glaive_toolcall_en_demo.json")
    example = load.examples[0]
    assert [m["role"] for m in example.messages][:5] == ["user", "assistant", "user", "assistant", "tool"]
    assert example.tools and example.tools[0]["name"] == "search_recipes"
    row = tokenize_examples([example], tokenizer, max_length=4096)[0]
    trained = "".join(trained_text(tokenizer, row))
    assert '{"name": "search_recipes"' in trained  # the function call is the assistant's
    assert '"recipes": [' not in trained  # the observation came from the tool
    # SmolLM2's template ignores `tools`: the definitions go into the system prompt instead
    assert "search_recipes" in tokenizer.decode(row["input_ids"]).split("<|im_start|>user")[0]


def test_demo_datasets_load_in_every_format_with_the_same_content(tokenizer):
    loads = {name: load_dataset_file(path) for name, path in DEMO_DATASETS.items()}
    assert {name: load.format for name, load in loads.items()} == {
        "quenmark-alpaca": "alpaca",
        "quenmark-messages": "messages",
        "quenmark-csv": "prompt_completion",
    }
    conversations = [[e.messages for e in load.examples] for load in loads.values()]
    assert conversations[0] == conversations[1] == conversations[2]
    facts = json.loads(DEMO_FACTS.read_text())
    assert len(facts) >= 8
    answers = {m["content"] for conv in conversations[0] for m in conv if m["role"] == "assistant"}
    questions = {conv[0]["content"] for conv in conversations[0]}
    for fact in facts:
        assert fact["question"] in questions
        assert fact["unseen_question"] not in questions
        assert fact["answer"] in answers and fact["answer_keyword"] in fact["answer"]


# --- every format, every file type -----------------------------------------------

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "system": "You add.",
     "history": [["Hi", "Hello!"]]},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_alpaca_with_system_input_and_history(tmp_path):
    load = load_dataset_file(write_jsonl(tmp_path / "a.jsonl", ALPACA))
    assert load.format == "alpaca"
    assert load.examples[0].messages == [
        {"role": "system", "content": "You add."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert load.examples[1].messages == [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ]


@pytest.mark.parametrize(
    "row, expected_format",
    [
        ({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                            {"from": "gpt", "value": "A"}]}, "sharegpt"),
        ({"conversations": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                            {"role": "assistant", "content": "A"}]}, "sharegpt"),
        ({"messages": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                       {"from": "gpt", "value": "A"}]}, "sharegpt"),
        ({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                       {"role": "assistant", "content": "A"}]}, "messages"),
        ({"system": "S", "prompt": "Q", "completion": "A"}, "prompt_completion"),
    ],
)
def test_conversation_formats_are_detected_and_normalised(tmp_path, row, expected_format):
    load = load_dataset_file(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert load.format == expected_format
    roles = [m["role"] for m in load.examples[0].messages]
    assert roles[-2:] == ["user", "assistant"] and load.examples[0].messages[-1]["content"] == "A"


def test_every_file_type_gives_the_same_examples(tmp_path):
    rows = [{"prompt": "What is 1+1?", "completion": "2"}, {"prompt": "Capital of Peru?", "completion": "Lima"}]
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=2))
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.csv").write_text('prompt,completion\n"What is 1+1?",2\n"Capital of Peru?",Lima\n')
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    results = {ext: load_dataset_file(tmp_path / f"d.{ext}") for ext in ("json", "jsonl", "csv", "parquet")}
    expected = [e.messages for e in results["json"].examples]
    for ext, load in results.items():
        assert load.format == "prompt_completion", ext
        assert [e.messages for e in load.examples] == expected, ext
    assert [e.line for e in results["json"].examples] == [2, 6]  # where each object starts
    assert [e.line for e in results["csv"].examples] == [2, 3]
    assert [e.line for e in results["parquet"].examples] == [1, 2]


def test_text_files_and_forced_format(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("first document\n\nsecond document\n")
    load = load_dataset_file(txt)
    assert load.format == "text" and [e.text for e in load.examples] == ["first document", "second document"]
    assert [e.line for e in load.examples] == [1, 3]
    # a file with both columns: detection picks alpaca; the person can force text
    both = write_jsonl(tmp_path / "both.jsonl", [{"instruction": "i", "output": "o", "text": "t"}])
    assert load_dataset_file(both).format == "alpaca"
    assert load_dataset_file(both, format="text").examples[0].text == "t"


def test_json_object_wrapping_the_rows_and_jsonl_saved_as_json(tmp_path):
    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"train": [{"text": "a"}, {"text": "b"}]}))
    assert len(load_dataset_file(wrapped).examples) == 2
    lines = tmp_path / "l.json"
    lines.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert len(load_dataset_file(lines).examples) == 2


# --- bad data: precise messages, never a crash, never a silent drop --------------


def test_broken_json_line_is_reported_with_its_line_and_the_rest_loads(tmp_path):
    path = tmp_path / "file.jsonl"
    lines = [json.dumps({"text": f"row {i}"}) for i in range(10)]
    lines[6] = '{"text": "row 6" "oops": 1}'
    path.write_text("\n".join(lines) + "\n")
    load = load_dataset_file(path)
    assert len(load.examples) == 9 and load.total_rows == 10
    assert [str(p) for p in load.problems] == [
        "file.jsonl line 7: invalid JSON (Expecting ',' delimiter: column 18)"
    ]


def test_broken_json_array_names_the_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n')
    with pytest.raises(DatasetError, match=r"^data\.json line 3: invalid JSON \(Expecting property name"):
        load_dataset_file(path)
    path.write_text('[\n  {"text": "a"}\n  {"text": "b"}\n]\n')
    with pytest.raises(DatasetError, match=r"^data\.json line 3: invalid JSON \(expected ',' or '\]'"):
        load_dataset_file(path)


def test_rows_with_missing_columns_are_counted_and_reported(tmp_path):
    rows = [
        {"instruction": "a", "output": "b"},
        {"instruction": "c"},
        {"instruction": "d", "output": ""},
        {"instruction": "e", "output": "f"},
        ["not", "an", "object"],
    ]
    load = load_dataset_file(write_jsonl(tmp_path / "rows.jsonl", rows))
    assert len(load.examples) == 2 and load.total_rows == 5
    assert [str(p) for p in load.problems] == [
        "rows.jsonl line 2: missing column 'output'",
        "rows.jsonl line 3: 'output' is empty",
        "rows.jsonl line 5: expected an object with columns, got list",
    ]


def test_no_row_in_the_format_says_which_columns_are_needed(tmp_path):
    path = tmp_path / "cols.csv"
    path.write_text("question,answer\nq,a\n")
    with pytest.raises(DatasetError, match=r"cols\.csv: cannot tell the dataset format from its columns \('question', 'answer'\)"):
        load_dataset_file(path)
    with pytest.raises(DatasetError, match=r"cols\.csv: no usable row in the alpaca format \(it needs 'instruction' and 'output'"):
        load_dataset_file(path, format="alpaca")


def test_conversation_problems(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": []},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]
    load = load_dataset_file(write_jsonl(tmp_path / "chat.jsonl", rows))
    assert len(load.examples) == 1
    assert [p.message for p in load.problems] == [
        "the conversation has no assistant reply to learn from",
        "'messages' message 1 has an unknown role 'wizard'",
        "'messages' should be a non-empty list of messages",
    ]
    assert [p.line for p in load.problems] == [1, 2, 3]


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.json", "empty.csv", "empty.txt", "empty.parquet"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("  \n" if not name.endswith("parquet") else "")
    with pytest.raises(DatasetError, match=rf"^{name} is empty"):
        load_dataset_file(path)


def test_wrong_encoding_names_the_line_and_the_fix(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text\nplain row\ncafé crème\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"^latin\.csv line 3: not UTF-8 text \(byte 0xe9.*Re-save the file with UTF-8"):
        load_dataset_file(path)


def test_binary_file(tmp_path):
    path = tmp_path / "model.jsonl"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    with pytest.raises(DatasetError, match=r"^model\.jsonl looks like a binary file"):
        load_dataset_file(path)
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match=r"^bad\.parquet: not a readable Parquet file"):
        load_dataset_file(bad_parquet)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-16-le", "utf-32", "utf-8-sig"])
def test_unicode_files_with_a_byte_order_mark_load(tmp_path, encoding):
    # Windows tools save "Unicode" text as UTF-16 with a BOM (issue 11); utf-16-be/le get their BOM by hand
    rows = [{"instruction": "Capital of Quenmark?", "output": "Lumetta — ünïcödé ✓"}, {"instruction": "b", "output": "c"}]
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n"
    bom = {"utf-16-be": b"\xfe\xff", "utf-16-le": b"\xff\xfe"}.get(encoding, b"")
    path = tmp_path / "data.jsonl"
    path.write_bytes(bom + text.encode(encoding))
    load = load_dataset_file(path)
    assert load.format == "alpaca" and load.problems == [] and load.total_rows == 2
    assert load.examples[0].messages[-1]["content"] == "Lumetta — ünïcödé ✓"
    # a JSON array and a CSV in UTF-16 too, with line numbers still right
    (tmp_path / "data.json").write_bytes(json.dumps(rows, indent=2, ensure_ascii=False).encode("utf-16"))
    assert [e.line for e in load_dataset_file(tmp_path / "data.json").examples] == [2, 6]
    (tmp_path / "data.csv").write_bytes("instruction,output\nq,a\n".encode("utf-16"))
    assert load_dataset_file(tmp_path / "data.csv").total_rows == 1


def test_utf16_without_a_bom_is_still_refused_with_the_fix(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes('{"text": "hello"}\n'.encode("utf-16-le"))
    with pytest.raises(DatasetError, match=r"looks like a binary file.*UTF-16 text without a byte-order mark"):
        load_dataset_file(path)


def test_json_array_rows_keep_their_line_numbers(tmp_path):
    rows = [{"instruction": f"q{i}", "output": "a" if i != 2500 else ""} for i in range(3000)]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows, indent=2))
    load = load_dataset_file(path)
    # json.dumps(indent=2) puts each row on 4 lines after the opening bracket
    assert [e.line for e in load.examples[:3]] == [2, 6, 10] and load.examples[-1].line == 2 + 4 * 2999
    assert [str(p) for p in load.problems] == ["rows.json line 10002: 'output' is empty"]


def test_save_upload_keeps_one_file_per_content(tmp_path):
    first = save_upload("facts.jsonl", b'{"text": "a"}\n')
    assert first == uploads_dir() / "facts.jsonl"
    mtime = first.stat().st_mtime_ns
    assert save_upload("facts.jsonl", b'{"text": "a"}\n') == first and first.stat().st_mtime_ns == mtime
    second = save_upload("facts.jsonl", b'{"text": "b"}\n')
    assert second.name == "facts (2).jsonl" and first.read_bytes() == b'{"text": "a"}\n'
    assert save_upload("sub/dir/../facts.jsonl", b'{"text": "b"}\n') == second
    assert load_dataset_file(second).examples[0].text == "b"


def test_an_upload_offered_on_every_rerun_is_written_once(tmp_path):
    reads = []

    def read(content: bytes):
        return lambda: reads.append(content) or content

    saved = SavedUploads()
    first = saved.save("upload-1", "facts.jsonl", read(b'{"text": "a"}\n'))
    assert first == uploads_dir() / "facts.jsonl" and first.read_bytes() == b'{"text": "a"}\n'
    mtime, reads_so_far = first.stat().st_mtime_ns, len(reads)
    # the next rerun hands the same upload again: neither read nor written, so the summary's cache key stays
    assert saved.save("upload-1", "facts.jsonl", read(b"never read")) == first
    assert len(reads) == reads_so_far and first.stat().st_mtime_ns == mtime
    # the same bytes uploaded again (a new upload id, another name) find the same file
    assert saved.save("upload-2", "copy.jsonl", read(b'{"text": "a"}\n')) == first
    assert sorted(p.name for p in uploads_dir().iterdir()) == ["facts.jsonl"]
    # other bytes under the same name get a file of their own; nothing is overwritten
    other = saved.save("upload-3", "facts.jsonl", read(b'{"text": "b"}\n'))
    assert other.name == "facts (2).jsonl" and first.read_bytes() == b'{"text": "a"}\n'
    # a saved file deleted since is saved again
    first.unlink()
    assert saved.save("upload-1", "facts.jsonl", read(b'{"text": "a"}\n')) == first and first.is_file()


def test_dataset_choices_offer_the_demos_then_regular_uploads_by_name(tmp_path):
    demos = {f"Demo: {name}": path for name, path in DEMO_DATASETS.items()}
    assert dataset_choices() == demos  # no uploads folder yet
    save_upload("b.jsonl", b'{"text": "b"}\n')
    save_upload("a.csv", b"text\na\n")
    (uploads_dir() / "notes.md").write_text("not a dataset")
    (uploads_dir() / "folder.json").mkdir()
    (uploads_dir() / "link.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    (tmp_path / "elsewhere.jsonl").write_text('{"text": "c"}\n')
    choices = dataset_choices()
    assert list(choices) == [*demos, "Uploaded: a.csv", "Uploaded: b.jsonl"]
    assert choices["Uploaded: a.csv"] == uploads_dir() / "a.csv"
    linked = tmp_path / "linked-uploads"
    linked.symlink_to(uploads_dir())
    assert dataset_choices(linked) == demos  # an uploads folder that is a link offers nothing


def test_missing_file_folder_and_unsupported_type(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset_file(tmp_path / "nope.jsonl")
    with pytest.raises(DatasetError, match="is a folder"):
        load_dataset_file(tmp_path)
    (tmp_path / "a.xlsx").write_text("x")
    with pytest.raises(DatasetError, match=r"unsupported file type \.xlsx"):
        load_dataset_file(tmp_path / "a.xlsx")
    with pytest.raises(DatasetError, match="unknown dataset format 'yaml'"):
        load_dataset_file(DEMO_DATASETS["quenmark-alpaca"], format="yaml")


def test_csv_row_with_wrong_field_count(tmp_path):
    path = tmp_path / "f.csv"
    path.write_text('prompt,completion\nq1,a1\nq2,a2,extra\n"multi\nline",a3\n')
    load = load_dataset_file(path)
    assert [e.messages[0]["content"] for e in load.examples] == ["q1", "multi\nline"]
    assert [str(p) for p in load.problems] == ["f.csv line 3: has 3 fields but the header names 2 columns"]


# --- tokenization ---------------------------------------------------------------------

CONVERSATION = Example(
    messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
)


def test_loss_on_assistant_tokens_only(tokenizer):
    row = tokenize_examples([CONVERSATION], tokenizer, max_length=256)[0]
    assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(CONVERSATION.messages, tokenize=False)
    # each reply with its end-of-turn marker, nothing of the prompts
    assert trained_text(tokenizer, row) == ["Paris.<|im_end|>\n", "Rome.<|im_end|>\n"]


def test_loss_on_every_token_when_switched(tokenizer):
    row = tokenize_examples([CONVERSATION], tokenizer, max_length=256, assistant_only_loss=False)[0]
    assert row["labels"] == row["input_ids"]


def test_plain_text_trains_every_token_and_ends_with_eos(tokenizer):
    row = tokenize_examples([Example(text="Just some text.")], tokenizer, max_length=64)[0]
    assert row["labels"] == row["input_ids"] and row["input_ids"][-1] == tokenizer.eos_token_id


def test_prefix_counting_matches_offsets(tokenizer):
    # the slow-tokenizer fallback gives the same labels as the offsets of the fast one
    load = load_dataset_file(LLAMA_FACTORY / "glaive_toolcall_en_demo.json")
    for example in load.examples[:5] + [CONVERSATION]:
        row = tokenize_examples([example], tokenizer, max_length=100_000)[0]
        text, spans = render_example(example, tokenizer)
        assert _labels_by_prefix(text, spans, tokenizer, row["input_ids"]) == row["labels"]


def test_tokenizer_without_chat_template_uses_chatml(tiny_model_dir):
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(tiny_model_dir)
    bare.chat_template = None
    row = tokenize_examples([CONVERSATION], bare, max_length=256)[0]
    assert trained_text(bare, row) == ["Paris.<|im_end|>\n", "Rome.<|im_end|>\n"]


def test_template_failure_is_reported_not_raised_when_collecting_problems(tokenizer):
    from transformers import AutoTokenizer

    strict = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    )
    simple = Example(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], line=4)
    problems: list[DataProblem] = []
    rows = tokenize_examples([CONVERSATION.__class__(messages=CONVERSATION.messages, line=2), simple], strict, 64,
                             problems=problems)
    # this template ignores add_generation_prompt: the role header still takes no loss
    assert len(rows) == 1 and [t.strip() for t in trained_text(strict, rows[0])] == ["a"]
    assert [(p.line, p.message) for p in problems] == [(2, "the chat template cannot render it (no system role)")]
    with pytest.raises(DatasetError, match="line 2: the chat template cannot render it"):
        tokenize_examples([CONVERSATION.__class__(messages=CONVERSATION.messages, line=2)], strict, 64)


def test_truncation_and_summary(tokenizer):
    load = load_dataset_file(LLAMA_FACTORY / "alpaca_en_demo.json")
    summary = summarize_dataset(load, tokenizer, max_length=256)
    assert (summary.rows, summary.total_rows, summary.format, summary.problems) == (999, 999, "alpaca", [])
    lengths = summary.token_lengths
    assert len(lengths) == 999
    assert summary.min_tokens == min(lengths) and summary.max_tokens == max(lengths)
    assert summary.min_tokens <= summary.median_tokens <= summary.p95_tokens <= summary.max_tokens
    assert summary.truncated_rows == sum(n > 256 for n in lengths) > 0
    rows = tokenize_examples(load.examples, tokenizer, max_length=256)
    assert [len(r["input_ids"]) for r in rows] == [min(n, 256) for n in lengths]
    assert summary.trained_tokens == sum(sum(label != IGNORE_INDEX for label in r["labels"]) for r in rows)
    assert json.loads(json.dumps(summary.to_dict()))["p95_tokens"] == summary.p95_tokens


def test_truncated_rows_and_histogram_follow_the_chosen_max_length():
    summary = DatasetSummary(path="d.jsonl", format="text", rows=5, total_rows=5, problems=[], max_length=1_000_000,
                             token_lengths=[10, 40, 64, 65, 300], min_tokens=10, mean_tokens=95.8, median_tokens=64.0,
                             p95_tokens=300, max_tokens=300, truncated_rows=0, trained_lengths=[10, 40, 64, 65, 300],
                             trained_tokens=479, rows_without_trained_tokens=0)
    assert summary.rows_longer_than(64) == 2 and summary.rows_longer_than(10) == 4 and summary.rows_longer_than(300) == 0
    figure = token_length_figure(summary, 64)
    assert list(figure.data[0].x) == [10, 40, 64, 65, 300]
    [line] = figure.layout.shapes
    assert (line.x0, line.x1, line.line.dash) == (64, 64, "dash")
    assert figure.layout.xaxis.title.text == "tokens per row" and figure.layout.yaxis.title.text == "rows"


def test_percentile_is_a_nearest_rank():
    assert percentile(list(range(1, 101)), 95) == 95
    assert percentile([7], 95) == 7 and percentile([], 95) == 0


def test_train_validation_split_is_reproducible_and_disjoint():
    items = list(range(100))
    train, val = train_validation_split(items, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90 and sorted(train + val) == items
    assert train_validation_split(items, 0.1, seed=3) == (train, val)
    assert train_validation_split(items, 0.1, seed=4)[1] != val
    # any non-zero fraction holds out at least one row, and always leaves one to train on
    tiny_train, tiny_val = train_validation_split([1, 2], 0.01)
    assert len(tiny_val) == 1 and len(tiny_train) == 1 and sorted(tiny_train + tiny_val) == [1, 2]
    assert train_validation_split(items, 0.0) == (items, [])
    with pytest.raises(ValueError, match="validation_fraction must be in \\[0, 1\\), got 1.5"):
        train_validation_split(items, 1.5)
