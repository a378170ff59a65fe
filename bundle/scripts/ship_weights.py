# Copyright (c) LCA-DB MONAI plugin contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Produce the weights the bundle ships, ``models/model.pt``, in one reproducible command.

Run from the bundle folder (the model-zoo download layout)::

    python -m scripts.ship_weights            # --max_epochs 15 --num_threads 2 by default

It trains the network that ``configs/inference.json`` describes (a light LCA-DB) with ``configs/train.json``
on the embedded synthetic default dataset (fold 0 held out for model selection), evaluates the best
checkpoint on the dataset's test split with ``configs/evaluate.json``, scores a trivial baseline (the
training split's class prior for every case) on the same cases, then writes

- ``models/model.pt``: the network ``state_dict`` with floating-point tensors stored in float16, so that the
  file stays under the model zoo's 1 MB per-file pre-commit limit; it loads into the float32 network as is,
  and the metrics below are measured on exactly these stored weights;
- ``configs/metadata.json``: ``eval_metrics`` (test-split scores of the shipped weights and of the baseline),
  the weights' sha256, a new patch ``version`` and its ``changelog`` line;
- ``docs/README.md``: the table between the ``shipped-weights`` markers.

Nothing here is a result on real MRI: the dataset is synthetic.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

__all__ = ["inference_architecture", "main", "ship_weights"]

BUNDLE = Path(__file__).resolve().parents[1]
CONFIGS = BUNDLE / "configs"
#: Architecture ids of ``inference.json`` that the training run takes over.
ARCHITECTURE_IDS = ("roi_size", "patch_size", "network_def#depth", "network_def#widen_factor", "network_def#stem")
CARD_START, CARD_END = "<!-- shipped-weights:start -->", "<!-- shipped-weights:end -->"

logger = logging.getLogger(__name__)


def inference_architecture() -> dict:
    """The network ids of ``configs/inference.json`` as overrides, e.g. ``{"roi_size": [64, 64, 8], ...}``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    return {key: parser[key] for key in ARCHITECTURE_IDS}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _half_state_dict(path: Path) -> bytes:
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, Path(tmp) / "model.pt")
        return (Path(tmp) / "model.pt").read_bytes()


def _baseline_scores(dataset_dir: str, test_cases: list[dict], num_classes: int) -> dict[str, float]:
    """Scores of predicting the training split's class prior for every test case (accuracy = majority class)."""
    from .evaluation import classification_scores
    from .training import load_datalist

    train = load_datalist(dataset_dir, "training")
    counts = Counter(int(c["label"]) for c in train)
    prior = np.array([counts.get(k, 0) for k in range(num_classes)], dtype=np.float64) / len(train)
    labels = np.array([int(c["label"]) for c in test_cases])
    return classification_scores(np.tile(prior, (len(labels), 1)), labels)


def ship_weights(max_epochs: int, num_threads: int, work_dir: Path) -> dict:
    """Train, evaluate and write the shipped weights with their metrics; returns the metrics written."""
    from monai.bundle import ConfigWorkflow

    from .training import load_datalist

    common = {
        **inference_architecture(),
        "bundle_root": str(work_dir),
        "num_workers": 0,
        "num_threads": num_threads,
        "batch_size": 16,
        "learning_rate": 0.001,
        "lr_step_size": 10,
    }
    files = {"meta_file": str(CONFIGS / "metadata.json"), "logging_file": str(CONFIGS / "logging.conf")}
    trainer = ConfigWorkflow(
        workflow_type="train", config_file=str(CONFIGS / "train.json"), max_epochs=max_epochs, **files, **common
    )
    trainer.initialize()
    trainer.run()
    trainer.finalize()
    best = work_dir / "models" / "model.pt"
    shipped_bytes = _half_state_dict(best)
    candidate = work_dir / "shipped_model.pt"
    candidate.write_bytes(shipped_bytes)

    evaluator = ConfigWorkflow(
        workflow_type="train",
        config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")],
        ckpt_path=str(candidate),
        output_dir=str(work_dir / "eval"),
        **files,
        **common,
    )
    evaluator.initialize()
    evaluator.run()
    evaluator.finalize()
    report = json.loads((work_dir / "eval" / "metrics.json").read_text())
    radiomics = json.loads((work_dir / "eval" / "baseline" / "metrics.json").read_text())
    dataset_dir = os.fspath(evaluator.dataset_dir)
    test_cases = load_datalist(dataset_dir, "test")
    baseline = _baseline_scores(dataset_dir, test_cases, len(evaluator.parser["class_names"]))
    sha256 = hashlib.sha256(shipped_bytes).hexdigest()
    return {
        "weights": shipped_bytes,
        "sha256": sha256,
        "scores": {k: float(report[k]) for k in ("accuracy", "f1", "kappa", "auc")},
        "baseline": {k: float(baseline[k]) for k in ("accuracy", "f1", "kappa", "auc")},
        "radiomics": {k: float(radiomics[k]) for k in ("accuracy", "f1", "kappa", "auc")},
        "num_test_cases": len(test_cases),
        "dataset": Path(dataset_dir).name,
        "max_epochs": max_epochs,
        "architecture": inference_architecture(),
    }


def _bump_patch(version: str) -> str:
    major, minor, patch = (int(v) for v in version.split("."))
    return f"{major}.{minor}.{patch + 1}"


def _write_outputs(result: dict) -> None:
    meta_path = CONFIGS / "metadata.json"
    meta = json.loads(meta_path.read_text())
    scores, baseline, radiomics = result["scores"], result["baseline"], result["radiomics"]
    meta["eval_metrics"] = {
        **{f"synthetic_test_{k}": round(v, 4) for k, v in scores.items()},
        **{f"synthetic_test_prior_baseline_{k}": round(v, 4) for k, v in baseline.items()},
        **{f"synthetic_test_radiomics_baseline_{k}": round(v, 4) for k, v in radiomics.items()},
    }
    meta["weights_sha256"] = result["sha256"]
    version = _bump_patch(meta["version"])
    meta["changelog"] = {
        version: f"shipped weights retrained with scripts.ship_weights (sha256 {result['sha256'][:12]})",
        **meta["changelog"],
    }
    meta["version"] = version
    card_path = BUNDLE / "docs" / "README.md"
    card = card_path.read_text()
    rows = "\n".join(
        f"| {name} | {scores[key]:.3f} | {radiomics[key]:.3f} | {baseline[key]:.3f} |"
        for key, name in (
            ("accuracy", "accuracy"),
            ("f1", "macro-F1"),
            ("kappa", "Cohen's kappa"),
            ("auc", "macro AUC"),
        )
    )
    arch = result["architecture"]
    table = (
        f"{CARD_START}\n"
        f"Shipped `models/model.pt` (sha256 `{result['sha256']}`): depth {arch['network_def#depth']}, "
        f"widen_factor {arch['network_def#widen_factor']}, stem `{arch['network_def#stem']}`, ROI "
        f"{'x'.join(map(str, arch['roi_size']))}, patch {arch['patch_size']}; trained {result['max_epochs']} epochs "
        f"on the synthetic default dataset `{result['dataset']}` (fold 0 held out for model selection), scored on its "
        f"{result['num_test_cases']} synthetic test lesions:\n\n"
        "| metric | shipped weights | radiomics baseline (`scripts/baseline.py`, same split) | class-prior baseline |\n"
        "|---|---|---|---|\n"
        f"{rows}\n{CARD_END}"
    )
    if CARD_START not in card or CARD_END not in card:
        raise ValueError(f"{card_path} has no {CARD_START} ... {CARD_END} block to fill in.")
    card = re.sub(re.escape(CARD_START) + ".*?" + re.escape(CARD_END), lambda _: table, card, flags=re.S)
    (BUNDLE / "models").mkdir(exist_ok=True)
    _atomic_write(BUNDLE / "models" / "model.pt", result["weights"])
    _atomic_write(meta_path, (json.dumps(meta, indent=4) + "\n").encode())
    _atomic_write(card_path, card.encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max_epochs", type=int, default=15, help="training epochs (default 15)")
    parser.add_argument("--num_threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args(argv)
    if str(BUNDLE) not in sys.path:
        sys.path.insert(1, str(BUNDLE))
    with tempfile.TemporaryDirectory(prefix="lcadb-ship-") as work:
        result = ship_weights(args.max_epochs, args.num_threads, Path(work))
    _write_outputs(result)
    logger.info("wrote %s (sha256 %s)", BUNDLE / "models" / "model.pt", result["sha256"])
    print(json.dumps({k: result[k] for k in ("sha256", "scores", "radiomics", "baseline", "num_test_cases")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
