#!/usr/bin/env bash
# GPU check for a machine with NVIDIA GPUs, the whole script inside 10 minutes (BUDGET, default 570 s).
# Correctness first, so a short budget never starves it; speed after:
#   0. versions (pinned: bitsandbytes $BNB_VERSION) and devices: MacTuner vs nvidia-smi;
#   1. model folders in published shapes, random weights (bench/gpu_shapes.py), smallest first,
#      shapes.json rewritten after each one (a stopped build keeps what it built);
#   2. correctness (bench/gpu_correctness.py), each PASS/FAIL:
#      a. the trainer under torchrun --standalone (NCCL; 2 processes when 2 matching GPUs exist)
#         with a validation split, evaluation and checkpoints, then resumed to a later step;
#      b. QLoRA from a real .gguf file copied to its own path (converted from GGUF here);
#      c. a float16 run (loss scaling) whose step 2 is forced non-finite: skipped, then trains on;
#   3. per shape, LoRA and QLoRA: MacTuner vs the informed peer (transformers Trainer + peft, bfloat16,
#      length grouping; bench/train_throughput.py). Both sides: peak memory over all steps (counter reset
#      at train begin, allocated and reserved), step times taken after torch.cuda.synchronize();
#   4. a table with the ratios, and gpu_check.json.
#
# Usage, from the repository root:
#   bash bench/gpu_check.sh --prepare   # HERE, on the CPU machine: gathers what the GPU machine lacks into
#                                       #   .cache/gpu-check (SmolLM2's tokenizer + config, the alpaca rows,
#                                       #   a copy of the built-in .gguf; weights are built there, random)
#   bash bench/gpu_check.sh             # THERE: runs the checks; $OUT/gpu_check.{txt,json} if $OUT is set
#   bash bench/gpu_check.sh --dry-run   # on a CPU: the same steps with 2-layer shapes, gloo, the CPU's QLoRA
#                                       #   (int8 base), one step each: checks the plumbing (figures meaningless)
#
# Every step has a time limit and the whole check a budget: what does not fit is reported as skipped,
# never guessed. QLoRA needs bitsandbytes ($BNB_VERSION): from .whl/ if carried there, else the index.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
CHECK=.cache/gpu-check
BNB_VERSION=${BNB_VERSION:-0.50.2}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
if [ $DRY -eq 1 ]; then BUDGET=${BUDGET:-2400}; LIMIT=${LIMIT:-600}; else BUDGET=${BUDGET:-570}; LIMIT=${LIMIT:-120}; fi

if [ "${1:-}" = "--prepare" ]; then
    mkdir -p "$CHECK/tokenizer"
    "$PY" - <<'EOF'
import json, shutil
from pathlib import Path
from mactuner.models import _smollm2_gguf, default_model_path
src = default_model_path()
dst = Path(".cache/gpu-check/tokenizer")
for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    if (src / name).exists():
        shutil.copy(src / name, dst / name)
alpaca = Path("tests") / "data" / "third_party" / "llama-factory" / "alpaca_en_demo.json"
Path(".cache/gpu-check/alpaca_en_demo.json").write_text(json.dumps(json.loads(alpaca.read_text())[:400]))
# a real .gguf under a name of its own, so the GPU machine converts it from GGUF (no built-in mapping):
# a 2-layer SmolLM2-shaped model with SmolLM2's tokenizer, written by MacTuner's own GGUF export
# (a few MB: the built-in 98 MB file is over what the device tool carries); FULL_GGUF=1 copies that one
import os
from bench.gpu_shapes import build
from mactuner.export import export_gguf
out = Path(".cache/gpu-check")
if os.environ.get("FULL_GGUF") == "1":
    shutil.copy(_smollm2_gguf(), out / "copied-smollm2.Q4_1.gguf")
else:
    tiny = build("smollm2-135m", out / "gguf-source", dst, device="cpu", tiny=True)
    export_gguf(merged=tiny["path"], outtype="q8_0", out=out / "tiny-smollm2.q8_0.gguf", overwrite=True)
    shutil.rmtree(out / "gguf-source")
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
    DEVICE=cpu; TINY=--tiny; ROWS=16; STEPS=1; WARMUP=1; BIG_STEPS=1; GPUS=2
    SHAPES=${SHAPES:-smollm2-135m,qwen2.5-7b}  # a Llama and a Qwen2 (untied head) shape: enough to check the plumbing
    echo "== DRY RUN on the CPU: 2-layer versions of the shapes, gloo, 1 step; figures are meaningless"
else
    DEVICE=cuda; TINY=; ROWS=${ROWS:-128}; STEPS=${STEPS:-8}; WARMUP=${WARMUP:-2}; BIG_STEPS=${BIG_STEPS:-5}
    SHAPES=${SHAPES:-smollm2-135m,qwen2.5-0.5b,qwen2.5-1.5b,qwen2.5-7b}
fi

echo "== 0. versions and devices"
QLORA=1
if [ $DRY -eq 0 ] && ! "$PY" -c "import bitsandbytes" 2>/dev/null; then
    if ls .whl/bitsandbytes-*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/bitsandbytes-*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        timeout 60 "$PY" -m pip install -q "bitsandbytes==$BNB_VERSION" || true
    fi
fi
[ $DRY -eq 0 ] && ! "$PY" -c "import bitsandbytes" 2>/dev/null && { QLORA=0; echo "QLoRA (4-bit) skipped: bitsandbytes $BNB_VERSION could not be installed here"; }
"$PY" - <<'EOF'
import importlib.metadata as md, torch
names = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "torchao")
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "absent"
print("versions:", ", ".join(f"{n} {version(n)}" for n in names), f"| CUDA {torch.version.cuda}, arch list {torch.cuda.get_arch_list()}")
EOF
GPUS=${GPUS:-1}
if [ $DRY -eq 0 ]; then
    nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv,noheader,nounits || { echo "no nvidia-smi: not an NVIDIA machine"; exit 1; }
    "$PY" -m mactuner devices list --json > /tmp/mt-devices.json || echo "devices list failed"
    GPUS=$("$PY" - <<'EOF'
import json, subprocess
smi = [l.split(", ") for l in subprocess.check_output(
    ["nvidia-smi", "--query-gpu=index,name,memory.total,memory.used", "--format=csv,noheader,nounits"], text=True).strip().splitlines()]
cuda = [d for d in json.load(open("/tmp/mt-devices.json"))["devices"] if d["type"] == "cuda"]
ok = len(smi) == len(cuda)
for (index, name, total_mib, used_mib), d in zip(smi, cuda):
    smi_gb = float(total_mib) / 1024
    diff = abs((d["memory_total"] or 0) - smi_gb) / smi_gb
    ok &= diff < 0.03 and name in d["name"] and d["is_available"]
    print(f"  GPU {index}: nvidia-smi {name} {smi_gb:.1f} GB | MacTuner {d['name']} {d['memory_total']} GB "
          f"({diff:.1%} apart) available={d['is_available']} {d['reason'] or ''}", file=__import__('sys').stderr)
print("devices:", "MATCH" if ok else "MISMATCH", file=__import__('sys').stderr)
# two processes for the torchrun check when two matching GPUs exist
same = len(cuda) >= 2 and cuda[0]["name"].split(" (ID")[0] == cuda[1]["name"].split(" (ID")[0]
print(2 if same else 1)
EOF
)
fi

echo "== 1. model folders (random weights in published shapes; shapes.json after each)"
TOKENIZER=$CHECK/tokenizer
if [ ! -f "$TOKENIZER/tokenizer.json" ]; then
    TOKENIZER=$("$PY" -c "from mactuner.models import default_model_path; print(default_model_path())" 2>/dev/null) || {
        echo "neither the built-in model nor $CHECK/tokenizer: run 'bash bench/gpu_check.sh --prepare' on the CPU machine and carry $CHECK"; exit 1; }
fi
bounded 200 "$PY" -m bench.gpu_shapes "$CHECK/shapes" --shapes "$SHAPES" --tokenizer "$TOKENIZER" --device "$DEVICE" $TINY \
    --json "$OUTDIR/shapes.json" || echo "building the shapes stopped (kept: $(cat "$OUTDIR/shapes.json" 2>/dev/null | head -c 200))"
shape() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]]['path'])" "$OUTDIR/shapes.json" "$1" 2>/dev/null; }
DATA=$(pwd)/tests/data/third_party/llama-factory/alpaca_en_demo.json
[ -f "$CHECK/alpaca_en_demo.json" ] && DATA=$(pwd)/$CHECK/alpaca_en_demo.json

echo "== 2. correctness"
SMALL=$(shape smollm2-135m)
if [ -z "$SMALL" ]; then
    echo "FAIL torchrun, float16: no SmolLM2-shaped folder"
else
    bounded 150 "$PY" -m bench.gpu_correctness torchrun --model "$SMALL" --data "$DATA" --out "$OUTDIR" --device "$DEVICE" --gpus "$GPUS"
    bounded 90 "$PY" -m bench.gpu_correctness float16 --model "$SMALL" --data "$DATA" --out "$OUTDIR" --device "$DEVICE"
fi
GGUF=$(ls "$CHECK"/*.gguf 2>/dev/null | head -1)
[ -z "$GGUF" ] && GGUF=$("$PY" -c "from mactuner.models import _smollm2_gguf; p=_smollm2_gguf(); print(p if p.exists() else '')" 2>/dev/null)
if [ $QLORA -eq 0 ]; then
    echo "SKIP gguf: no bitsandbytes"
elif [ -z "$GGUF" ]; then
    echo "SKIP gguf: no .gguf here (run --prepare on the CPU machine and carry $CHECK)"
else
    bounded 150 "$PY" -m bench.gpu_correctness gguf --gguf "$GGUF" --data "$DATA" --out "$OUTDIR" --device "$DEVICE"
fi

echo "== 3. per shape: LoRA and QLoRA, MacTuner vs the informed peer (bf16, length grouping)"
for SHAPE in ${SHAPES//,/ }; do
    FOLDER=$(shape "$SHAPE") || true
    [ -z "$FOLDER" ] && { echo "$SHAPE: no model folder, skipped"; continue; }
    N=$STEPS; [ "$SHAPE" != smollm2-135m ] && N=$BIG_STEPS
    for METHOD in lora qlora; do
        [ $METHOD = qlora ] && { [ $QLORA -eq 0 ] || [ $DRY -eq 1 ]; } && continue
        echo "-- $SHAPE $METHOD"
        bounded "$LIMIT" "$PY" -m bench.train_throughput --device "$DEVICE" --model "$FOLDER" \
            --data "$DATA" --rows "$ROWS" --steps "$N" --warmup "$WARMUP" --method "$METHOD" --sides hf_informed,mactuner \
            || echo "$SHAPE $METHOD: failed or stopped (see above)"
    done
done

echo "== 4. summary"
"$PY" - "$OUTDIR" "$DRY" <<'EOF'
import json, sys
from pathlib import Path
out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
checks = [json.loads(p.read_text()) for p in sorted(out.glob("correctness-*.json"))]
for c in checks:
    print(f"{'PASS' if c['passed'] else 'FAIL'} {c['check']}: {c['summary']}")
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
                 "peer_reserved_bytes": peer.get("reserved_bytes"), "mactuner_reserved_bytes": ours.get("reserved_bytes"),
                 "mactuner_mfu_6n": ours["mfu_6n"], "peer_mfu_6n": peer["mfu_6n"], "file": path.name})
print(f"{'shape':22} {'method':6} {'peer tok/s':>10} {'MacTuner':>9} {'speed':>6} {'peer mem':>9} {'MacTuner':>9} {'memory':>7}  goal")
for r in runs:
    big = not r["shape"].startswith("smollm2")
    goal = (r["speed_ratio"] >= 1.3 and r["memory_ratio"] <= 0.7) if big else r["speed_ratio"] >= 1.0
    print(f"{r['shape']:22} {r['method']:6} {r['peer_tokens_per_second']:10.0f} {r['mactuner_tokens_per_second']:9.0f} "
          f"{r['speed_ratio']:5.2f}x {r['peer_memory_bytes'] / 2**30:8.2f}G {r['mactuner_memory_bytes'] / 2**30:8.2f}G "
          f"{r['memory_ratio']:6.2f}x  {'met' if goal else 'NOT met'}")
print("memory: peak allocated over all measured steps on both sides (reset at train begin); goal: >= 1.3x the peer's "
      "tokens/s at <= 0.7x its peak from 0.5B up; no slower at 135M" + (" (DRY RUN: meaningless figures)" if dry else ""))
from bench.machine import describe_machine
(out / "gpu_check.json").write_text(json.dumps({"dry_run": dry, "machine": describe_machine(), "correctness": checks,
                                                "runs": runs}, indent=2))
print("written:", out / "gpu_check.json")
EOF
echo "== done in $(( $(date +%s) - START )) s; report: $REPORT"
