#!/usr/bin/env bash
# Sets up .venv (tools/setup_env.sh), then trains LCA-DB with the bundle on the embedded synthetic dataset
# (generated into ~/.cache/lcadb on first use). Without a GPU it merges the light CPU preset
# (bundle/configs/cpu_light.json); with one it trains the paper configuration with MONAI's fast-training
# recipe (bundle/configs/fast_train.json: cached tensors augmented on the GPU, bf16 AMP, channels_last, torch.compile).
# Extra arguments go to `python -m monai.bundle run`, e.g. --fold 2 or --dataset_dir /data/lld-mmri-layout
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
LCADB_SKIP_DEBIAN=1 bash tools/setup_env.sh
configs="'bundle/configs/train.json'"
if ! .venv/bin/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "[train] no CUDA device: using the light CPU preset bundle/configs/cpu_light.json"
  configs="$configs,'bundle/configs/cpu_light.json'"
else
  echo "[train] CUDA device: MONAI's fast-training recipe bundle/configs/fast_train.json"
  configs="$configs,'bundle/configs/fast_train.json'"
fi
exec .venv/bin/python -m monai.bundle run training \
  --meta_file bundle/configs/metadata.json \
  --config_file "[$configs]" \
  --logging_file bundle/configs/logging.conf "$@"
