"""The trainer on the tiny model: the loss falls, the run folder is written, out-of-memory
backs off, the final adapter is a plain PEFT adapter, and the real model learns facts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from mactuner.checkpoints import list_checkpoints
from mactuner.train import OutOfMemory, Trainer, TrainingCallback, TrainingError, is_out_of_memory, train
from tests.locations import ROOT
from tests.train_support import read_metrics, tiny_config, train_losses


class Recorder(TrainingCallback):
    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def on_train_begin(self, info):
        self.calls.append(("begin", info))

    def on_train_report(self, info):
        self.calls.append(("train", info))

    def on_eval_report(self, info):
        self.calls.append(("eval", info))

    def on_info(self, info):
        self.calls.append(("info", info))

    def on_checkpoint(self, info):
        self.calls.append(("checkpoint", info))

    def on_train_end(self, info):
        self.calls.append(("end", info))


def test_lora_loss_falls_and_the_run_folder_tells_the_story(tiny_model_dir, facts_file, tmp_path):
    run_dir = tmp_path / "run"
    recorder = Recorder()
    config = tiny_config(tiny_model_dir, facts_file, max_steps=16, eval_every=8, save_every=8)
    result = train(config, run_dir, callbacks=[recorder])

    assert result.state == "finished" and result.step == 16
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first - 1.0, result.losses

    records = read_metrics(run_dir)
    train_records = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in train_records] == list(range(1, 17))
    for r in train_records:
        assert set(r) >= {"step", "total_steps", "epoch", "loss", "lr", "grad_norm", "tokens_per_second", "tokens", "memory_bytes", "time"}
        assert r["total_steps"] == 16 and r["tokens_per_second"] > 0 and r["memory_bytes"] > 0
    assert [e["step"] for e in evals] == [8, 16] and evals[1]["val_loss"] < evals[0]["val_loss"]
    assert any(r["type"] == "info" for r in records)

    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 16 and status["total_steps"] == 16
    assert status["pid"] == os.getpid() and status["updated_at"] >= status["started_at"]
    assert [c.step for c in list_checkpoints(run_dir)] == [8, 16]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()

    # the callbacks saw the same story as the files
    kinds = [k for k, _ in recorder.calls]
    # start-up stages come first (info records), then begin, the steps, and end last
    assert recorder.calls[0][0] == "info" and recorder.calls[0][1]["stage"] == "loading"
    assert kinds.index("begin") < kinds.index("train") and kinds.count("begin") == 1
    assert kinds[-1] == "end" and kinds.count("train") == 16 and kinds.count("checkpoint") == 2
    assert [i for k, i in recorder.calls if k == "train"][-1]["loss"] == train_records[-1]["loss"]


def test_tokens_are_real_tokens_not_padding(tiny_model_dir, facts_file, tmp_path):
    from transformers import AutoTokenizer

    from mactuner.data import load_dataset_file, tokenize_examples

    config = tiny_config(tiny_model_dir, facts_file, val_fraction=0.0, max_steps=6, batch_size=24)
    run_dir = tmp_path / "run"
    train(config, run_dir)
    rows = tokenize_examples(load_dataset_file(facts_file).examples, AutoTokenizer.from_pretrained(tiny_model_dir), 64)
    # one step is the whole (24-row) dataset: its tokens are the rows' lengths, padding not counted
    last_step = [record for record in read_metrics(run_dir) if "tokens" in record][-1]  # info records follow it
    assert last_step["tokens"] == 6 * sum(len(r["input_ids"]) for r in rows)


def test_packing_trains_the_same_rows_without_padding(tiny_model_dir, facts_file, tmp_path):
    config = tiny_config(tiny_model_dir, facts_file, packing=True, max_length=128, batch_size=2, max_steps=10)
    result = train(config)
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3 - 1.0, result.losses


def test_packed_rows_do_not_see_each_other(tiny_model_dir, facts_file):
    """A packed sequence's loss equals the sum of its rows' losses computed one by one."""
    from mactuner.train import collate, make_units

    trainer = Trainer(tiny_config(tiny_model_dir, facts_file, dtype="float32", val_fraction=0.0))
    trainer.setup()
    rows = [{"input_ids": u.input_ids, "labels": u.labels} for u in trainer.train_units[:3]]
    packed = make_units(rows, packing=True, max_length=512, seed=0)
    assert len(packed) == 1
    with torch.no_grad():
        together = trainer._loss_sum(collate(packed, trainer.pad_id, trainer.device)).item()
        apart = sum(trainer._loss_sum(collate([u], trainer.pad_id, trainer.device)).item() for u in trainer.train_units[:3])
    assert together == pytest.approx(apart, rel=1e-5)


def _allocate_impossibly(layer, max_rows: int):
    """Make ``layer`` fail like the CPU allocator does when given more than ``max_rows`` rows."""
    original = layer.forward

    def forward(hidden_states, *args, **kwargs):
        if hidden_states.shape[0] > max_rows:
            # a real allocation failure: the CPU allocator's own RuntimeError
            torch.empty(1 << 62, dtype=torch.uint8)
        return original(hidden_states, *args, **kwargs)

    layer.forward = forward


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_math(tiny_model_dir, facts_file, tmp_path):
    config = tiny_config(tiny_model_dir, facts_file, dtype="float32", batch_size=8, max_steps=4, val_fraction=0.0)
    reference = train(config)

    run_dir = tmp_path / "run"
    trainer = Trainer(config, run_dir)
    trainer.setup()
    _allocate_impossibly(trainer.causal_lm.base_model.layers[0], max_rows=2)
    result = trainer.run()

    assert result.state == "finished" and result.micro_batch_size == 2
    infos = [r["message"] for r in read_metrics(run_dir) if r["type"] == "info"]
    assert any("micro-batch halved to 4" in m for m in infos) and any("micro-batch halved to 2" in m for m in infos)
    assert all("effective batch stays 8" in m for m in infos if "halved" in m)
    # same global batch, same normalisation: the same losses as the run that fitted
    assert result.losses == pytest.approx(reference.losses, abs=1e-5)


def test_out_of_memory_at_one_row_says_what_to_do(tiny_model_dir, facts_file, tmp_path):
    trainer = Trainer(tiny_config(tiny_model_dir, facts_file, batch_size=2, max_steps=2), tmp_path / "run")
    trainer.setup()
    _allocate_impossibly(trainer.causal_lm.base_model.layers[0], max_rows=0)
    with pytest.raises(OutOfMemory, match="even with a micro-batch of 1 row.*max_length.*gradient_checkpointing"):
        trainer.run()
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and "micro-batch of 1" in status["message"]


def test_out_of_memory_errors_are_recognised():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 8.00 GB)"))
    with pytest.raises(RuntimeError) as real:
        torch.empty(1 << 62, dtype=torch.uint8)
    assert is_out_of_memory(real.value)
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


@pytest.mark.parametrize("dtype", ["float32", "auto"])
def test_final_adapter_loads_with_plain_peft_and_gives_the_same_logits(tiny_model_dir, facts_file, tmp_path, dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    trainer = Trainer(tiny_config(tiny_model_dir, facts_file, max_steps=4, dtype=dtype), run_dir)
    result = trainer.run()
    input_ids = torch.tensor([trainer.train_units[0].input_ids])
    trainer.model.eval()
    with torch.no_grad():
        ours = trainer.model(input_ids=input_ids).logits.float()

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=trainer.compute_dtype)
    plain = PeftModel.from_pretrained(base, result.adapter_path).eval()
    with torch.no_grad():
        theirs = plain(input_ids=input_ids).logits.float()
    if trainer.compute_dtype == torch.float32:
        assert torch.equal(ours, theirs)
    else:
        # the saved adapter holds the float32 master weights, which plain peft computes with in
        # float32, while training computed the adapter in bfloat16: equal to bfloat16 precision
        assert (ours - theirs).abs().max() <= 0.02 * ours.abs().max()
        assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.9
    # and the adapter changed the model
    with torch.no_grad(), plain.disable_adapter():
        assert not torch.allclose(plain(input_ids=input_ids).logits.float(), theirs, atol=1e-2)


def test_full_fine_tuning_trains_every_weight(tiny_model_dir, facts_file, tmp_path):
    config = tiny_config(tiny_model_dir, facts_file, method="full", learning_rate=1e-2, max_steps=6, save_every=3)
    trainer = Trainer(config, tmp_path / "run")
    result = trainer.run()
    assert trainer.num_trainable == trainer.num_parameters
    assert result.losses[-1] < result.losses[0] - 1.0
    assert (tmp_path / "run" / "adapter" / "model.safetensors").is_file()
    # master weights stay float32 (bfloat16 compute through autocast where the CPU has it)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_target_modules_that_match_nothing_fail_clearly(tiny_model_dir, facts_file):
    with pytest.raises(TrainingError, match="LoRA cannot be applied.*attn_c"):
        train(tiny_config(tiny_model_dir, facts_file, target_modules=["attn_c"]))


def test_a_missing_or_broken_dataset_fails_clearly(tiny_model_dir, tmp_path):
    with pytest.raises(TrainingError, match="No dataset"):
        train(tiny_config(tiny_model_dir, ""))
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(b"\x00\x01binary")
    with pytest.raises(TrainingError, match="The dataset cannot be used: .*broken.jsonl"):
        train(tiny_config(tiny_model_dir, broken))


def test_cli_trains_and_sigterm_cancels_with_a_checkpoint(tiny_model_dir, facts_file, tmp_path):
    """The contract the background runs rely on: SIGTERM → checkpoint, state cancelled, exit 0."""
    config_file = tiny_config(tiny_model_dir, facts_file, max_steps=100000, log_every=1).save(tmp_path / "c.yaml")
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "mactuner", "train", str(config_file), "--run-dir", str(run_dir), "--quiet"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists() or not train_losses(run_dir):
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.5)
    process.terminate()
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "cancelled"
    saved = list_checkpoints(run_dir)
    assert saved and saved[-1].step == status["step"] >= 1

    # --resume continues from it to the (now smaller) end
    done = subprocess.run(
        [sys.executable, "-m", "mactuner", "train", "--run-dir", str(run_dir), "--resume", "--max-steps", str(status["step"] + 2), "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == saved[-1].step + 2
    assert (run_dir / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_smollm2_learns_the_demo_facts(smollm2_path, tmp_path):
    """The product's promise: a short LoRA run makes the default model state facts it did not know."""
    from mactuner.chat import GenerationSettings, load_chat_model, stream_chat
    from mactuner.config import TrainConfig
    from mactuner.data import DEMO_DATASETS, DEMO_FACTS
    from mactuner.models import load_model

    facts = json.loads(DEMO_FACTS.read_text())[:5]
    settings = GenerationSettings(max_new_tokens=24, temperature=0.0)

    def answers(loaded) -> list[str]:
        return ["".join(stream_chat(loaded, [{"role": "user", "content": f["question"]}], settings)) for f in facts]

    def stated(replies: list[str]) -> list[str]:
        return [f["answer_keyword"] for f, a in zip(facts, replies) if f["answer_keyword"].lower() in a.lower()]

    before = answers(load_model(device="cpu"))
    assert stated(before) == [], before

    config = TrainConfig(
        dataset=str(DEMO_DATASETS["quenmark-messages"]), device="cpu", max_steps=40, batch_size=8, learning_rate=2e-3,
        lora_rank=16, lora_alpha=32, warmup_steps=2, val_fraction=0.0, save_every=0, max_length=128,
    )
    result = train(config, tmp_path / "run")
    assert result.losses[-1] < result.losses[0] / 3, result.losses
    after = answers(load_chat_model(adapter=result.adapter_path, device="cpu"))
    assert stated(after) == [f["answer_keyword"] for f in facts], list(zip(before, after))


def test_progress_shows_stages_before_the_first_step(tiny_model_dir, facts_file, tmp_path):
    """Loading, tokenising and warming up are announced in status.json and metrics.jsonl, in order."""
    run_dir = tmp_path / "run"

    class StatusAtEachStage(TrainingCallback):
        def __init__(self):
            self.seen: list[tuple[str, str, str]] = []

        def on_info(self, info):
            if info.get("stage"):
                # the run folder's writer is called first: status.json already says it
                status = json.loads((run_dir / "status.json").read_text())
                self.seen.append((info["stage"], info["message"], status["message"]))

    watcher = StatusAtEachStage()
    train(tiny_config(tiny_model_dir, facts_file, max_steps=2), run_dir, callbacks=[watcher])

    # (and after the last step, the forgetting check's stage)
    assert [stage for stage, _, _ in watcher.seen] == ["loading", "tokenising", "warming_up", "checking"]
    assert all(message == status for _, message, status in watcher.seen)
    assert "Loading" in watcher.seen[0][1] and "Tokenising 24 rows" in watcher.seen[1][1]
    records = read_metrics(run_dir)
    stages = [i for i, r in enumerate(records) if r.get("stage")]
    first_step = next(i for i, r in enumerate(records) if r["type"] == "train")
    assert [records[i]["stage"] for i in stages] == ["loading", "tokenising", "warming_up", "checking"]
    assert stages[-2] < first_step < stages[-1]


def test_a_one_step_run_trains_at_a_positive_learning_rate(tiny_model_dir, facts_file, tmp_path):
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    # the defaults' warm-up ratio and cosine decay on a run of one step
    config = tiny_config(tiny_model_dir, facts_file, max_steps=1, warmup_steps=None, lr_scheduler="cosine", learning_rate=1e-3)
    result = train(config, run_dir)
    (record,) = [r for r in read_metrics(run_dir) if r["type"] == "train"]
    assert record["lr"] == pytest.approx(1e-3)
    # LoRA's B matrices start at zero: after the one step they are not
    weights = load_file(result.adapter_path / "adapter_model.safetensors")
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)


def test_peak_memory_is_reported_with_its_kind(tiny_model_dir, facts_file, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_config(tiny_model_dir, facts_file, max_steps=3), run_dir)
    records = [r for r in read_metrics(run_dir) if r["type"] == "train"]
    assert {r["memory_kind"] for r in records} == {"rss_sampled"}
    assert all(r["memory_bytes"] > 50 * 2**20 for r in records)  # the process's peak, torch and the model included


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float32_training_keeps_no_master_copy(tiny_model_dir, facts_file, dtype):
    trainer = Trainer(tiny_config(tiny_model_dir, facts_file, dtype=dtype, target_modules=["q_proj", "v_proj"]))
    trainer.setup()
    optimized = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert all(p.dtype == torch.float32 for p in optimized)
    if dtype == "float32":
        # AdamW updates the model's own weights: no second copy
        assert trainer.master is None and all(any(p is q for q in trainer.trainable) for p in optimized)
    else:
        assert trainer.master is not None and all(p.dtype == torch.bfloat16 for p in trainer.trainable)
        assert not any(p is q for p in optimized for q in trainer.trainable)


def test_the_host_waits_for_the_device_once_per_step_not_per_micro_batch(tiny_model_dir, facts_file, monkeypatch):
    """``.item()`` / ``.tolist()`` calls in a step do not grow with the number of micro-batches."""

    def reads_per_step(grad_accum: int) -> dict[str, int]:
        trainer = Trainer(
            tiny_config(tiny_model_dir, facts_file, batch_size=2, grad_accum=grad_accum, val_fraction=0.0, target_modules=["q_proj", "v_proj"])
        )
        trainer.setup()
        counts = {"item": 0, "tolist": 0}
        with monkeypatch.context() as patch:
            for name in counts:
                original = getattr(torch.Tensor, name)

                def counted(self, *args, _name=name, _original=original, **kwargs):
                    counts[_name] += 1
                    return _original(self, *args, **kwargs)

                patch.setattr(torch.Tensor, name, counted)
            trainer._train_step()
        return counts

    one, four = reads_per_step(1), reads_per_step(4)
    assert one == four and four["tolist"] == 1, (one, four)
