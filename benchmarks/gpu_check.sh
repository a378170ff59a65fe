#!/usr/bin/env bash
# The one prepared GPU run for issue 7 (device tool, about 5 minutes): paper-configuration training
# and inference speed, default execution vs ours, both stems. Run from the repo root on the GPU machine
# with the wheels carried in .whl/ (monai, einops, nibabel for Python 3.12; see README "Benchmarks"):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform any -d .whl monai==1.6.1 einops==0.8.2 nibabel==5.4.2
# Results land in $OUT (or ./gpu_results) as JSON, one file per run.
set -uo pipefail
out=${OUT:-gpu_results}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$out/gpu.txt"
run() { local name=$1; shift; timeout 150 python3 benchmarks/benchmark.py --device cuda --repeats 20 --json "$out/$name.json" "$@" 2>&1 | grep -v Warning; }
run reference_eager_bf16_cl
run reference_compiled --compile
run resnet_compiled --stem resnet --compile
# peak GPU memory per bundle config, for the model card (issue 10)
timeout 120 python3 benchmarks/gpu_memory.py --json "$out/gpu_memory.json" 2>&1 | grep -v Warning
