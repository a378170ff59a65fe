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
"""A radiomics baseline beside the network: hand-made features per phase and a scikit-learn classifier.

A number on synthetic data means little without a trivial model beside it: this baseline is trained on the same
training cases as the network (``training`` split, folds other than the validation fold) and scored on the same
evaluation split with the same scores (:func:`scripts.evaluation.classification_scores`, the official F1/kappa).

Features of one case (all from the 8 ROI crops of the classification layout; ``margin`` = the crop margin):

- per phase, first order, relative to the reference level of the crop (median of the outer in-plane margin ring,
  mostly liver): log mean and log median of the lesion box, its standard deviation, 10-90 % range, skewness,
  kurtosis and histogram entropy; the ring's own spread;
- per phase, simple texture/pattern: mean absolute in-plane gradient, and the log ratio of the box core (inner
  half) to its shell (rim enhancement, central scar or necrosis);
- shape, from the C+A crop and its spacing: box extents (mm), log volume, in-plane elongation.

Use: ``python -m scripts.baseline DATASET_DIR [--cv] [--eval-split test]``, or through ``evaluate.json``
(``"baseline": true``), which writes ``<output_dir>/baseline/metrics.json`` next to the network's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .constants import LESION_CLASSES, PHASES, ROI_MARGIN
from .evaluation import METRIC_NAMES, ClassificationReport, classification_scores
from .roi import lesion_box_slices, liver_reference_level
from .training import load_datalist

__all__ = [
    "BASELINE_MODELS",
    "baseline_probabilities",
    "case_features",
    "cross_validate",
    "evaluate_baseline",
    "fit_baseline",
    "main",
    "report_probabilities",
    "split_cases",
]

logger = logging.getLogger(__name__)

#: classifiers :func:`fit_baseline` knows
BASELINE_MODELS = ("random_forest", "logistic")
_PHASE_FEATURES = (
    "log_mean",
    "log_median",
    "std",
    "range_10_90",
    "skewness",
    "kurtosis",
    "entropy",
    "ring_spread",
    "gradient",
    "core_shell",
)
_SHAPE_FEATURES = ("extent_x_mm", "extent_y_mm", "extent_z_mm", "log_volume_mm3", "elongation")


def feature_names(phases: Sequence[str] = PHASES) -> list[str]:
    """Names of the :func:`case_features` vector, in order."""
    return [f"{p}:{f}" for p in phases for f in _PHASE_FEATURES] + list(_SHAPE_FEATURES)


def _phase_features(array: np.ndarray, margin: Sequence[int]) -> list[float]:
    a = np.asarray(array, dtype=np.float64)
    lesion = a[lesion_box_slices(a.shape, margin)]
    ref, ring = liver_reference_level(a, margin)
    x = lesion / ref
    mean, std = float(x.mean()), float(x.std())
    centred = x - mean
    skew = float((centred**3).mean() / (std**3 + 1e-9))
    kurt = float((centred**4).mean() / (std**4 + 1e-9))
    hist, _ = np.histogram(x, bins=16)
    p = hist[hist > 0] / hist.sum()
    entropy = float(-(p * np.log(p)).sum())
    p10, p50, p90 = np.percentile(x, [10, 50, 90])
    gx = np.abs(np.diff(x, axis=0)).mean() if x.shape[0] > 1 else 0.0
    gy = np.abs(np.diff(x, axis=1)).mean() if x.shape[1] > 1 else 0.0
    core = tuple(slice(s // 4, s - s // 4) if s >= 4 else slice(0, s) for s in x.shape)
    core_mask = np.zeros(x.shape, dtype=bool)
    core_mask[core] = True
    shell = x[~core_mask] if (~core_mask).any() else x.ravel()
    core_shell = np.log(max(float(x[core_mask].mean()), 1e-3) / max(float(shell.mean()), 1e-3))
    ring_spread = float(np.std(ring / ref)) if ring.size else 0.0
    return [
        float(np.log(max(mean, 1e-3))),
        float(np.log(max(p50, 1e-3))),
        std,
        float(p90 - p10),
        skew,
        kurt,
        entropy,
        ring_spread,
        float(gx + gy) / 2,
        float(core_shell),
    ]


def case_features(case: dict, phases: Sequence[str] = PHASES, margin: Sequence[int] = ROI_MARGIN) -> np.ndarray:
    """Feature vector (:func:`feature_names`) of one datalist entry ``{phase: path, ...}``."""
    import nibabel as nib

    values: list[float] = []
    shape_source = None
    for phase in phases:
        img = nib.load(str(case[phase]))
        array = np.asanyarray(img.dataobj)
        if array.ndim == 4:
            array = array[..., 0]
        values += _phase_features(array, margin)
        if phase == "C+A" or shape_source is None:
            shape_source = (array.shape, img.header.get_zooms()[:3])
    shape, zooms = shape_source  # type: ignore[misc]
    extent = [max(s - 2 * m, 1) * float(z) for s, m, z in zip(shape, margin, zooms)]
    values += [*extent, float(np.log(np.prod(extent))), max(extent[:2]) / max(min(extent[:2]), 1e-3)]
    return np.asarray(values, dtype=np.float64)


def _features(cases: Sequence[dict], phases: Sequence[str], progress: bool = False) -> np.ndarray:
    from monai.utils import optional_import

    tqdm, has_tqdm = optional_import("tqdm", name="tqdm")
    it = tqdm(cases, desc="baseline features", unit="case") if has_tqdm and progress else cases
    return np.stack([case_features(c, phases) for c in it])


def fit_baseline(features: np.ndarray, labels: np.ndarray, model: str = "random_forest", seed: int = 0):
    """A fitted scikit-learn pipeline (standardisation + ``model``) on ``features`` ``[N, F]`` and ``labels``."""
    from monai.utils import look_up_option
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = look_up_option(model, BASELINE_MODELS)
    if model == "random_forest":
        clf = RandomForestClassifier(n_estimators=300, class_weight="balanced", random_state=seed, n_jobs=1)
    else:
        clf = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced")
    return make_pipeline(StandardScaler(), clf).fit(features, labels)


def _probabilities(pipeline, features: np.ndarray, num_classes: int) -> np.ndarray:
    """``[N, num_classes]`` probabilities (a class absent from training gets 0)."""
    out = np.zeros((features.shape[0], num_classes))
    out[:, pipeline.classes_] = pipeline.predict_proba(features)
    return out


def split_cases(dataset_dir: str | os.PathLike, split: str, fold: int, phases: Sequence[str] = PHASES) -> list[dict]:
    """The cases of ``split``: a datalist section (``"test"``...) or ``"val"``, the validation fold ``fold``."""
    if split == "val":
        return load_datalist(dataset_dir, "training", fold=fold, subset="val", phases=phases)
    return load_datalist(dataset_dir, split, phases=phases)


def baseline_probabilities(
    dataset_dir: str | os.PathLike,
    fold: int = 0,
    splits: Sequence[str] = ("test",),
    model: str = "random_forest",
    phases: Sequence[str] = PHASES,
    num_classes: int = len(LESION_CLASSES),
    seed: int = 0,
    max_training_cases: int | None = None,
) -> tuple[int, dict[str, tuple[list[dict], np.ndarray]]]:
    """Fit the baseline on the network's training cases (``training`` split, folds != ``fold``, the first
    ``max_training_cases`` of them when given) and predict the cases of every split of ``splits`` (see
    :func:`split_cases`).

    Returns:
        ``(number of training cases, {split: (cases, probabilities [N, num_classes])})``.
    """
    train = load_datalist(
        dataset_dir, "training", fold=fold, subset="train", phases=phases, max_cases=max_training_cases
    )
    pipeline = fit_baseline(_features(train, phases), np.array([c["label"] for c in train]), model=model, seed=seed)
    out = {}
    for split in splits:
        cases = split_cases(dataset_dir, split, fold, phases)
        out[split] = (cases, _probabilities(pipeline, _features(cases, phases), num_classes))
    return len(train), out


def evaluate_baseline(
    dataset_dir: str | os.PathLike,
    fold: int = 0,
    eval_split: str = "test",
    output_dir: str | os.PathLike | None = None,
    model: str = "random_forest",
    phases: Sequence[str] = PHASES,
    class_names: Sequence[str] = LESION_CLASSES,
    team_name: str = "LCADB_baseline",
    seed: int = 0,
    plots: bool = True,
    max_training_cases: int | None = None,
) -> dict:
    """Train the baseline on the network's training cases (``training`` split, folds != ``fold``, the first
    ``max_training_cases`` of them when given) and score it on ``eval_split`` (``"val"`` = the validation fold).
    Writes a :class:`~scripts.evaluation.ClassificationReport` (metrics.json, plots, submission) to ``output_dir``
    when given.

    Returns:
        the metrics dict (``accuracy``, ``f1``, ``kappa``, ``auc``, ``f1_kappa``, ``num_cases``...).
    """
    num_train, predicted = baseline_probabilities(
        dataset_dir, fold, (eval_split,), model, phases, len(class_names), seed, max_training_cases
    )
    test, probabilities = predicted[eval_split]
    return report_probabilities(
        test,
        probabilities,
        output_dir,
        class_names,
        team_name,
        plots,
        f"baseline ({model}, {num_train} training cases)",
    )


def report_probabilities(
    cases: Sequence[dict],
    probabilities: np.ndarray,
    output_dir: str | os.PathLike | None,
    class_names: Sequence[str],
    team_name: str,
    plots: bool,
    what: str,
) -> dict:
    """Score (and, with ``output_dir``, write the :class:`~scripts.evaluation.ClassificationReport` of) the
    probabilities of ``cases``; logs the scores as ``what``."""
    labels = [c.get("label") for c in cases]
    records = [
        (str(c["case"]), p.tolist(), None if y is None else int(y)) for c, p, y in zip(cases, probabilities, labels)
    ]
    if output_dir is not None:
        metrics = ClassificationReport(output_dir, class_names, team_name=team_name, plots=plots).write(records)
    else:
        metrics = classification_scores(probabilities, np.array(labels))
        metrics["num_cases"] = len(cases)
    logger.info(
        "%s: %s",
        what,
        ", ".join(f"{n}={metrics[n]:.4f}" for n in METRIC_NAMES if metrics.get(n) is not None),
    )
    return metrics


def cross_validate(
    dataset_dir: str | os.PathLike, model: str = "random_forest", phases: Sequence[str] = PHASES
) -> dict:
    """Out-of-fold scores of the baseline over the ``training`` split's folds (predictions of every fold pooled),
    plus the mean and spread of the per-fold macro F1."""
    cases = load_datalist(dataset_dir, "training", phases=phases)
    features = _features(cases, phases)
    labels = np.array([c["label"] for c in cases])
    folds = np.array([int(c["fold"]) for c in cases])
    probabilities = np.zeros((len(cases), len(LESION_CLASSES)))
    per_fold = []
    for k in sorted(set(folds.tolist())):
        held = folds == k
        pipeline = fit_baseline(features[~held], labels[~held], model=model)
        probabilities[held] = _probabilities(pipeline, features[held], len(LESION_CLASSES))
        per_fold.append(classification_scores(probabilities[held], labels[held])["f1"])
    scores = classification_scores(probabilities, labels)
    scores.update(fold_f1_mean=float(np.mean(per_fold)), fold_f1_sd=float(np.std(per_fold)), num_cases=len(cases))
    return scores


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m scripts.baseline DATASET_DIR [--cv] [--eval-split test] [--fold 0] [--model random_forest]``."""
    p = argparse.ArgumentParser(description="Radiomics baseline (features + scikit-learn) on a classification dataset.")
    p.add_argument("dataset_dir", type=Path)
    p.add_argument("--fold", type=int, default=0, help="validation fold left out of training (as the network)")
    p.add_argument("--eval-split", default="test", help="datalist section scored, or 'val' for the fold")
    p.add_argument("--model", choices=BASELINE_MODELS, default="random_forest")
    p.add_argument("--cv", action="store_true", help="also report out-of-fold scores over all folds")
    p.add_argument("--output-dir", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    out = {}
    if args.cv:
        out["cross_validation"] = cross_validate(args.dataset_dir, args.model)
    metrics = evaluate_baseline(args.dataset_dir, args.fold, args.eval_split, args.output_dir, args.model)
    out[args.eval_split] = {k: metrics.get(k) for k in (*METRIC_NAMES, "num_cases")}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
