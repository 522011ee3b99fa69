#!/usr/bin/env bash
# Downloads, here (where pip reaches PyPI), the wheels that the GPU machine lacks for
# benchmarks/gpu_check.sh, into .whl/ at the repository root (ignored through
# .git/info/exclude). The GPU machine has Python 3.12, torch, JAX (CUDA), flax, optax,
# orbax-checkpoint, accelerate, tokenizers, huggingface-hub, pandas, pyarrow, absl-py; it lacks
# the packages below. Pure-Python wheels, about 16 MB together (the device tool carries 64 MiB).
#
#   bash benchmarks/fetch_wheels.sh            # then carry ".whl" in the device call
#   WHEEL_DIR=/tmp/w bash benchmarks/fetch_wheels.sh   # elsewhere, no .git/info/exclude change
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEEL_DIR=${WHEEL_DIR:-.whl}
if [[ $WHEEL_DIR == .whl ]]; then
  mkdir -p .git/info
  grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
fi
mkdir -p "$WHEEL_DIR"
# Versions: the ones this project's CPU environment runs with (TRL 1.16.0 is the release the
# issue's reference figures were measured with). transformers is carried so that TRL runs with
# the version it was tested with here rather than the machine's older one; fsspec is pinned
# within datasets' bound (<=2026.9.0); dill and multiprocess are datasets' own; regex because
# transformers checks regex>=2025.10.22 at import.
WHEELS=(
  trl==1.16.0
  transformers==5.24.0
  datasets==5.2.0
  dill==0.4.1
  multiprocess==0.70.19
  fsspec==2026.9.0
  ml_collections==1.1.0
  tensorboardX==2.6.5
  regex==2026.11.19
)
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$WHEEL_DIR" "${WHEELS[@]}"
ls -la "$WHEEL_DIR"
du -sh "$WHEEL_DIR"
