"""What misled a new user in issue 21's walk-through, checked in AppTest: a reload reopens the last
conversation, a finished run opens in Chat, a reload lands on the running run, the final adapter and the
last checkpoint say they are the same weights, tables show no None, no snake_case and no 19-digit floats,
a finished run shows no "ETA –", the evaluation shows base and tuned answers side by side, the device
test reads in words, and MacTuner's own files are shown relative to its home."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil

from mactuner import evaluate, paths
from mactuner.runs.views import list_adapters
from tests.app.test_app_chat import ask, finished_run_with_adapter
from tests.app.test_app_finetune import copy_run, open_tab, progress_texts, trained_run  # noqa: F401 (a fixture)
from tests.app_pages import open_app_page


def test_a_reload_reopens_the_last_conversation_and_its_model_choice(varied_model_dir, tiny_adapter, mactuner_home):
    finished_run_with_adapter(mactuner_home, varied_model_dir, tiny_adapter)
    at = open_app_page("pages/chat.py")
    at.selectbox(key="chat_adapter").set_value("demo-run · final").run()
    at.toggle(key="chat_compare").set_value(True)
    ask(at, varied_model_dir, "Hello there")
    asked = at.session_state["chat_history"]
    assert set(asked[1]["answers"]) == {"base", "fine-tuned"}

    again = open_app_page("pages/chat.py")  # a reload: a new session, nothing picked yet
    assert again.text_input(key="chat_model").value == str(varied_model_dir)
    assert again.selectbox(key="chat_adapter").value == "demo-run · final"
    assert again.toggle(key="chat_compare").value is True
    assert again.session_state["chat_history"] == asked and [m.name for m in again.chat_message] == ["user", "assistant"]
    assert any("Reopened your last conversation (1 question" in c.value for c in again.caption)
    assert not again.warning  # no "set via the Session State API" warning from the restored pickers


def test_a_finished_run_opens_in_chat(varied_model_dir, tiny_adapter, mactuner_home):
    finished_run_with_adapter(mactuner_home, varied_model_dir, tiny_adapter)
    at = open_tab(open_app_page("pages/finetune.py"), "Runs")
    at.button(key="finetune_open_chat").click().run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Chat"
    assert at.selectbox(key="chat_adapter").value == "demo-run · final"
    assert at.selectbox(key="chat_exported").value == "(none)"


def test_a_reload_opens_fine_tune_on_the_running_run(trained_run):  # noqa: F811
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        running = copy_run(trained_run, "a-running", state="running", pid=sleeper.pid, step=2,
                           started_at=time.time(), message="Step 2/4")
        (running / "process.json").write_text(
            json.dumps({"pid": sleeper.pid, "create_time": psutil.Process(sleeper.pid).create_time()}))
        copy_run(trained_run, "b-finished")  # listed first (newest), but not the one training
        copy_run(trained_run, "c-finished")
        at = open_app_page("pages/finetune.py")
        assert at.session_state["finetune_tab"] == "Runs"
        assert at.selectbox(key="finetune_run").value == "a-running"
        [headline] = progress_texts(at)
        assert headline.startswith("running · step 2/4 · ETA")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_final_and_last_checkpoint_are_labelled_as_the_same_weights(trained_run):  # noqa: F811
    copy_run(trained_run, "done")
    labels = [choice.label for choice in list_adapters()]
    assert labels == ["done · final", "done · step 4 (same weights as final)", "done · step 2"]


def test_runs_tables_show_no_internals(trained_run):  # noqa: F811
    for run_id in ("a-first", "b-second"):
        path = copy_run(trained_run, run_id)
        # a loss as the trainer records it: all of a float's digits
        with (path / "metrics.jsonl").open("a") as metrics:
            metrics.write(json.dumps({"type": "train", "step": 4, "total_steps": 4, "loss": 1.7340123456789012,
                                      "time": time.time()}) + "\n")
    status = paths.runs_dir() / "b-second" / "status.json"
    status.write_text(json.dumps({**json.loads(status.read_text()), "started_at": None}))
    at = open_tab(open_app_page("pages/finetune.py"), "Runs")
    [headline] = progress_texts(at)
    assert headline == "finished · step 4/4"  # no "ETA –" on a finished run
    tables = [d.value for d in at.dataframe]
    for table in tables:
        assert not table.isna().any().any() and "None" not in table.astype(str).to_numpy().ravel().tolist()
    at.multiselect(key="finetune_compare").set_value(["a-first", "b-second"]).run()
    assert not at.exception, at.exception
    [compared] = [d.value for d in at.dataframe if list(d.value.columns) == ["a-first", "b-second"]]
    assert not [row for row in compared.index if "_" in row], list(compared.index)
    assert compared.loc["final loss"].tolist() == ["1.734", "1.734"]
    assert "None" not in compared.to_numpy().ravel().tolist()


def test_the_evaluation_shows_base_and_tuned_answers_side_by_side(trained_run):  # noqa: F811
    path = copy_run(trained_run, "evaluated")
    answers = [evaluate.AnswerRow(f"Question {i}: what is the capital of Quenmark?", "Londanna.",
                                  f"base answer {i} " * 20, f"tuned answer {i} " * 20, base_keyword=False,
                                  tuned_keyword=True) for i in range(3)]
    evaluate.save_eval(evaluate.EvalResult(str(path / "adapter"), "tiny", str(path / "data.json"), "validation rows",
                                           3, 2.0, 1.0, 7.4, 2.7, answers, short_references=True,
                                           base_keyword_hit=0.0, tuned_keyword_hit=1.0, device="cpu"), path)
    at = open_tab(open_app_page("pages/finetune.py"), "Runs")
    assert not at.exception, at.exception
    texts = [t.value for t in at.text]
    for row in answers:  # each answer in full, as wrapping text beside the other model's (no wide table)
        assert row.base_answer.strip() in texts and row.tuned_answer.strip() in texts
        assert texts.index(row.tuned_answer.strip()) == texts.index(row.base_answer.strip()) + 1
    assert not [d for d in at.dataframe if "tuned answer" in d.value.columns]
    assert any(c.value.startswith("3 validation rows of `$MACTUNER_HOME/runs/evaluated/data.json`") for c in at.caption)


def test_the_device_test_reads_in_words():
    at = open_app_page("pages/dashboard.py")
    at.button(key="health_test").click().run()
    assert not at.exception, at.exception
    [table] = [d.value for d in at.dataframe if "test" in d.value.columns]
    assert table["test"].tolist()[0] == "passed"
    assert not [c for c in table.columns if "_" in c or "gflops" in c.lower() or "speedup" in c.lower()]


def test_quantize_shows_mactuners_folders_relative_to_its_home(mactuner_home):
    at = open_app_page("pages/quantize.py")
    shown = " ".join(c.value for c in at.caption)
    assert "`$MACTUNER_HOME/exports`" in shown and str(mactuner_home) not in shown


def test_the_conversation_sits_under_the_pickers_in_a_box_of_its_own(varied_model_dir):
    """Issue 21: after scrolling up to change the adapter, the answer and Stop rendered below the fold. The
    conversation is now a box of fixed height (it follows the newest answer) right under the pickers, with
    Stop and New chat just above it; the page stays about one window high."""
    at = ask(open_app_page("pages/chat.py"), varied_model_dir, "Hello there")
    blocks = list(at.main.children.values())
    [box] = [b for b in blocks if b.type == "flex_container" and b.proto.id.endswith("chat_conversation")]
    assert box.proto.height_config.pixel_height == 520
    assert [m.name for m in box.get("chat_message")] == ["user", "assistant"]  # the answer is in the box
    controls = blocks[blocks.index(box) - 1]
    assert [b.key for b in controls.get("button")] == ["chat_new"]  # Stop's place (emptied once answered) and New chat


def test_recent_conversations_can_be_reopened(varied_model_dir, tiny_adapter, mactuner_home):
    from mactuner.chat.history import ChatChoice, ChatTurn

    run = mactuner_home / "runs" / "demo-run"
    finished_run_with_adapter(mactuner_home, varied_model_dir, tiny_adapter)
    for choice, question in ((ChatChoice(str(varied_model_dir)), "Base question?"),
                             (ChatChoice(str(varied_model_dir), str(run / "adapter")), "Tuned question?")):
        with ChatTurn(choice, question) as turn:
            turn.reply["answers"] = {choice.sides[0]: "An answer."}
        time.sleep(0.05)  # the second one is the latest
    at = open_app_page("pages/chat.py")
    assert at.selectbox(key="chat_adapter").value == "demo-run · final"  # the latest, reopened
    options = at.selectbox(key="chat_recent").options
    assert len(options) == 3 and options[1].startswith("demo-run · final on varied-llama")
    base = next(o for o in options if o.startswith("base model"))
    assert "1 question, the last: “Base question?”" in base
    at.selectbox(key="chat_recent").set_value(base).run()
    assert not at.exception, at.exception
    assert at.selectbox(key="chat_adapter").value == "(none)" and at.text_input(key="chat_model").value == str(varied_model_dir)
    assert [t.get("content") for t in at.session_state["chat_history"][::2]] == ["Base question?"]
