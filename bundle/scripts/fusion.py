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
"""Learned late fusion of the network and the radiomics baseline.

The two models are trained apart on the same training cases; their class probabilities are averaged with the
weight ``w`` (network) / ``1 - w`` (baseline) that gives the lowest log-loss on the validation fold (a grid of 21
weights from 0 to 1), then applied to the evaluation split. ``w = 1`` is the network alone, ``w = 0`` the baseline
alone, so the validation fold decides how much each part is worth.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from .constants import LESION_CLASSES, PHASES

__all__ = ["FUSION_WEIGHTS", "evaluate_late_fusion", "fuse", "fusion_weight", "late_fusion"]

#: Network weights tried by :func:`fusion_weight`.
FUSION_WEIGHTS = tuple(np.round(np.linspace(0.0, 1.0, 21), 2).tolist())


def fuse(network: np.ndarray, baseline: np.ndarray, weight: float) -> np.ndarray:
    """``weight * network + (1 - weight) * baseline`` for probabilities ``[N, C]`` of the same cases.

    Raises:
        ValueError: when the shapes differ or ``weight`` is outside [0, 1].
    """
    network, baseline = np.asarray(network, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if network.shape != baseline.shape or network.ndim != 2:
        raise ValueError(f"probabilities must both be [N, C], got {network.shape} and {baseline.shape}.")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}.")
    return weight * network + (1.0 - weight) * baseline


def fusion_weight(
    network: np.ndarray, baseline: np.ndarray, labels: Sequence[int], weights: Sequence[float] = FUSION_WEIGHTS
) -> float:
    """The network weight of :data:`FUSION_WEIGHTS` with the lowest log-loss of the fused probabilities on
    ``labels`` (the validation fold); ties go to the larger network weight."""
    labels = np.asarray(labels, dtype=np.int64)
    losses = []
    for w in weights:
        p = fuse(network, baseline, w)[np.arange(len(labels)), labels]
        losses.append(float(-np.log(np.clip(p, 1e-7, 1.0)).mean()))
    best = min(losses)
    return max(w for w, loss in zip(weights, losses) if loss <= best + 1e-12)


def late_fusion(network_run: Mapping, baseline_run: Mapping, checkpoint: str = "best_f1") -> dict:
    """Fuse two runs of ``benchmarks/recipe.py`` (probabilities by case for ``val`` and ``test``): the weight learned
    on ``val``, the scores of the fused ``test`` probabilities.

    Returns:
        ``{"weight": w, "test": scores, "val": scores}`` (scores of :func:`scripts.evaluation.classification_scores`).
    """
    from .evaluation import classification_scores

    labels = network_run["labels"]
    out: dict = {}
    net, base = network_run["probabilities"][checkpoint], baseline_run["probabilities"]["baseline"]
    arrays = {}
    for split in ("val", "test"):
        cases = sorted(net[split])
        arrays[split] = (
            np.array([net[split][c] for c in cases]),
            np.array([base[split][c] for c in cases]),
            np.array([labels[c] for c in cases]),
        )
    out["weight"] = fusion_weight(*arrays["val"])
    for split, (n, b, y) in arrays.items():
        out[split] = classification_scores(fuse(n, b, out["weight"]), y)
    return out


def evaluate_late_fusion(
    network: torch.nn.Module,
    preprocessing: Callable,
    dataset_dir: str | os.PathLike,
    fold: int = 0,
    eval_split: str = "test",
    output_dir: str | os.PathLike | None = None,
    baseline_model: str = "random_forest",
    phases: Sequence[str] = PHASES,
    class_names: Sequence[str] = LESION_CLASSES,
    team_name: str = "LCADB",
    seed: int = 0,
    max_training_cases: int | None = None,
    device: str | torch.device = "cpu",
    plots: bool = True,
) -> dict:
    """The late fusion of the trained network and the radiomics baseline (``fusion: true`` in ``evaluate.json``).

    The baseline is fitted on the network's training cases (:func:`scripts.baseline.baseline_probabilities`); both
    predict the validation fold, where :func:`fusion_weight` learns the weight, and ``eval_split``, which is scored.
    Reports (:class:`~scripts.evaluation.ClassificationReport`) go to ``<output_dir>/baseline`` (the baseline alone,
    as ``evaluate_baseline`` writes it) and ``<output_dir>/fusion`` (whose ``metrics.json`` also holds
    ``fusion_weight`` and the validation scores).

    Args:
        network: the trained network, weights loaded (``@network`` after the evaluator ran).
        preprocessing: the evaluation preprocessing (``@validate#preprocessing``).
        dataset_dir, fold, eval_split, phases, class_names, seed, max_training_cases: as the training and
            ``evaluate_baseline``.
        output_dir: folder of the reports; None writes nothing.
        baseline_model: a :data:`scripts.baseline.BASELINE_MODELS` name.
        team_name: the fusion's submission is ``<team_name>_fusion.json``, the baseline's ``<team_name>_baseline.json``.
        device: where the network runs.
        plots: write the PNG figures.

    Returns:
        the fusion's metrics, with ``fusion_weight``.
    """
    from .baseline import baseline_probabilities, report_probabilities
    from .evaluation import classification_scores, predict_cases, write_json_atomic

    num_train, predicted = baseline_probabilities(
        dataset_dir, fold, ("val", eval_split), baseline_model, phases, len(class_names), seed, max_training_cases
    )
    network_probs = {
        split: predict_cases(network, cases, preprocessing, device) for split, (cases, _) in predicted.items()
    }
    arrays = {}
    for split, (cases, baseline) in predicted.items():
        arrays[split] = (np.array([network_probs[split][str(c["case"])] for c in cases]), baseline)
    val_cases = predicted["val"][0]
    weight = fusion_weight(*arrays["val"], [int(c["label"]) for c in val_cases])
    cases, baseline = predicted[eval_split]
    out = None if output_dir is None else os.path.join(os.fspath(output_dir), "baseline")
    what = f"baseline ({baseline_model}, {num_train} training cases) on {eval_split}"
    report_probabilities(cases, baseline, out, class_names, f"{team_name}_baseline", plots, what)
    out = None if output_dir is None else os.path.join(os.fspath(output_dir), "fusion")
    fused = fuse(arrays[eval_split][0], baseline, weight)
    what = f"late fusion (network weight {weight:.2f}, learned on {len(val_cases)} validation cases) on {eval_split}"
    metrics = report_probabilities(cases, fused, out, class_names, f"{team_name}_fusion", plots, what)
    metrics["fusion_weight"] = weight
    metrics["validation"] = classification_scores(
        fuse(*arrays["val"], weight), np.array([int(c["label"]) for c in val_cases])
    )
    if out is not None:
        write_json_atomic(metrics, os.path.join(out, "metrics.json"))
    return metrics
