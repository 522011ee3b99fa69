#!/usr/bin/env bash
# One GPU session's check of issue 7's targets: dpo_jax.bench and TRL's DPOTrainer
# (benchmarks/trl_dpo.py) on the same model, pairs and batch, one run at a time, then the
# side-by-side table. See benchmarks/README.md for what each case measures.
#
# Through the device tool (from the repository root, after `bash benchmarks/fetch_wheels.sh`
# here):  command "bash benchmarks/gpu_check.sh", carry [".whl"], timeout_s 560.
# Elsewhere: bash benchmarks/gpu_check.sh   (OUT defaults to /tmp/gpu_check_out)
#
# Runs, in priority order (a run starts only if MIN_RUN seconds remain before DEADLINE; each
# has its own timeout, cut to what remains; a failed or timed-out run is recorded and the
# next one starts):
#   a_jax   Llama-3.2-1B shape, 4 pairs of 512 + 512, pure bf16, reference in the step
#   a_trl   the same through TRL (issue 7 quotes 18.4 pairs/s for it)
#   b_jax   HH-like length mix, 8 pairs per step, rows of 1024, packed
#   b_trl   the same pairs through TRL (padded to the longest row of the batch)
#   d_jax   Llama-3.1-8B shape, precomputed reference log-probs, bf16 weights and Adam,
#           8 rows of 1024 = 8192 tokens per micro-batch, full remat
#   q_jax   Llama-3.1-8B shape, QLoRA: rank-16 adapters on all 7 projections of a frozen
#           NF4 base (the reference = the base with adapters off), 4 pairs of 512 + 512,
#           full remat (issue 15; the CPU estimate is 10.9 GiB)
#   c_jax   "a" with fp32 master weights and fp32 Adam (bf16 compute): memory against a_jax
#   c_trl   "c" through TRL (--param_dtype float32: fp32 master and AdamW, bf16 autocast)
#   e_jax   "a" with remat dots_saveable (against a_jax's none)
#   f_jax   "b" with prefix sharing (each pair's prompt computed once; mask attention)
#   g_jax   "b" with cuDNN's packed segment layout (data.max_segments_per_row=16) instead of
#           the mask as a bias; benchmarks/gpu_attention_check.py checks its numbers first
#   b16_jax, b16_trl   "b" at 16 pairs per step (packing gains more with more pairs)
#
# Environment knobs:
#   RUNS           the runs above to do, in this order (default: all of them)
#   ATTENTION_CHECK  1 (default): run benchmarks/gpu_attention_check.py first (~1 min)
#   PRESET         model of the 1B runs (llama3_2_1b); BIG_PRESET the 8B one (llama3_1_8b).
#                  PRESET=tiny BIG_PRESET=tiny is a CPU dry run of this script.
#   STEPS, WARMUP  timed / untimed steps of every run (default 5 / 2)
#   DEADLINE       seconds after the start past which no run goes (default 530)
#   MIN_RUN        no run starts with fewer seconds than this left (default 60)
#   JAX_XLA_FLAGS  XLA_FLAGS of the dpo_jax runs (checked first; dropped if XLA rejects them)
#   MEM_FRACTION   XLA_PYTHON_CLIENT_MEM_FRACTION of the dpo_jax runs (default 0.94)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
RUNS=${RUNS:-a_jax a_trl b_jax b_trl d_jax q_jax c_jax c_trl e_jax f_jax g_jax b16_jax b16_trl}
PRESET=${PRESET:-llama3_2_1b}
BIG_PRESET=${BIG_PRESET:-llama3_1_8b}
STEPS=${STEPS:-5}
WARMUP=${WARMUP:-2}
DEADLINE=${DEADLINE:-530}
MIN_RUN=${MIN_RUN:-60}
JAX_XLA_FLAGS=${JAX_XLA_FLAGS---xla_gpu_enable_latency_hiding_scheduler=true}
MEM_FRACTION=${MEM_FRACTION:-0.94}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
LOG=$OUT/run.log
RESULTS=$OUT/results.jsonl
: >"$LOG"
: >"$RESULTS"

# Wheels for packages the GPU machine lacks (benchmarks/fetch_wheels.sh made them here).
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# An XLA flag this jaxlib does not know aborts every dpo_jax run: check them once (XLA parses
# them whatever the platform, so a CPU check is enough and takes seconds).
flags_note="XLA_FLAGS of the dpo_jax runs: ${JAX_XLA_FLAGS:-none}"
if [[ -n $JAX_XLA_FLAGS ]] && ! XLA_FLAGS="$JAX_XLA_FLAGS" JAX_PLATFORMS=cpu timeout 60 \
  $PY -c 'import jax; jax.numpy.zeros(1).block_until_ready()' >/dev/null 2>&1; then
  flags_note="XLA rejected '$JAX_XLA_FLAGS': the dpo_jax runs go without"
  JAX_XLA_FLAGS=""
fi

{
  echo "== $(date -u +%FT%TZ) runs=$RUNS preset=$PRESET big=$BIG_PRESET steps=$STEPS warmup=$WARMUP"
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
EOF
  echo "$flags_note"
  echo "XLA_PYTHON_CLIENT_MEM_FRACTION of the dpo_jax runs: $MEM_FRACTION"
} 2>&1 | tee "$OUT/env.txt"

ours() {  # preset overrides... -> a dpo_jax.bench command line
  local preset=$1
  shift
  echo "$PY -m dpo_jax.bench --config configs/bench.py:$preset" \
    "--config.bench.steps=$STEPS --config.bench.warmup_steps=$WARMUP${*:+ $*}"
}
trl() {  # flags... -> a benchmarks/trl_dpo.py command line
  echo "$PY benchmarks/trl_dpo.py --preset $PRESET --steps $STEPS --warmup_steps $WARMUP${*:+ $*}"
}
FP32="--config.model.param_dtype=float32 --config.training.optimizer_state_dtype=float32"

command_of() {  # run name -> command line (its flags are meant to split)
  case $1 in
    a_jax) ours "$PRESET" ;;
    a_trl) trl ;;
    b_jax) ours "$PRESET" --config.bench.lengths=hh --config.training.batch_size=8 \
      --config.data.packing=True ;;
    b_trl) trl --lengths hh --pairs_per_step 8 ;;
    c_jax) ours "$PRESET" "$FP32" ;;
    c_trl) trl --param_dtype float32 ;;
    d_jax) ours "$BIG_PRESET" --config.training.precompute_ref_log_probs=True \
      --config.model.remat_policy=full ;;
    q_jax) ours "$BIG_PRESET" --config.lora.rank=16 --config.lora.quantization=nf4 \
      --config.model.remat_policy=full ;;
    e_jax) ours "$PRESET" --config.model.remat_policy=dots_saveable ;;
    f_jax) ours "$PRESET" --config.bench.lengths=hh --config.training.batch_size=8 \
      --config.data.packing=True --config.data.prefix_sharing=True ;;
    b16_jax) ours "$PRESET" --config.bench.lengths=hh --config.training.batch_size=16 \
      --config.data.packing=True ;;
    b16_trl) trl --lengths hh --pairs_per_step 16 ;;
    g_jax) ours "$PRESET" --config.bench.lengths=hh --config.training.batch_size=8 \
      --config.data.packing=True --config.data.max_segments_per_row=16 ;;
    *) return 1 ;;
  esac
}
min_of() {  # run name -> the fewest seconds worth starting it with
  case $1 in
    d_jax | q_jax) echo 150 ;;  # the 8B runs: start-up, compile and steps
    *) echo "$MIN_RUN" ;;
  esac
}
timeout_of() {  # run name -> its own limit in seconds (start-up and compilation included)
  case $1 in
    d_jax | q_jax) echo 200 ;;
    *_jax) echo 150 ;;
    *) echo 120 ;;
  esac
}

record_failure() {  # name command error
  $PY -c 'import json, sys; print(json.dumps({"case": sys.argv[1], "command": sys.argv[2],
"error": sys.argv[3]}))' "$1" "$2" "$3" >>"$RESULTS"
}

run_one() {  # name
  local name=$1 cmd limit left started line rc output
  if ! cmd=$(command_of "$name"); then
    echo "== $name: unknown run" | tee -a "$LOG"
    return
  fi
  left=$((DEADLINE - SECONDS))
  if ((left < $(min_of "$name"))); then
    echo "== $name: skipped, ${left}s left before the ${DEADLINE}s deadline" | tee -a "$LOG"
    record_failure "$name" "$cmd" "skipped: ${left}s left"
    return
  fi
  limit=$(timeout_of "$name")
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s, at ${SECONDS}s): $cmd" | tee -a "$LOG"
  output=$(mktemp)
  started=$SECONDS
  if [[ $name == *_jax ]]; then
    # shellcheck disable=SC2086  # the command's flags are meant to split
    XLA_FLAGS="$JAX_XLA_FLAGS" XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION \
      timeout -k 10 "$limit" $cmd >"$output" 2>&1
  else
    # shellcheck disable=SC2086
    timeout -k 10 "$limit" $cmd >"$output" 2>&1
  fi
  rc=$?
  cat "$output" >>"$LOG"
  line=$(grep '^{' "$output" | tail -n 1)
  echo "== $name: exit $rc after $((SECONDS - started))s" | tee -a "$LOG"
  if [[ $rc -eq 0 && -n $line ]]; then
    $PY -c 'import json, sys; print(json.dumps({"case": sys.argv[1], "command": sys.argv[2],
"result": json.loads(sys.argv[3])}))' "$name" "$cmd" "$line" >>"$RESULTS"
    grep -o '"pairs_per_s": [0-9.]*\|"mfu": [0-9.]*\|"peak_memory_gb": [0-9.a-z]*' \
      <<<"$line" | tr '\n' ' '
    echo
  else
    local why="exit $rc"
    ((rc == 124 || rc == 137)) && why="timed out after ${limit}s"
    why="$why: $(grep -v '^\s*$' "$output" | tail -n 1 | cut -c1-300)"
    echo "== $name: no result ($why)" | tee -a "$LOG"
    record_failure "$name" "$cmd" "$why"
  fi
  rm -f "$output"
}

# First, the attention paths' numbers against XLA's (cuDNN lengths for padded rows, used by
# every padded run below; cuDNN packed segments for g_jax): PASS/FAIL lines and one JSON line,
# kept apart from results.jsonl (which compare.py reads).
if [[ ${ATTENTION_CHECK:-1} == 1 ]]; then
  echo "== attention check (limit 90s)" | tee -a "$LOG"
  XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION timeout -k 10 90 \
    $PY benchmarks/gpu_attention_check.py >"$OUT/attention_check.log" 2>&1
  echo "== attention check: exit $? after ${SECONDS}s" | tee -a "$LOG"
  grep -E 'PASS|FAIL|SKIP' "$OUT/attention_check.log" | tee -a "$LOG"
  grep '^{' "$OUT/attention_check.log" | tail -n 1 >"$OUT/attention_check.jsonl"
fi

for name in $RUNS; do
  run_one "$name"
done

echo
$PY benchmarks/compare.py "$RESULTS" | tee "$OUT/table.md"
echo "total ${SECONDS}s"
