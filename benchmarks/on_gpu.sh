#!/usr/bin/env bash
# On a lent GPU machine (device tool, carry [".whl"]): installs the wheels benchmarks/gpu_wheels.sh
# built into /tmp/site, then runs each argument as a shell command in turn, its output to the console
# and to $OUT/<n>.log (n = 1, 2, ...). One failing command does not stop the next.
# Usage: bash benchmarks/on_gpu.sh "python3 -m pytest -m gpu -q" "python3 benchmarks/score_gpu.py ..."
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/: run bash benchmarks/gpu_wheels.sh here, carry .whl" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 2
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH  # the checkout: steelray
out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/machine.txt"
python3 -c "import torch, ray; print('torch', torch.__version__, 'ray', ray.__version__)" | tee -a "$out/machine.txt"
n=0
for cmd in "$@"; do
  n=$((n + 1))
  echo "=== $n: $cmd ($(date -u +%FT%TZ))" | tee "$out/$n.log"
  bash -c "$cmd" 2>&1 | tee -a "$out/$n.log"
  echo "=== $n: exit ${PIPESTATUS[0]}" | tee -a "$out/$n.log"
done
