#!/usr/bin/env bash
# One short GPU check: dpo_jax.bench and TRL's DPOTrainer (benchmarks/trl_dpo.py) on the same
# model, pairs and batch, on one GPU, then a side-by-side table. See benchmarks/README.md.
#
# Through the device tool (from the repository root, after `bash benchmarks/fetch_wheels.sh`
# here):  command "bash benchmarks/gpu_check.sh", carry [".whl"], timeout_s 540.
# Elsewhere: bash benchmarks/gpu_check.sh   (OUT defaults to /tmp/gpu_check_out)
#
# Environment knobs:
#   PRESET       model shape (llama3_2_1b; "tiny" for a CPU dry run of this script)
#   CASES        space-separated, run in this order, ours then TRL for each:
#                  fixed     4 pairs of exactly 512 prompt + 512 completion tokens
#                  hh8       HH-like length mix, 8 pairs per step, rows up to 1024
#                  hh16      the same with 16 pairs per step
#                  fixed_gc  "fixed" with gradient checkpointing (TRL) / full remat (ours)
#                (default "fixed hh8")
#   STEPS, WARMUP  timed / untimed steps of every run (default 10 / 3)
#   RUN_TIMEOUT  seconds for one run (default 170); BUDGET: no new run starts after this many
#                seconds of the script (default 360), so the whole stays under ~9 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
PRESET=${PRESET:-llama3_2_1b}
CASES=${CASES:-fixed hh8}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-3}
RUN_TIMEOUT=${RUN_TIMEOUT:-170}
BUDGET=${BUDGET:-360}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

# Wheels for packages the GPU machine lacks (benchmarks/fetch_wheels.sh made them here).
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

{
  echo "== $(date -u +%FT%TZ) preset=$PRESET cases=$CASES steps=$STEPS warmup=$WARMUP"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit \
    --format=csv 2>&1 || echo "no nvidia-smi"
  $PY - <<'EOF'
import importlib.metadata as md, platform
names = ["jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "torch",
         "transformers", "trl", "accelerate", "datasets", "tokenizers", "huggingface-hub",
         "pyarrow", "fsspec", "numpy", "ml-collections"]
print("python", platform.python_version())
found = []
for name in names:
    try:
        found.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        pass
print(", ".join(found))
import torch
print("torch.cuda", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))
EOF
} 2>&1 | tee "$OUT/env.txt"

ours_flags() {  # case -> dpo_jax.bench overrides
  case $1 in
    fixed) echo "" ;;
    hh8) echo "--config.bench.lengths=hh --config.training.batch_size=8" ;;
    hh16) echo "--config.bench.lengths=hh --config.training.batch_size=16" ;;
    fixed_gc) echo "--config.model.remat_policy=full" ;;
    *) echo "unknown case $1" >&2; return 1 ;;
  esac
}
trl_flags() {  # case -> benchmarks/trl_dpo.py flags
  case $1 in
    fixed) echo "" ;;
    hh8) echo "--lengths hh --pairs_per_step 8" ;;
    hh16) echo "--lengths hh --pairs_per_step 16" ;;
    fixed_gc) echo "--gradient_checkpointing" ;;
    *) echo "unknown case $1" >&2; return 1 ;;
  esac
}

run_one() {  # case trainer command...
  local case=$1 trainer=$2
  shift 2
  if ((SECONDS > BUDGET)); then
    echo "== $case / $trainer: skipped, ${SECONDS}s past the ${BUDGET}s budget" | tee -a "$OUT/run.log"
    return
  fi
  echo "== $case / $trainer: $*" | tee -a "$OUT/run.log"
  local started=$SECONDS line
  line=$(timeout "$RUN_TIMEOUT" "$@" 2>&1 | tee -a "$OUT/run.log" | grep '^{' | tail -n 1)
  echo "== $case / $trainer: $((SECONDS - started)) s" | tee -a "$OUT/run.log"
  if [[ -z $line ]]; then
    echo "== $case / $trainer: no JSON result (see run.log)" | tee -a "$OUT/run.log"
    return
  fi
  $PY -c 'import json, sys; print(json.dumps({"case": sys.argv[1], "command": sys.argv[2],
"result": json.loads(sys.argv[3])}))' "$case" "$*" "$line" >>"$OUT/results.jsonl"
}

: >"$OUT/results.jsonl"
for case in $CASES; do
  ours=$(ours_flags "$case") || exit 1
  theirs=$(trl_flags "$case") || exit 1
  # shellcheck disable=SC2086  # the flags are meant to split
  run_one "$case" dpo_jax $PY -m dpo_jax.bench --config "configs/bench.py:$PRESET" \
    --config.bench.steps="$STEPS" --config.bench.warmup_steps="$WARMUP" $ours
  # shellcheck disable=SC2086
  run_one "$case" trl $PY benchmarks/trl_dpo.py --preset "$PRESET" \
    --steps "$STEPS" --warmup_steps "$WARMUP" $theirs
done

echo
$PY benchmarks/compare.py "$OUT/results.jsonl" | tee "$OUT/table.md"
echo "total ${SECONDS}s"
