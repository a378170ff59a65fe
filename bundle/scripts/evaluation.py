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
"""Evaluation of the LCA-DB bundle: classification scores as ignite metrics, and the evaluation report.

Scores (from class probabilities and labels): ``accuracy``; ``f1`` (macro F1); ``kappa`` (Cohen's kappa);
``auc`` (macro one-vs-rest ROC AUC over the classes that have positives and negatives); ``f1_kappa`` (mean
of macro F1 and kappa, the LLD-MMRI 2023 ranking score). F1 and kappa are those of the challenge's official
``main/metrics.py`` (LMMMEng/LLD-MMRI2023@e6809b0, lines 10-20): ``sklearn.metrics.f1_score(y_true, y_pred,
average='macro')``, i.e. the macro average over the classes present in the labels or the predictions (not over
all 7), and ``cohen_kappa_score(y_true, y_pred)``. :class:`ClassificationReport` writes the metrics JSON, the
confusion matrix and ROC curves as PNG, and the submission ``<TeamName>.json`` (official ``main/predict.py``
lines 181-198 and main/README.md line 175).
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.handlers import from_engine
from monai.utils import look_up_option, optional_import

from .constants import LESION_CLASSES

Events, _ = optional_import("ignite.engine", name="Events")
Metric, _ = optional_import("ignite.metrics", name="Metric", as_type="base")
NotComputableError, _ = optional_import("ignite.exceptions", name="NotComputableError")
idist, _ = optional_import("ignite.distributed")
sk_metrics, _ = optional_import("sklearn.metrics")
plt, _ = optional_import("matplotlib.pyplot")

__all__ = [
    "METRIC_NAMES",
    "ClassificationReport",
    "ClassificationScore",
    "classification_metrics",
    "classification_scores",
    "predict_cases",
    "write_json_atomic",
]

logger = logging.getLogger(__name__)

#: Scores :func:`classification_scores` computes, in report order.
METRIC_NAMES = ("accuracy", "f1", "kappa", "auc", "f1_kappa")


def _kappa(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Cohen's kappa as the official metrics.py (line 14); 1 for perfect agreement on a single class, where the
    chance correction is undefined (sklearn and metrics.py give NaN there)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined kappa (one class only): handled below
        kappa = float(sk_metrics.cohen_kappa_score(labels, predictions))
    if math.isnan(kappa):
        return 1.0 if np.array_equal(labels, predictions) else 0.0
    return kappa


def _per_class_auc(labels: np.ndarray, probabilities: np.ndarray) -> list[float]:
    """One-vs-rest ROC AUC of every class; NaN for a class without positives or negatives."""
    aucs = []
    for c in range(probabilities.shape[1]):
        positive = labels == c
        if positive.all() or not positive.any():
            aucs.append(float("nan"))
        else:
            aucs.append(float(sk_metrics.roc_auc_score(positive, probabilities[:, c])))
    return aucs


def classification_scores(
    probabilities: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, names: Sequence[str] = METRIC_NAMES
) -> dict[str, float]:
    """Classification scores of a set of predictions.

    Args:
        probabilities: class probabilities ``[N, C]`` (softmax output).
        labels: class indices ``[N]``.
        names: scores to compute, any of :data:`METRIC_NAMES`, defaults to all.

    Returns:
        ``{name: value}``. ``f1`` is the macro F1 over the classes present in ``labels`` or the predictions (as
        the official metrics.py); ``auc`` averages the classes that have positives and negatives; it is NaN
        when none has both.

    Raises:
        ValueError: for an unknown name or when the shapes do not match.
    """
    names = [look_up_option(n, METRIC_NAMES) for n in names]
    probabilities = np.asarray(torch.as_tensor(probabilities, dtype=torch.float64).cpu())
    labels = np.asarray(torch.as_tensor(labels).cpu()).reshape(-1).astype(np.int64)
    if probabilities.ndim != 2 or probabilities.shape[0] != labels.shape[0]:
        raise ValueError(
            f"probabilities must be [N, C] and labels [N], got {list(probabilities.shape)} and {list(labels.shape)}."
        )
    predictions = probabilities.argmax(axis=1)
    scores: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a class only predicted has precision 0/0: sklearn counts it 0, as metrics.py
        f1 = float(sk_metrics.f1_score(labels, predictions, average="macro"))  # official metrics.py line 20
    kappa = _kappa(labels, predictions)
    for name in names:
        if name == "accuracy":
            scores[name] = float((predictions == labels).mean())
        elif name == "f1":
            scores[name] = f1
        elif name == "kappa":
            scores[name] = kappa
        elif name == "f1_kappa":
            scores[name] = 0.5 * (f1 + kappa)
        elif name == "auc":
            aucs = [a for a in _per_class_auc(labels, probabilities) if not math.isnan(a)]
            scores[name] = float(np.mean(aucs)) if aucs else float("nan")
    return scores


def predict_cases(
    network: torch.nn.Module,
    cases: Sequence[Mapping],
    transform: Callable | None,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    case_key: str = "case",
) -> dict[str, list[float]]:
    """Class probabilities (softmax of the bag logits) of every case, by case name, with ``network`` in eval mode.

    Args:
        network: an :class:`~scripts.network.LCADB` (its ``logits`` are used) or a network returning logits.
        cases: datalist entries (``load_datalist``).
        transform: the deterministic preprocessing of the evaluation (``validate#preprocessing``); None when the
            cases are preprocessed already.
        device: where the network runs.
        batch_size: cases per forward pass.
        case_key: key of the case name.
    """
    from monai.data import DataLoader, Dataset

    from .training import SelectOutputInferer

    inferer = SelectOutputInferer("logits")
    out: dict[str, list[float]] = {}
    training = network.training
    network.eval()
    try:
        with torch.no_grad():
            for batch in DataLoader(Dataset(list(cases), transform), batch_size=batch_size, shuffle=False):
                image = torch.as_tensor(batch["image"]).as_subclass(torch.Tensor).to(device)
                probabilities = torch.softmax(inferer(image, network).float(), dim=1).cpu().tolist()
                out.update(zip((str(c) for c in batch[case_key]), probabilities))
    finally:
        network.train(training)
    return out


def _gather(obj: Any) -> list[Any]:
    """``obj`` of every rank (one item per rank; just ``[obj]`` without distributed training)."""
    if idist.get_world_size() > 1:
        return list(idist.all_gather(obj))
    return [obj]


class ClassificationScore(Metric):
    """One classification score over a whole epoch as an ignite metric, gathered across ranks.

    Args:
        name: score, one of :data:`METRIC_NAMES` (``accuracy``, ``f1``, ``kappa``, ``auc``, ``f1_kappa``).
        output_transform: maps ``engine.state.output`` to ``(probabilities, labels)``, defaults to
            ``from_engine(["pred", "label"])`` (decollated MONAI outputs are unrolled sample by sample).
        device: where the predictions are accumulated, defaults to the CPU.

    Raises:
        ValueError: for an unknown score name.
    """

    def __init__(self, name: str, output_transform: Callable | None = None, device: str | torch.device = "cpu") -> None:
        self.name = look_up_option(name, METRIC_NAMES)
        super().__init__(
            output_transform=from_engine(["pred", "label"]) if output_transform is None else output_transform,
            device=device,
        )

    def reset(self) -> None:
        self._probabilities: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def update(self, output: Sequence[torch.Tensor]) -> None:
        probabilities, labels = output[0].detach(), output[1].detach()
        if probabilities.ndim == 1:
            probabilities = probabilities.unsqueeze(0)
        self._probabilities.append(probabilities.float().cpu().reshape(-1, probabilities.shape[-1]))
        self._labels.append(labels.long().cpu().reshape(-1))

    def compute(self) -> float:
        parts = _gather((self._probabilities, self._labels))
        probabilities = [p for rank_probs, _ in parts for p in rank_probs]
        labels = [y for _, rank_labels in parts for y in rank_labels]
        if not probabilities:
            raise NotComputableError(f"ClassificationScore('{self.name}') needs at least one sample.")
        return classification_scores(torch.cat(probabilities), torch.cat(labels), [self.name])[self.name]


def classification_metrics(
    names: Sequence[str] = METRIC_NAMES,
    prefix: str = "val_",
    exclude: Sequence[str] = (),
    output_transform: Callable | None = None,
) -> dict[str, ClassificationScore]:
    """``{prefix + name: ClassificationScore(name)}`` for an evaluator's ``key_val_metric``/``additional_metrics``.

    Args:
        names: scores, any of :data:`METRIC_NAMES`, defaults to all.
        prefix: prefix of the metric names in ``engine.state.metrics``, defaults to ``"val_"``.
        exclude: scores left out (e.g. the key metric, when building the additional metrics).
        output_transform: see :class:`ClassificationScore`.

    Raises:
        ValueError: for an unknown score name (the message lists the valid ones).
    """
    names = [look_up_option(n, METRIC_NAMES) for n in names]
    excluded = {look_up_option(n, METRIC_NAMES) for n in exclude}
    return {f"{prefix}{n}": ClassificationScore(n, output_transform) for n in names if n not in excluded}


def _atomic_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def write_json_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as JSON to a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(os.fspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _save_figure(fig, path: Path) -> None:
    tmp = _atomic_path(path)
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)


def _plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 6))
    totals = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, totals, out=np.zeros_like(matrix, dtype=float), where=totals > 0)
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            colour = "white" if normalised[i, j] > 0.5 else "black"
            ax.text(j, i, f"{matrix[i, j]}", ha="center", va="center", color=colour, fontsize=8)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, labels=class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(ticks, labels=class_names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix (counts; colour = row fraction)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    _save_figure(fig, path)


def _plot_roc(labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 6))
    for c, name in enumerate(class_names):
        positive = labels == c
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = sk_metrics.roc_curve(positive, probabilities[:, c])
        ax.plot(fpr, tpr, label=f"{name} (AUC {sk_metrics.auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("One-vs-rest ROC curves")
    ax.legend(loc="lower right", fontsize=7)
    _save_figure(fig, path)


class ClassificationReport:
    """Handler writing the evaluation report of an evaluator at the end of its run.

    Files written in ``output_dir`` (each to a temporary name, then renamed):

    - ``metrics.json``: number of cases, every score of :data:`METRIC_NAMES`, per-class precision, recall,
      F1, support and AUC, the confusion matrix (rows = true class) and the class names;
    - ``confusion_matrix.png`` and ``roc_curves.png`` (with ``plots``);
    - ``<team_name>.json``: the LLD-MMRI submission ``[{"image_id", "prediction", "score": [C probs]}]``, named by
      the team as the challenge requires (main/README.md line 175; ``main/predict.py`` lines 181-198 write
      ``args.team_name + '.json'``).

    Args:
        output_dir: folder of the report, created when missing.
        class_names: class names in label order, defaults to ``constants.LESION_CLASSES``.
        case_key: batch key of the case name (the submission's ``image_id``), defaults to ``"case"``.
        pred_key: output key of the class probabilities, defaults to ``"pred"``.
        label_key: batch key of the class index, defaults to ``"label"``; without labels only the
            submission is written.
        plots: write the PNG figures, defaults to True.
        team_name: registered team name; the submission is ``<team_name>.json``; defaults to ``"LCADB"``.
        submission_filename: overrides the submission file name, defaults to ``<team_name>.json``.
        metrics_filename: defaults to ``"metrics.json"``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Sequence[str] = LESION_CLASSES,
        case_key: str = "case",
        pred_key: str = "pred",
        label_key: str = "label",
        plots: bool = True,
        team_name: str = "LCADB",
        submission_filename: str | None = None,
        metrics_filename: str = "metrics.json",
    ) -> None:
        if not team_name or any(c in team_name for c in "/\\:") or team_name.startswith("."):
            raise ValueError(
                f"team_name must be a plain file stem (no '/', '\\', ':' or leading '.'), got {team_name!r}."
            )
        self.team_name = team_name
        self.output_dir = Path(os.fspath(output_dir))
        self.class_names = list(class_names)
        self.case_key = case_key
        self.pred_key = pred_key
        self.label_key = label_key
        self.plots = plots
        self.submission_filename = submission_filename or f"{team_name}.json"
        self.metrics_filename = metrics_filename
        self._records: list[tuple[str, list[float], int | None]] = []

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def reset(self, engine=None) -> None:
        self._records = []

    def collect(self, engine) -> None:
        outputs, batch = engine.state.output, engine.state.batch
        if isinstance(outputs, Mapping):  # not decollated
            raise RuntimeError("ClassificationReport needs decollated outputs (the evaluator's decollate=True).")
        for i, (output, data) in enumerate(zip(outputs, batch)):
            probabilities = torch.as_tensor(output[self.pred_key]).detach().float().cpu().reshape(-1)
            case = data.get(self.case_key, f"case_{len(self._records) + i}")
            label = data.get(self.label_key, output.get(self.label_key))
            label = None if label is None else int(torch.as_tensor(label).reshape(-1)[0])
            self._records.append((str(case), probabilities.tolist(), label))

    def __call__(self, engine) -> None:
        records = [r for part in _gather(self._records) for r in part]
        if idist.get_rank() != 0:
            return
        if not records:
            logger.warning("ClassificationReport: no case was evaluated, nothing written.")
            return
        self.write(records)

    def write(self, records: Sequence[tuple[str, Sequence[float], int | None]]) -> dict:
        """Write the report of ``records`` ``(case, probabilities, label or None)``; returns the metrics dict."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        probabilities = np.asarray([r[1] for r in records], dtype=np.float64)
        predictions = probabilities.argmax(axis=1)
        submission = [
            {"image_id": case, "prediction": int(p), "score": [float(s) for s in probs]}
            for (case, probs, _), p in zip(records, predictions)
        ]
        write_json_atomic(submission, self.output_dir / self.submission_filename)
        metrics: dict = {"num_cases": len(records), "class_names": self.class_names}
        if any(r[2] is None for r in records):
            logger.warning("ClassificationReport: cases without a label, only %s written.", self.submission_filename)
            return metrics
        labels = np.asarray([r[2] for r in records], dtype=np.int64)
        num_classes = len(self.class_names)
        metrics.update(classification_scores(probabilities, labels))
        class_ids = list(range(num_classes))
        precision, recall, f1, support = sk_metrics.precision_recall_fscore_support(
            labels, predictions, labels=class_ids, zero_division=0
        )
        aucs = _per_class_auc(labels, probabilities)
        metrics["per_class"] = {
            name: {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": int(support[c]),
                "auc": None if math.isnan(aucs[c]) else aucs[c],
            }
            for c, name in enumerate(self.class_names)
        }
        matrix = sk_metrics.confusion_matrix(labels, predictions, labels=class_ids)
        metrics["confusion_matrix"] = matrix.tolist()
        metrics = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
        write_json_atomic(metrics, self.output_dir / self.metrics_filename)
        if self.plots:
            _plot_confusion_matrix(matrix, self.class_names, self.output_dir / "confusion_matrix.png")
            _plot_roc(labels, probabilities, self.class_names, self.output_dir / "roc_curves.png")
        logger.info(
            "evaluation of %d cases: %s -> %s",
            len(records),
            ", ".join(f"{n}={metrics[n]:.4f}" for n in METRIC_NAMES if metrics.get(n) is not None),
            self.output_dir,
        )
        return metrics
