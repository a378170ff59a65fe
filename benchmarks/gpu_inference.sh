#!/usr/bin/env bash
# The prepared GPU run for issue 14 (device tool, about 3 minutes): the deploy app's inference function on the
# paper-size exported model, fp32 vs bfloat16 autocast, seconds per lesion and peak GPU memory for 1, 4 and 20
# lesions per batch. Run from the repo root on the GPU machine with the wheels carried in .whl/ (it has torch,
# no MONAI, no holoscan, no registry):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform any -d .whl monai==1.6.1 einops==0.8.2 nibabel==5.4.2 pydicom==3.0.2
# Results land in $OUT (or ./gpu_results) as JSON.
set -uo pipefail
out=${OUT:-gpu_results}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
timeout 400 python3 benchmarks/gpu_inference.py --lesions 20 --batch-sizes 1 4 20 --json "$out/gpu_inference.json" 2>&1 \
  | grep -v -e Warning -e INFO
