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
"""Training pieces of the LCA-DB bundle that MONAI's engines need but don't ship.

- :func:`load_datalist`: the datalist of a dataset folder, checked case by case, split by fold.
- :class:`LCADBTrainingLoss`: the scalar loss ``SupervisedTrainer`` expects, from :class:`~.loss.LCADBLoss`'s
  terms; it follows the epoch for the ramp-up, logs every term and takes mixup targets.
- :class:`SelectOutputInferer`: the bag logits out of :class:`~.network.LCADBOutput` for evaluators.
- :class:`LCADBPrepareBatch`: plain tensors on the device, optionally ``channels_last_3d``, optionally mixed up.
- :class:`AtomicCheckpointSaver`, :class:`ResumeFromCheckpoint`: checkpoints written to a temporary file then
  renamed (nothing half-written in ``models/``), and resuming from them.
- :class:`ProgressBar`: a tqdm bar showing the loss.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import load_decathlon_datalist
from monai.engines.utils import IterationEvents, PrepareBatch
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.inferers import Inferer
from monai.utils import CommonKeys, look_up_option, optional_import
from torch import nn

from .checkpoint import mismatch_message
from .constants import LESION_CLASSES, PHASES
from .loss import LCADBLoss
from .transforms import check_case

Events, _ = optional_import("ignite.engine", name="Events")
Checkpoint, _ = optional_import("ignite.handlers", name="Checkpoint")
BaseSaveHandler, _ = optional_import("ignite.handlers.checkpoint", name="BaseSaveHandler", as_type="base")
idist, _ = optional_import("ignite.distributed")
IgniteProgressBar, _ = optional_import("ignite.handlers", name="ProgressBar")

__all__ = [
    "AtomicCheckpointSaver",
    "AtomicDiskSaver",
    "LCADBLossHandler",
    "LCADBPrepareBatch",
    "LCADBTrainingLoss",
    "ProgressBar",
    "ResumeFromCheckpoint",
    "SUBSETS",
    "SelectOutputInferer",
    "load_datalist",
]

logger = logging.getLogger(__name__)
_NUM_CLASSES = len(LESION_CLASSES)

#: Which cases of a split :func:`load_datalist` returns.
SUBSETS = ("all", "train", "val")


def load_datalist(
    dataset_dir: str | os.PathLike,
    split: str = "training",
    fold: int | None = None,
    subset: str = "all",
    datalist_file: str | os.PathLike | None = None,
    phases: Sequence[str] = PHASES,
    num_classes: int = _NUM_CLASSES,
    max_cases: int | None = None,
) -> list[dict]:
    """The checked cases of one split of a dataset in the LCA-DB classification layout.

    Every entry is checked before anything is loaded (all phases named, every file present, a valid label),
    so a broken dataset stops here with a message naming the case.

    Args:
        dataset_dir: dataset root, holding ``datalist.json`` and ``images/<case>/<phase>.nii.gz``.
        split: datalist section, ``"training"`` or ``"test"``, defaults to ``"training"``.
        fold: cross-validation fold held out for validation; needed when ``subset`` is ``"train"`` or ``"val"``.
        subset: ``"all"`` cases of the split, the ``"train"`` cases (``fold != fold``) or the ``"val"`` cases
            (``fold == fold``), defaults to ``"all"``.
        datalist_file: datalist path; defaults to ``<dataset_dir>/datalist.json``.
        phases: phase keys each case must have, in network channel order, defaults to ``constants.PHASES``.
        num_classes: labels must lie in ``[0, num_classes)``, defaults to 7.
        max_cases: keep the first ``max_cases`` cases of the subset, in datalist order (nested subsets for a
            learning curve: the embedded dataset lists its extra training cases after the others); None keeps all.

    Returns:
        entries ``{"case", "label", "fold", <phase>: absolute path, ...}`` (the ``image`` list of relative
        paths is dropped: the bundle stacks the phases into ``image`` itself).

    Raises:
        FileNotFoundError: when the dataset folder, the datalist or a case's file does not exist.
        ValueError: for an unknown split or subset, a missing fold, a case without every phase, a bad label, or a
            ``max_cases`` below 1 or above the number of cases.
    """
    subset = look_up_option(subset, SUBSETS)
    if max_cases is not None and int(max_cases) < 1:
        raise ValueError(f"max_cases must be a positive number of cases or None, got {max_cases}.")
    if subset != "all" and fold is None:
        raise ValueError(f"subset='{subset}' needs the validation fold, got fold=None.")
    root = Path(os.fspath(dataset_dir)).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset folder {root} does not exist; pass the folder holding datalist.json with --dataset_dir."
        )
    datalist_path = Path(os.fspath(datalist_file)) if datalist_file is not None else root / "datalist.json"
    if not datalist_path.is_file():
        raise FileNotFoundError(f"datalist {datalist_path} does not exist (dataset folder {root}).")
    with open(datalist_path, encoding="utf-8") as f:
        sizes = {k: len(v) for k, v in json.load(f).items() if isinstance(v, list)}
    sections = list(sizes)
    if split not in sections:
        raise ValueError(f"datalist {datalist_path} has no '{split}' section; it has {sections}.")
    if not sizes[split]:  # load_decathlon_datalist raises a bare IndexError on an empty section
        raise ValueError(f"datalist {datalist_path} '{split}' holds no case; cases per section: {sizes}.")
    # is_segmentation=False: labels are class indices, not files; the phase paths are resolved by check_case
    items = load_decathlon_datalist(datalist_path, False, split, base_dir=root)
    if subset != "all":
        no_fold = [item.get("case", i) for i, item in enumerate(items) if "fold" not in item]
        if no_fold:
            raise ValueError(f"{datalist_path} '{split}': cases without a 'fold': {no_fold[:10]}.")
        folds = sorted({int(item["fold"]) for item in items})
        if int(fold) not in folds:
            raise ValueError(f"fold must be one of {folds} in {datalist_path} '{split}', got {fold}.")
        keep = (lambda f: f == int(fold)) if subset == "val" else (lambda f: f != int(fold))
        items = [item for item in items if keep(int(item["fold"]))]
    if max_cases is not None:
        if int(max_cases) > len(items):
            raise ValueError(
                f"max_cases={max_cases} but {datalist_path} '{split}' (subset '{subset}', fold {fold}) holds "
                f"{len(items)} cases."
            )
        items = items[: int(max_cases)]
    cases = []
    for index, item in enumerate(items):
        if split == "training" and "label" not in item:
            case = item.get("case", f"entry {index}")
            raise ValueError(f"case '{case}' in {datalist_path} '{split}' has no 'label' (a class index is required).")
        paths = check_case(item, root, phases, num_classes=num_classes)
        entry = {k: v for k, v in item.items() if k not in phases and k != "image"}
        entry.update(paths)
        entry.setdefault("case", Path(paths[phases[0]]).parent.name)
        cases.append(entry)
    if not cases:
        raise ValueError(f"{datalist_path} '{split}' (subset '{subset}', fold {fold}) holds no case.")
    logger.info("%s: %d cases of '%s' (subset %s, fold %s)", datalist_path, len(cases), split, subset, fold)
    return cases


class LCADBTrainingLoss(nn.Module):
    """The scalar training loss of LCA-DB for MONAI's ``SupervisedTrainer``, and a handler that feeds it the epoch.

    :class:`~.loss.LCADBLoss` returns a dict of terms; this module returns its ``total`` so that the trainer
    can back-propagate it. Attached to the trainer (through :class:`LCADBLossHandler` in ``train#handlers``), it

    - sets the loss epoch (counted from 0, for the ramp-up ``u_w``) at every ``EPOCH_STARTED``,
    - after each loss computation stores every term in ``engine.state.output`` as ``loss_<term>`` and
      replaces the ``pred`` there by the bag logits, so post-processing and metrics see a tensor,
    - at ``EPOCH_COMPLETED`` puts the epoch mean of every term in ``engine.state.metrics`` as ``train_<term>``.

    Args:
        loss: the LCA-DB loss; defaults to ``LCADBLoss()`` (the reference weights).
        pred_field: field of the network output kept as ``pred`` after the loss, defaults to ``"logits"``.

    Example:
        >>> import torch
        >>> from scripts.network import LCADB
        >>> net = LCADB(widen_factor=0.125, roi_size=(64, 64, 8))
        >>> float(LCADBTrainingLoss()(net(torch.randn(2, 8, 64, 64, 8)), torch.tensor([0, 6]))) > 0
        True
    """

    def __init__(self, loss: LCADBLoss | None = None, pred_field: str = "logits") -> None:
        super().__init__()
        self.loss = LCADBLoss() if loss is None else loss
        self.pred_field = pred_field
        self.last_terms: dict[str, float] = {}
        self.mixup_labels: torch.Tensor | None = None
        self._sums: dict[str, float] = {}
        self._count = 0

    @property
    def epoch(self) -> int:
        """Epoch (from 0) the ramp-up weight is computed for."""
        return self.loss.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.loss.epoch = int(value)

    def forward(self, pred: Any, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pred: the network's :class:`~.network.LCADBOutput`.
            target: class indices ``[B]`` or ``[B, 1]``, or the mixup target ``[B, 3]`` (float rows
                ``(y_i, y_j, l)``, :class:`LCADBPrepareBatch`): every term is then ``l * term(y_i) + (1 - l) *
                term(y_j)``.

        Returns:
            the scalar ``total`` loss.
        """
        if target.is_floating_point() and target.dim() == 2 and target.shape[1] == 3:
            lam = float(target[0, 2])
            first, second = self.loss(pred, target[:, 0].long()), self.loss(pred, target[:, 1].long())
            terms = {name: lam * first[name] + (1.0 - lam) * second[name] for name in first}
            self.mixup_labels = target[:, 0].long()
        else:
            terms = self.loss(pred, target)
            self.mixup_labels = None
        values = torch.stack([value.detach().float() for value in terms.values()]).tolist()  # one device sync
        self.last_terms = dict(zip(terms, values))
        return terms["total"]

    def attach(self, engine) -> None:
        """Register the epoch, output and epoch-mean callbacks on a ``SupervisedTrainer``."""
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self.loss_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def epoch_started(self, engine) -> None:
        self.epoch = engine.state.epoch - 1
        self._sums, self._count = {}, 0

    def loss_completed(self, engine) -> None:
        output = engine.state.output
        for name, value in self.last_terms.items():
            output[f"loss_{name}"] = value
            self._sums[name] = self._sums.get(name, 0.0) + value
        self._count += 1
        pred = output[CommonKeys.PRED]
        if hasattr(pred, self.pred_field):
            output[CommonKeys.PRED] = getattr(pred, self.pred_field)
        if self.mixup_labels is not None:  # training metrics score the dominant label of each mixed sample
            output[CommonKeys.LABEL] = self.mixup_labels

    def epoch_completed(self, engine) -> None:
        if self._count:
            for name, total in self._sums.items():
                engine.state.metrics[f"train_{name}"] = total / self._count

    def output_terms(self, output: Any) -> dict[str, float]:
        """``output_transform`` for ``StatsHandler``/``TensorBoardStatsHandler``: ``{"train_loss_<term>": value}``."""
        first = output[0] if isinstance(output, Sequence) and not isinstance(output, Mapping) and output else output
        if not isinstance(first, Mapping):
            return {}
        return {f"train_{k}": v for k, v in first.items() if isinstance(k, str) and k.startswith("loss_")}

    def output_total(self, output: Any) -> float | None:
        """``output_transform`` giving the total loss of the last iteration (progress bar)."""
        return self.last_terms.get("total")


class LCADBLossHandler:
    """Attach an :class:`LCADBTrainingLoss` to the trainer from a config's ``train#handlers``.

    MONAI's property checks expect every entry of ``train#handlers`` to be a component (a dict with
    ``_target_``), so the loss, defined once as ``loss``, is attached through this small handler.

    Args:
        loss: the training loss given to the trainer (``@loss``).

    Raises:
        TypeError: when ``loss`` is not an :class:`LCADBTrainingLoss`.
    """

    def __init__(self, loss: LCADBTrainingLoss) -> None:
        if not isinstance(loss, LCADBTrainingLoss):
            raise TypeError(f'Argument "loss" must have type LCADBTrainingLoss, got {type(loss).__name__}.')
        self.loss = loss

    def attach(self, engine) -> None:
        self.loss.attach(engine)


class SelectOutputInferer(Inferer):
    """Run the network and keep one field of a structured output, e.g. the bag ``logits`` of ``LCADBOutput``.

    Evaluators, metrics and post-processing transforms expect ``pred`` to be a tensor; LCA-DB returns seven.

    Args:
        field: attribute (NamedTuple field), key (dict) or index (tuple) to keep, defaults to ``"logits"``.
            An output that is already a tensor passes through.
    """

    def __init__(self, field: str | int = "logits") -> None:
        super().__init__()
        self.field = field

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        output = network(inputs, *args, **kwargs)
        if isinstance(output, torch.Tensor):
            return output
        if isinstance(self.field, str) and hasattr(output, self.field):
            return getattr(output, self.field)
        if isinstance(output, Mapping):
            return output[self.field]
        if isinstance(self.field, int) and isinstance(output, Sequence):
            return output[self.field]
        raise TypeError(f"cannot select '{self.field}' from a network output of type {type(output).__name__}.")


class LCADBPrepareBatch(PrepareBatch):
    """``image`` (and ``label`` when present) as plain tensors on the device, optionally mixed up.

    Plain tensors keep MONAI's per-operation metadata tracking out of the network (the loaded ``MetaTensor``
    stays in ``engine.state.batch`` for the writers).

    With ``mixup_alpha > 0`` (training only: ``train#prepare_batch``), each batch is mixed with a shuffled copy of
    itself (mixup, Zhang et al. 2018): ``x = l x_i + (1 - l) x_j`` with one ``l ~ Beta(alpha, alpha)`` per batch,
    taken as ``max(l, 1 - l)`` so ``x_i`` dominates; the target is then ``[B, 3]`` float, rows ``(y_i, y_j, l)``,
    which :class:`LCADBTrainingLoss` turns into ``l * loss(y_i) + (1 - l) * loss(y_j)``.

    Args:
        channels_last: put images in ``torch.channels_last_3d`` memory format; set it only on CUDA,
            where it helps convolutions, defaults to False.
        image_key: key of the network input, defaults to ``"image"``.
        label_key: key of the class index, defaults to ``"label"``.
        mixup_alpha: Beta parameter of mixup; 0 (default) mixes nothing.

    Raises:
        ValueError: for a negative ``mixup_alpha``.
    """

    def __init__(
        self, channels_last: bool = False, image_key: str = "image", label_key: str = "label", mixup_alpha: float = 0.0
    ) -> None:
        if not mixup_alpha >= 0:
            raise ValueError(f"mixup_alpha must be >= 0, got {mixup_alpha}.")
        self.channels_last = bool(channels_last)
        self.image_key = image_key
        self.label_key = label_key
        self.mixup_alpha = float(mixup_alpha)

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        image = batchdata[self.image_key]
        image = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
        image = image.to(device=device, non_blocking=non_blocking, **kwargs)
        if self.channels_last and image.ndim == 5:
            image = image.contiguous(memory_format=torch.channels_last_3d)
        label = batchdata.get(self.label_key)
        if isinstance(label, torch.Tensor):
            label = label.as_tensor() if hasattr(label, "as_tensor") else label
            label = label.to(device=device, non_blocking=non_blocking).long()
        else:
            label = None
        if self.mixup_alpha > 0 and label is not None:
            image, label = self.mix(image, label.reshape(-1))
        return image, label

    def mix(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup of a batch: the mixed images and the ``[B, 3]`` target ``(y_i, y_j, l)``."""
        lam = float(np.random.beta(self.mixup_alpha, self.mixup_alpha))  # seeded by set_determinism
        lam = max(lam, 1.0 - lam)
        order = torch.randperm(image.shape[0], device=image.device)
        mixed = lam * image + (1.0 - lam) * image[order]
        weights = torch.full_like(label, lam, dtype=torch.float32)
        return mixed, torch.stack([label.float(), label[order].float(), weights], dim=1)


class AtomicDiskSaver(BaseSaveHandler):
    """Save a checkpoint to ``<dirname>/.<name>.tmp`` then rename it, so a file in ``dirname`` is never half-written.

    Only rank 0 writes. With a fixed ``filename`` every save replaces the previous file atomically (``remove``
    does nothing: the previous best stays on disk until the new one is complete).

    Args:
        dirname: folder of the checkpoints, created when missing.
        filename: fixed file name (e.g. ``model.pt``); None uses the names ignite's ``Checkpoint`` generates.
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None) -> None:
        self.dirname = Path(os.fspath(dirname))
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if idist.get_rank() != 0:
            return
        self.dirname.mkdir(parents=True, exist_ok=True)
        path = self.dirname / (self.filename or filename)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def remove(self, filename: str) -> None:
        if self.filename is None and idist.get_rank() == 0:
            (self.dirname / filename).unlink(missing_ok=True)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` writing every file atomically, optionally including the engine it is attached to.

    Same arguments and file names as :class:`monai.handlers.CheckpointSaver`; files are written by
    :class:`AtomicDiskSaver` (so nothing is half-written, and the folder is only created by the first save).

    Args:
        save_dir: folder of the checkpoints.
        save_dict: objects to save, e.g. ``{"model": network}``; a single object is saved as its bare state dict.
        file_prefix: prefix of generated file names, defaults to "".
        save_final: save at the end of the run (and when it fails) as ``final_filename``, defaults to False.
        final_filename: fixed name of the final checkpoint.
        save_key_metric: save when the engine's key metric improves, defaults to False.
        key_metric_name: metric to compare; defaults to the engine's key metric.
        key_metric_n_saved: number of best checkpoints kept, defaults to 1.
        key_metric_filename: fixed name of the best checkpoint (then ``key_metric_n_saved`` must be 1).
        key_metric_greater_or_equal: also save when the metric equals the best so far, defaults to False.
        key_metric_negative_sign: lower is better, defaults to False.
        epoch_level: ``save_interval`` counts epochs (else iterations), defaults to True.
        save_interval: save every ``save_interval`` epochs/iterations; 0 disables, defaults to 0.
        n_saved: number of interval checkpoints kept; None keeps all.
        interval_filename: fixed file name of the interval checkpoint (e.g. ``checkpoint.pt``, replaced at every
            save); None keeps MONAI's ``<prefix>_epoch=N.pt`` names.
        engine_key: when set, the engine this handler is attached to is added to ``save_dict`` under this key
            (e.g. ``"trainer"``: its epoch and iteration, needed to resume); config files cannot reference the
            trainer from its own handlers.
        name: logger name; defaults to the engine's logger.

    Raises:
        ValueError: when a fixed ``key_metric_filename`` is combined with ``key_metric_n_saved > 1``.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,
        name: str | None = None,
        file_prefix: str = "",
        save_final: bool = False,
        final_filename: str | None = None,
        save_key_metric: bool = False,
        key_metric_name: str | None = None,
        key_metric_n_saved: int = 1,
        key_metric_filename: str | None = None,
        key_metric_greater_or_equal: bool = False,
        key_metric_negative_sign: bool = False,
        epoch_level: bool = True,
        save_interval: int = 0,
        n_saved: int | None = None,
        interval_filename: str | None = None,
        engine_key: str | None = None,
    ) -> None:
        # the parent only stores the settings here; the checkpoints are built below with atomic savers
        super().__init__(
            save_dir=save_dir, save_dict=save_dict, name=name, final_filename=final_filename, epoch_level=epoch_level
        )
        if key_metric_filename is not None and key_metric_n_saved > 1:
            raise ValueError(
                f"a fixed key_metric_filename keeps one checkpoint, got key_metric_n_saved={key_metric_n_saved}."
            )
        self.save_dict = dict(self.save_dict)
        self.save_interval = save_interval
        self.engine_key = engine_key
        if save_final:
            self._final_checkpoint = Checkpoint(
                to_save=self.save_dict,
                save_handler=AtomicDiskSaver(save_dir, final_filename),
                filename_prefix=file_prefix,
                score_function=lambda engine: engine.state.iteration,
                score_name="final_iteration",
            )
        if save_key_metric:

            def _score(engine) -> float:
                metric_name = key_metric_name or engine.state.key_metric_name
                metric = engine.state.metrics[metric_name]
                return -metric if key_metric_negative_sign else metric

            self._key_metric_checkpoint = Checkpoint(
                to_save=self.save_dict,
                save_handler=AtomicDiskSaver(save_dir, key_metric_filename),
                filename_prefix=file_prefix,
                score_function=_score,
                score_name="key_metric",
                n_saved=key_metric_n_saved,
                greater_or_equal=key_metric_greater_or_equal,
            )
        if save_interval > 0:
            self._interval_checkpoint = Checkpoint(
                to_save=self.save_dict,
                save_handler=AtomicDiskSaver(save_dir, interval_filename),
                filename_prefix=file_prefix,
                score_function=lambda engine: engine.state.epoch if epoch_level else engine.state.iteration,
                score_name="epoch" if epoch_level else "iteration",
                n_saved=n_saved,
            )

    def attach(self, engine) -> None:
        if self.engine_key is not None:
            self.save_dict[self.engine_key] = engine
        super().attach(engine)
        if self._final_checkpoint is not None:
            engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), self._mark_progress)

    def _mark_progress(self, engine) -> None:
        self._progressed = True

    def exception_raised(self, engine, e: Exception) -> None:
        """A failed run never replaces the final checkpoint: the network at the failure (only if this run trained at
        least one iteration; before that it may be random or half-loaded) goes to ``<final name>_at_failure.pt``."""
        if getattr(self, "_progressed", False) and self._final_filename is not None:
            stem, ext = os.path.splitext(self._final_filename)
            path = Path(self.save_dir) / f"{stem}_at_failure{ext or '.pt'}"
            AtomicDiskSaver(self.save_dir, path.name)(self._final_checkpoint._setup_checkpoint(), path.name)
            self.logger.error(f"Training failed ({type(e).__name__}); network at the failure saved to {path}")
        raise e

    def state_dict(self) -> dict:
        """The best-so-far record of the key metric checkpoint (saved with the resumable checkpoint)."""
        return self._key_metric_checkpoint.state_dict() if self._key_metric_checkpoint is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if self._key_metric_checkpoint is not None and state_dict:
            self._key_metric_checkpoint.load_state_dict(state_dict)


class ResumeFromCheckpoint:
    """Resume training from a checkpoint, or start from the weights of a network-only checkpoint.

    A checkpoint holding the keys of ``load_dict`` (as the bundle's ``models/checkpoint.pt``: network,
    optimizer, scheduler, trainer, best-model record) restores all of them that it holds; a bare network
    state dict (``models/model.pt``) restores the network only. An empty ``load_path`` does nothing, so the
    handler can stay in the config.

    Re-running an interrupted training resumes by default: with an empty ``load_path`` and an existing
    ``<auto_resume_dir>/checkpoint.pt`` (the last complete epoch; written atomically), training continues from it
    instead of starting at epoch 0 and overwriting it. ``load_path="none"`` starts fresh on purpose.

    Args:
        load_path: checkpoint file; "" resumes from ``auto_resume_dir`` if it holds a checkpoint, else does nothing;
            "none" never resumes.
        load_dict: objects to restore, ``{"model": network, "optimizer": ..., ...}``; ``"model"`` is required.
        map_location: ``torch.load`` map location, e.g. the training device.
        engine_key: key of the attached engine in the checkpoint, defaults to ``"trainer"``.
        auto_resume_dir: folder of the interval checkpoint (the bundle's ``ckpt_dir``); None disables auto-resume.
        auto_resume_name: file name of the interval checkpoint, defaults to ``"checkpoint.pt"``.

    Raises:
        ValueError: when ``load_dict`` has no ``"model"``; when the checkpoint's network has other shapes than the
            configured one (e.g. a CPU-preset checkpoint with the full-size config), naming the config to merge.
        FileNotFoundError: when an explicit ``load_path`` does not exist.
    """

    def __init__(
        self,
        load_path: str | os.PathLike | None,
        load_dict: Mapping[str, Any],
        map_location: Any = None,
        engine_key: str = "trainer",
        auto_resume_dir: str | os.PathLike | None = None,
        auto_resume_name: str = "checkpoint.pt",
    ) -> None:
        if "model" not in load_dict:
            raise ValueError(f"load_dict must hold the network under 'model', got keys {sorted(load_dict)}.")
        self.load_path = os.fspath(load_path) if load_path else ""
        if self.load_path.lower() == "none":
            self.load_path = ""
        elif not self.load_path and auto_resume_dir:
            candidate = Path(os.fspath(auto_resume_dir)) / auto_resume_name
            if candidate.is_file():
                logger.warning(
                    "resuming from %s, the last complete epoch of an earlier run in this ckpt_dir; to start fresh "
                    "pass --resume_from none (the earlier checkpoints are then overwritten) or another --ckpt_dir",
                    candidate,
                )
                self.load_path = str(candidate)
        self.load_dict = dict(load_dict)
        self.map_location = map_location
        self.engine_key = engine_key

    def attach(self, engine) -> None:
        if not self.load_path:
            return
        if not os.path.isfile(self.load_path):
            raise FileNotFoundError(f"resume_from: checkpoint {self.load_path} does not exist.")
        engine.add_event_handler(Events.STARTED, self)

    def check_network_shapes(self, checkpoint: Any) -> None:
        """Raise a clear error when the checkpoint's network does not have the configured network's shapes."""
        state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else None
        network = self.load_dict["model"]
        if not isinstance(state, Mapping) or not hasattr(network, "state_dict"):
            return
        message = mismatch_message(self.load_path, network.state_dict(), state)
        if message:
            raise ValueError(
                f"resume_from: {message} (or its model_config.json), or pass --resume_from none to start fresh."
            )

    def __call__(self, engine) -> None:
        checkpoint = torch.load(self.load_path, map_location=self.map_location, weights_only=True)
        self.check_network_shapes(checkpoint)
        to_load = dict(self.load_dict)
        to_load[self.engine_key] = engine
        present = {k: v for k, v in to_load.items() if isinstance(checkpoint, Mapping) and k in checkpoint}
        if "model" not in present:
            logger.info("resume_from %s: a network state dict, loading the network weights only", self.load_path)
            loader = CheckpointLoader(
                self.load_path, {"model": self.load_dict["model"]}, map_location=self.map_location
            )
        else:
            skipped = sorted(set(to_load) - set(present))
            logger.info("resume_from %s: restoring %s (not in it: %s)", self.load_path, sorted(present), skipped)
            loader = CheckpointLoader(self.load_path, present, map_location=self.map_location)
        loader(engine)
        if self.engine_key in present:
            logger.info("resumed at epoch %d of %d", engine.state.epoch, engine.state.max_epochs)


class ProgressBar:
    """A tqdm progress bar over the iterations of an engine, showing ``output_transform(engine.state.output)``.

    Args:
        output_transform: value(s) to show, e.g. ``@loss.output_total``; None shows no value.
        persist: keep the bar of each finished epoch, defaults to False.
    """

    def __init__(self, output_transform: Callable | None = None, persist: bool = False) -> None:
        self.output_transform = output_transform
        self.persist = persist

    def attach(self, engine) -> None:
        bar = IgniteProgressBar(persist=self.persist)
        transform = self.output_transform
        if transform is None:
            bar.attach(engine)
        else:
            bar.attach(engine, output_transform=lambda output: _finite_or_none(transform(output)))


def _finite_or_none(value: Any) -> dict:
    """Progress-bar postfix: ``{"loss": value}`` for a finite number, the dict itself for a dict, else nothing."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return {"loss": value}
    return {}
