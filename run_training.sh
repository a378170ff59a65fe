#!/usr/bin/env bash
# Sets up .venv (tools/setup_env.sh), then trains LCA-DB with the bundle on the embedded synthetic dataset
# (generated into ~/.cache/lcadb on first use). Without a GPU it merges the light CPU preset
# (bundle/configs/cpu_light.json); with one it trains the paper configuration with MONAI's fast-training
# recipe (bundle/configs/fast_train.json: cached tensors augmented on the GPU, bf16 AMP, channels_last, torch.compile).
# Extra arguments go to `python -m monai.bundle run`, e.g. --fold 2 or --dataset_dir /data/lld-mmri-layout
# Then it evaluates the trained network and the radiomics baseline (scripts/baseline.py, trained on the same
# training cases) on the test split (bundle/configs/evaluate.json) and prints both side by side.
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
.venv/bin/python -m monai.bundle run training \
  --meta_file bundle/configs/metadata.json \
  --config_file "[$configs]" \
  --logging_file bundle/configs/logging.conf "$@"
rm -f bundle/eval/metrics.json bundle/eval/baseline/metrics.json bundle/eval/fusion/metrics.json  # no stale row
.venv/bin/python -m monai.bundle run evaluating \
  --meta_file bundle/configs/metadata.json \
  --config_file "[$configs,'bundle/configs/evaluate.json']" \
  --logging_file bundle/configs/logging.conf "$@"
.venv/bin/python - <<'PY'
import json
import os
rows = [
    ("network (LCA-DB)", "bundle/eval/metrics.json"),
    ("radiomics baseline", "bundle/eval/baseline/metrics.json"),
    ("late fusion", "bundle/eval/fusion/metrics.json"),
]
print(f"\n[result] {'test split':<19} {'macro-F1':>8} {'kappa':>7} {'AUC':>7}   (F1/kappa as the official metrics.py)")
for name, path in rows:
    if os.path.isfile(path):
        m = json.load(open(path))
        weight = f" (network weight {m['fusion_weight']:.2f})" if "fusion_weight" in m else ""
        print(f"[result] {name:<19} {m['f1']:8.3f} {m['kappa']:7.3f} {m['auc']:7.3f}   {path}{weight}")
PY
