#!/usr/bin/env bash
# The one prepared GPU run of the performance issues (device tool, under 5 minutes of device time), every
# step comparing the default execution with ours in one process, on one GPU:
#   1. the bundle's real trainer (bundle_training.py: ConfigWorkflow of train.json, paper configuration:
#      reference stem, batch 8, ROI 128 x 128 x 16) as it is vs with bundle/configs/fast_train.json (MONAI's
#      fast-training recipe: cached tensors augmented on the GPU, ThreadDataLoader, bf16 AMP, channels_last_3d,
#      torch.compile); goal >= 250 samples/s at batch 8;
#   2. the training data path without the network (data_pipeline.py): CPU workers vs augmentation on the GPU;
#   3. inference (benchmark.py --compile): batch 32 (goal >= 500 lesions/s) and batch 1 (goal <= 4 ms);
#   4. gpu_summary.py: the goal table (summary.md, for the README).
# On the GPU machine (PyTorch, no MONAI, no registry), from the repo root, with the wheels carried in .whl/
# (download them here first; .whl/ is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform any -d .whl \
#     monai==1.6.1 einops==0.8.2 nibabel==5.4.2 pytorch-ignite==0.5.5
#   bash benchmarks/gpu_check.sh            # device tool: carry [".whl"], timeout_s 600; results in $OUT
# Expected 4-5 minutes (torch.compile of the training step takes 1-2 of them); the step timeouts bound it to 9.
# Here (no GPU): `bash benchmarks/gpu_check.sh --smoke` runs the same steps on the CPU with a tiny network and
# dataset, with .venv's Python (tests/test_benchmark.py runs it). Results land in $OUT (or ./gpu_results).
# Nothing here imports monai.deploy (holoscan is not on the GPU machine).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
smoke=0
[[ ${1:-} == --smoke ]] && smoke=1
out=${OUT:-gpu_results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ((smoke)); then
  python=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
  device=cpu
  trainer_args=(--preset paper --smoke --cases_per_class 1 --max_epochs 2)
  pipeline_args=(--cases_per_class 1 --samples 8 --batch 4 --workers 1 --roi 32 32 8)
  infer_args=(--smoke)
  step_timeout=300 pipeline_timeout=300
else
  python=${PYTHON:-python3}
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
  device=cuda:0
  # 12 cases per class: 8 training iterations of batch 8 per epoch; epochs 2-4 give the steady state
  trainer_args=(--preset paper --drop_last --cases_per_class 12 --max_epochs 4)
  pipeline_args=(--cases_per_class 4 --samples 320 --workers 4)
  infer_args=(--compile --repeats 30)
  step_timeout=240 pipeline_timeout=60
fi
"$python" -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__)" | tee -a "$out/gpu.txt"
step() { # name, timeout, command...: logged to $out/log.txt (the device tool returns at most 8 files); a failed
  # step does not stop the others
  local name=$1 limit=$2; shift 2
  echo "== $name" | tee -a "$out/log.txt"
  timeout "$limit" "$@" 2>&1 | grep -v -i "warning" | tee -a "$out/log.txt"
  local rc=${PIPESTATUS[0]}
  ((rc == 0)) || echo "== $name failed with exit code $rc" | tee -a "$out/log.txt"
}
step trainer "$step_timeout" "$python" benchmarks/bundle_training.py --in_process --device "$device" \
  "${trainer_args[@]}" --json "$out/trainer.json"
step pipeline "$pipeline_timeout" "$python" benchmarks/data_pipeline.py --device "$device" \
  --paths cached_cpu_aug cached_device_aug "${pipeline_args[@]}" --json "$out/pipeline.json"
step infer "$step_timeout" "$python" benchmarks/benchmark.py --device "${device%%:*}" --task infer --batch_sizes 32 1 \
  "${infer_args[@]}" --json "$out/infer.json"
# peak GPU memory per bundle config, for the model card
((smoke)) || step gpu_memory 120 "$python" benchmarks/gpu_memory.py --json "$out/gpu_memory.json"
"$python" benchmarks/gpu_summary.py "$out"
