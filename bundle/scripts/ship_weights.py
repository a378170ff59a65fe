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

    python -m scripts.ship_weights            # --max_epochs 15 --num_threads 2 --seeds 0 1 2 by default

It trains the network that ``configs/inference.json`` describes (a light LCA-DB) with ``configs/train.json``
on the embedded synthetic default dataset (fold 0 held out for model selection), once per seed, evaluates the
best checkpoint of each on the dataset's test split with ``configs/evaluate.json`` (beside the radiomics baseline
and their late fusion, same seed), scores a trivial baseline (the training split's class prior for every case) on
the same cases, then writes

- ``models/model.pt``: the first seed's network ``state_dict`` with floating-point tensors stored in float16, so
  that the file stays under the model zoo's 1 MB per-file pre-commit limit; it loads into the float32 network as
  is, and the metrics below are measured on exactly these stored weights;
- ``configs/metadata.json``: ``eval_metrics`` (test-split scores of the shipped weights, of the baselines and the
  fusion, and their mean and sd over the seeds), the weights' sha256, a new patch ``version`` and its
  ``changelog`` line;
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
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .constants import LESION_CLASSES

__all__ = ["inference_architecture", "main", "ship_weights"]

BUNDLE = Path(__file__).resolve().parents[1]
CONFIGS = BUNDLE / "configs"
#: Ids of ``inference.json`` that the training run takes over: the network and how its input is prepared, so the
#: shipped weights see in training what the deploy app gives them.
SHIPPED_MODEL_IDS = (
    "roi_size",
    "patch_size",
    "network_def#depth",
    "network_def#widen_factor",
    "network_def#stem",
    "liver_ratio",
    "lesion_margin",
    "lesion_box_channel",
)
CARD_START, CARD_END = "<!-- shipped-weights:start -->", "<!-- shipped-weights:end -->"

logger = logging.getLogger(__name__)


def inference_architecture() -> dict:
    """The network and input ids of ``configs/inference.json`` as overrides, e.g. ``{"roi_size": [64, 64, 8], ...}``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    return {key: parser[key] for key in SHIPPED_MODEL_IDS}


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


def _train_and_evaluate(max_epochs: int, num_threads: int, work_dir: Path, seed: int) -> dict:
    """Train the shipped network with one seed, store its best checkpoint in float16 and evaluate exactly those
    weights beside the radiomics baseline and their late fusion (``evaluate.json``, same seed)."""
    from monai.bundle import ConfigWorkflow

    common = {
        **inference_architecture(),
        "bundle_root": str(work_dir),
        "seed": seed,
        "num_workers": 0,
        "num_threads": num_threads,
        "batch_size": 16,
        "learning_rate": 0.001,
        "lr_step_size": 10,
        "use_channels_last": True,  # the same arithmetic, 1.85x less CPU per step on the light network
    }
    files = {"meta_file": str(CONFIGS / "metadata.json"), "logging_file": str(CONFIGS / "logging.conf")}
    trainer = ConfigWorkflow(
        workflow_type="train", config_file=str(CONFIGS / "train.json"), max_epochs=max_epochs, **files, **common
    )
    trainer.initialize()
    trainer.run()
    trainer.finalize()
    shipped_bytes = _half_state_dict(work_dir / "models" / "model.pt")
    candidate = work_dir / "shipped_model.pt"
    candidate.write_bytes(shipped_bytes)
    evaluator = ConfigWorkflow(
        workflow_type="train",
        config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")],
        ckpt_path=str(candidate),
        output_dir=str(work_dir / "eval"),
        fusion=True,
        **files,
        **common,
    )
    evaluator.initialize()
    evaluator.run()
    evaluator.finalize()
    keys = ("accuracy", "f1", "kappa", "auc")
    read = {
        name: json.loads((work_dir / "eval" / sub / "metrics.json").read_text())
        for name, sub in (("scores", "."), ("radiomics", "baseline"), ("fusion", "fusion"))
    }
    out = {name: {k: float(m[k]) for k in keys} for name, m in read.items()}
    out.update(seed=seed, weights=shipped_bytes, fusion_weight=float(read["fusion"]["fusion_weight"]))
    out["dataset_dir"] = os.fspath(evaluator.dataset_dir)
    return out


def ship_weights(max_epochs: int, num_threads: int, work_dir: Path, seeds: Sequence[int] = (0, 1, 2)) -> dict:
    """Train and evaluate the shipped network once per seed; the weights of the first seed are the ones shipped, the
    others measure the spread. Returns the results written by :func:`_write_outputs`."""
    from .training import load_datalist

    if not seeds:
        raise ValueError("seeds must hold at least one seed.")
    runs = [_train_and_evaluate(max_epochs, num_threads, work_dir / f"seed{seed}", seed) for seed in seeds]
    dataset_dir = runs[0]["dataset_dir"]
    test_cases = load_datalist(dataset_dir, "test")
    num_classes = len(LESION_CLASSES)
    baseline = _baseline_scores(dataset_dir, test_cases, num_classes)
    shipped = runs[0]
    sha256 = hashlib.sha256(shipped["weights"]).hexdigest()
    spread = (
        {
            name: {
                k: (float(np.mean([r[name][k] for r in runs])), float(np.std([r[name][k] for r in runs], ddof=1)))
                for k in shipped[name]
            }
            for name in ("scores", "radiomics", "fusion")
        }
        if len(runs) > 1
        else {}
    )
    return {
        "weights": shipped["weights"],
        "sha256": sha256,
        "seed": shipped["seed"],
        "seeds": [r["seed"] for r in runs],
        "scores": shipped["scores"],
        "radiomics": shipped["radiomics"],
        "fusion": shipped["fusion"],
        "baseline": {k: float(baseline[k]) for k in ("accuracy", "f1", "kappa", "auc")},
        "spread": spread,
        "fusion_weights": [r["fusion_weight"] for r in runs],
        "num_test_cases": len(test_cases),
        "num_training_cases": len(load_datalist(dataset_dir, "training", fold=0, subset="train")),
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
    scores, baseline, radiomics, fusion = result["scores"], result["baseline"], result["radiomics"], result["fusion"]
    metrics = {
        **{f"synthetic_test_{k}": round(v, 4) for k, v in scores.items()},
        **{f"synthetic_test_prior_baseline_{k}": round(v, 4) for k, v in baseline.items()},
        **{f"synthetic_test_radiomics_baseline_{k}": round(v, 4) for k, v in radiomics.items()},
        **{f"synthetic_test_late_fusion_{k}": round(v, 4) for k, v in fusion.items()},
    }
    prefixes = {"scores": "synthetic_test_", "radiomics": "synthetic_test_radiomics_baseline_"}
    prefixes["fusion"] = "synthetic_test_late_fusion_"
    seeds = len(result["seeds"])
    for name, prefix in prefixes.items():
        for k, (mean, sd) in result["spread"].get(name, {}).items():
            metrics[f"{prefix}{k}_mean_{seeds}_seeds"] = round(mean, 4)
            metrics[f"{prefix}{k}_sd_{seeds}_seeds"] = round(sd, 4)
    meta["eval_metrics"] = metrics
    meta["weights_sha256"] = result["sha256"]
    version = _bump_patch(meta["version"])
    meta["changelog"] = {
        version: f"shipped weights retrained with scripts.ship_weights (sha256 {result['sha256'][:12]})",
        **meta["changelog"],
    }
    meta["version"] = version
    card_path = BUNDLE / "docs" / "README.md"
    card = card_path.read_text()

    def cell(name: str, key: str) -> str:
        if name not in result["spread"]:
            return "not measured"
        mean, sd = result["spread"][name][key]
        return f"{mean:.3f} ± {sd:.3f}"

    rows = "\n".join(
        f"| {label} | {scores[key]:.3f} | {cell('scores', key)} | {cell('radiomics', key)} | {cell('fusion', key)} "
        f"| {baseline[key]:.3f} |"
        for key, label in (
            ("accuracy", "accuracy"),
            ("f1", "macro-F1"),
            ("kappa", "Cohen's kappa"),
            ("auc", "macro AUC"),
        )
    )
    arch = result["architecture"]
    weights = ", ".join(f"{w:.2f}" for w in result["fusion_weights"])
    table = (
        f"{CARD_START}\n"
        f"Shipped `models/model.pt` (sha256 `{result['sha256']}`, seed {result['seed']}): depth "
        f"{arch['network_def#depth']}, widen_factor {arch['network_def#widen_factor']}, stem "
        f"`{arch['network_def#stem']}`, ROI {'x'.join(map(str, arch['roi_size']))}, patch {arch['patch_size']}, "
        f"lesion crop margin {arch['lesion_margin'] or 'none'} (voxels); trained {result['max_epochs']} epochs with "
        f"`train.json` and these `inference.json` settings on the {result['num_training_cases']} "
        f"training cases of the synthetic default dataset `{result['dataset']}` (fold 0 held out for model "
        f"selection), scored on its {result['num_test_cases']} synthetic test lesions; the same command with seeds "
        f"{', '.join(map(str, result['seeds']))} (mean ± sd; the radiomics baseline's random forest and the late "
        f"fusion, network weight learned on fold 0: {weights}, take the same seed):\n\n"
        f"| metric | shipped weights | network, {seeds} seeds | radiomics baseline (`scripts/baseline.py`), "
        f"{seeds} seeds | late fusion (`scripts/fusion.py`), {seeds} seeds | class-prior baseline |\n"
        "|---|---|---|---|---|---|\n"
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
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds; the first one's weights are shipped"
    )
    args = parser.parse_args(argv)
    if str(BUNDLE) not in sys.path:
        sys.path.insert(1, str(BUNDLE))
    with tempfile.TemporaryDirectory(prefix="lcadb-ship-") as work:
        result = ship_weights(args.max_epochs, args.num_threads, Path(work), args.seeds)
    _write_outputs(result)
    logger.info("wrote %s (sha256 %s)", BUNDLE / "models" / "model.pt", result["sha256"])
    keys = ("sha256", "seeds", "scores", "radiomics", "fusion", "baseline", "spread", "num_test_cases")
    print(json.dumps({k: result[k] for k in keys}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
