#!/usr/bin/env bash
# Starts N training processes on this machine, JAX's multi-controller runtime between them.
#
#   launch/local.sh N -- --config configs/tiny.py --workdir runs/x [--config.a.b=v ...]
#
# For tests and laptops: on CPU each process emulates DEVICES_PER_PROCESS devices (default 4)
# and the processes talk over gloo. On a GPU host, set CUDA_VISIBLE_DEVICES per process
# yourself or, better, run one process per host with all its GPUs (launch/slurm.sbatch).
# Ctrl-C or a SIGTERM stops all processes; re-running the same command resumes.
set -euo pipefail
if [[ $# -lt 2 || "$2" != "--" ]]; then
  echo "usage: $0 N -- <dpo_jax.train arguments>" >&2
  exit 2
fi
num_processes=$1
shift 2
port=${DPO_JAX_PORT:-$((20000 + RANDOM % 20000))}
python=${PYTHON:-python}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-4}"

pids=()
stop() { kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap stop INT TERM
for ((i = 0; i < num_processes; i++)); do
  "$python" -m dpo_jax.train "$@" --coordinator_address="localhost:$port" \
    --num_processes="$num_processes" --process_id="$i" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
