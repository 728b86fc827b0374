#!/usr/bin/env bash
# The GPU device check: what the CPU-only test suite cannot show, in under 5 minutes on one CUDA GPU.
#
#   bash benchmarks/device_check.sh            # results in device_check_out/ (summary.txt, one log per section)
#   OUT=/tmp/dc bash benchmarks/device_check.sh
#
# Sections (each a separate process with its own time limit; a failure does not stop the others):
#   exactness  tiny Llama on CUDA: fp32 split vs separate autograd passes (<= 1e-5), bf16 weights and
#              bf16 autocast vs a float64 reference (<= 5e-2) and vs torch's own bf16 split (<= 1e-2)
#   trl-head   GradlensDPOTrainer on CUDA, fp32 and bf16: TRL's fused LM head runs its Triton kernel, and
#              the first recorded step checks gradlens's unfused head against it
#   lora       LoRA A/B and modules_to_save on Llama and GPT-2 vs separate autograd passes (<= 1e-5)
#   benchmark  benchmarks/recorder_overhead.py (owned by its own module; called through its CLI):
#              time and memory ratios of plain / recorder / naive DPO steps
#   trl-fsdp   GradlensDPOTrainer under `accelerate launch` with an FSDP2 config (1 process: the sharded
#              code path, world size 1). accelerate 1.15 cannot run FSDP on CPU, so this is its only test.
# Without a CUDA GPU it says so and exits 0: the CPU suite covers the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-device_check_out}
export PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export TOKENIZERS_PARALLELISM=false

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "device_check: no CUDA GPU visible to torch; GPU sections skipped (the CPU test suite covers the rest)"
    exit 0
fi

mkdir -p "$OUT"
: > "$OUT/summary.txt"
failures=0
start=$(date +%s)

section() {  # section NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo
    echo "== $name"
    local t0=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    grep -E '^\{"check"|ratio|median|peak|memory|machine|model:' "$OUT/$name.log"
    local verdict=PASS
    [ $rc -eq 0 ] || { verdict="FAIL (exit $rc$([ $rc -eq 124 ] && echo ', timed out'))"; failures=$((failures + 1)); tail -20 "$OUT/$name.log"; }
    echo "$name: $verdict in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/summary.txt"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
    "$PY" -c 'import torch, transformers, trl, peft, accelerate; print("torch", torch.__version__, "cuda", torch.version.cuda, "| transformers", transformers.__version__, "| trl", trl.__version__, "| peft", peft.__version__, "| accelerate", accelerate.__version__); print("gpu:", torch.cuda.get_device_name(0))'
} | tee "$OUT/environment.txt"

section exactness 90 "$PY" benchmarks/device_check.py exactness --device cuda
section trl-head 120 "$PY" benchmarks/device_check.py trl-head --device cuda
section lora 60 "$PY" benchmarks/device_check.py lora --device cuda

bench=(benchmarks/recorder_overhead.py --steps 10 --warmup 3)
if "$PY" benchmarks/recorder_overhead.py --help 2>/dev/null | grep -q -- '--device'; then
    bench+=(--device cuda)
else
    echo "note: recorder_overhead.py has no --device option: its numbers below are CPU numbers" | tee -a "$OUT/summary.txt"
fi
section benchmark 150 "$PY" "${bench[@]}"

cat > "$OUT/fsdp2.yaml" <<'EOF'
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 1
mixed_precision: 'no'
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
EOF
section trl-fsdp 120 "$PY" -m accelerate.commands.launch --config_file "$OUT/fsdp2.yaml" --main_process_port 29555 benchmarks/device_check.py trl-fsdp

echo
echo "device_check: $failures failed section(s) in $(( $(date +%s) - start )) s; logs in $OUT/" | tee -a "$OUT/summary.txt"
[ "$failures" -eq 0 ]
