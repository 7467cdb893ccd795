#!/usr/bin/env bash
# One call on the lent GPU machine: install the carried wheels, run the GPU tests and the
# GPU benchmarks, and leave the outputs in $OUT (or ./gpu_out). The machine has torch, CuPy,
# numpy, scipy, numba, pyarrow, uvloop and pytest but no internet: the rest travels as
# wheels in .whl/ (see README, "GPU check").
#
#   usage (from the device tool): bash scripts/gpu_check.sh [tests|bench|all]
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import sys, torch, numpy; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "numpy", numpy.__version__)'
} 2>&1 | tee "$out/machine.txt"

rc=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  # the whole suite: GPU tests run here, tests needing MLX or coremltools (absent) skip
  timeout 300 python3 -m pytest -q -p no:cacheprovider -rs tests 2>&1 | tail -n 60 | tee "$out/tests.txt"
  rc=${PIPESTATUS[0]}
  # the gpu pipeline end to end: which stream each stage got, copies counted
  timeout 120 python3 -m nautilus_pipeline.cli run pipelines/gpu.toml --out "$out/gpu-run" 2>&1 | tee "$out/gpu_pipeline.txt"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout 150 python3 scripts/bench_inference.py --gpu --calibrate 2>&1 | tee "$out/bench_inference.txt"
  timeout 200 python3 scripts/bench_kernels.py --gpu 2>&1 | tee "$out/bench_kernels.txt"
fi
exit $rc
