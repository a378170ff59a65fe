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
"""Inputs and outputs of the LCA-DB inference config.

- :func:`find_cases`: the cases of a datalist, or of a folder with one sub-folder of phase files per case.
- :class:`SplitNetworkOutput`: spreads ``(probabilities, attention_ia, attention_pa)`` of
  ``LCADBInference(return_attention=True)`` over ``pred``, ``attention_ia`` and ``attention_pa``.
- :class:`PredictionWriter`: ``predictions.csv`` and ``predictions.json`` (class name and probabilities per case).
- :class:`AttentionMapWriter`: both attention maps per case as NIfTI heatmaps on the network input grid, and a
  PNG overlay on one phase.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys, look_up_option, optional_import

from .constants import LESION_CLASSES, PHASE_FILE_NAMES, PHASES
from .evaluation import _gather, _save_figure, write_json_atomic
from .training import load_datalist
from .transforms import check_case

Events, _ = optional_import("ignite.engine", name="Events")
idist, _ = optional_import("ignite.distributed")
nib, _ = optional_import("nibabel")
plt, _ = optional_import("matplotlib.pyplot")

__all__ = ["AttentionMapWriter", "CaseList", "PredictionWriter", "SplitNetworkOutput", "find_cases"]

logger = logging.getLogger(__name__)

_NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _phase_file(case_dir: Path, phase: str) -> Path | None:
    for suffix in _NIFTI_SUFFIXES:
        path = case_dir / f"{PHASE_FILE_NAMES.get(phase, phase)}{suffix}"
        if path.is_file():
            return path
    return None


class CaseList(Sequence):
    """The cases of :func:`find_cases`, looked up by :meth:`find`, not when the config is parsed.

    ``inference.json`` builds its dataset on this and calls :meth:`find` first in ``run``, so parsing the
    config or checking the workflow's properties reads no input (and does not generate the default
    dataset); the cases are still found and checked before any image is loaded. Until then the list has
    no length (``len`` raises ``TypeError``, which MONAI's workflows take as "length not known yet").

    Args:
        input_path: as for :func:`find_cases`.
        split: as for :func:`find_cases`.
        phases: as for :func:`find_cases`.
    """

    def __init__(self, input_path: str | os.PathLike, split: str = "test", phases: Sequence[str] = PHASES) -> None:
        self.input_path = input_path
        self.split = split
        self.phases = tuple(phases)
        self._cases: list[dict] | None = None

    def find(self) -> list[dict]:
        """Look the cases up (once) with :func:`find_cases` and return them."""
        if self._cases is None:
            self._cases = find_cases(self.input_path, self.split, self.phases)
        return self._cases

    def __len__(self) -> int:
        if self._cases is None:
            raise TypeError("the cases have not been looked up yet: call CaseList.find() first.")
        return len(self._cases)

    def __getitem__(self, index):
        return self.find()[index]


def find_cases(input_path: str | os.PathLike, split: str = "test", phases: Sequence[str] = PHASES) -> list[dict]:
    """The cases to classify, checked before anything is loaded.

    Args:
        input_path: one of
            - a datalist JSON file (paths relative to its folder) or a dataset folder holding ``datalist.json``:
              the cases of ``split``;
            - a folder of cases, ``<input_path>/<case>/<phase>.nii.gz`` (or ``<input_path>/images/<case>/...``),
              one file per phase named as in ``constants.PHASE_FILE_NAMES``.
        split: datalist section to read, defaults to ``"test"``.
        phases: phases every case needs, in network channel order, defaults to ``constants.PHASES``.

    Returns:
        entries ``{"case", <phase>: absolute path, ...}`` (plus ``label`` when the datalist has one), sorted by
        case for a folder.

    Raises:
        FileNotFoundError: when ``input_path`` or a phase file does not exist, or the folder holds no case.
        ValueError: when a case lacks phases.
    """
    path = Path(os.fspath(input_path)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist; pass a datalist JSON or a folder of cases.")
    if path.is_file():
        return load_datalist(path.parent, split, datalist_file=path, phases=phases)
    if (path / "datalist.json").is_file():
        return load_datalist(path, split, phases=phases)
    root = path / "images" if (path / "images").is_dir() else path
    case_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not case_dirs:
        raise FileNotFoundError(f"{root} holds no case folder (<case>/<phase>.nii.gz) and no datalist.json.")
    cases = []
    for case_dir in case_dirs:
        item: dict[str, Any] = {"case": case_dir.name}
        for phase in phases:
            file = _phase_file(case_dir, phase)
            if file is not None:
                item[phase] = str(file)
        check_case(item, None, phases)
        cases.append(item)
    logger.info("%s: %d cases", root, len(cases))
    return cases


class SplitNetworkOutput:
    """Spread a tuple network output over several keys of ``engine.state.output`` (after the forward pass).

    ``LCADBInference(return_attention=True)`` returns ``(probabilities, attention_ia, attention_pa)``; MONAI's
    post-processing and writers want one tensor per key. A tensor output passes through unchanged.

    Args:
        keys: output keys, the first one replacing ``pred``, defaults to ``("pred", "attention_ia", "attention_pa")``.
    """

    def __init__(self, keys: Sequence[str] = (CommonKeys.PRED, "attention_ia", "attention_pa")) -> None:
        if not keys:
            raise ValueError("keys must name at least one output.")
        self.keys = tuple(keys)

    def attach(self, engine) -> None:
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self)

    def __call__(self, engine) -> None:
        pred = engine.state.output[CommonKeys.PRED]
        if isinstance(pred, (tuple, list)):
            if len(pred) != len(self.keys):
                raise ValueError(f"network returned {len(pred)} outputs, SplitNetworkOutput expects {self.keys}.")
            engine.state.output[CommonKeys.PRED] = pred[0]
            for key, value in zip(self.keys[1:], pred[1:]):
                engine.state.output[key] = value


class PredictionWriter:
    """Handler writing ``<filename>.csv`` and ``<filename>.json`` with the class probabilities of every case.

    CSV columns: ``case, predicted_label, predicted_class, probability`` (of the predicted class), then one
    ``p_<class>`` column per class; the JSON holds the same per case, with ``probabilities`` as a dict.

    Args:
        output_dir: folder of the files, created when missing.
        class_names: class names in label order, defaults to ``constants.LESION_CLASSES``.
        filename: base name of both files, defaults to ``"predictions"``.
        case_key: batch key of the case name, defaults to ``"case"``.
        pred_key: output key of the probabilities, defaults to ``"pred"``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Sequence[str] = LESION_CLASSES,
        filename: str = "predictions",
        case_key: str = "case",
        pred_key: str = CommonKeys.PRED,
    ) -> None:
        self.output_dir = Path(os.fspath(output_dir))
        self.class_names = list(class_names)
        self.filename = filename
        self.case_key = case_key
        self.pred_key = pred_key
        self._rows: list[dict] = []

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self._rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def collect(self, engine) -> None:
        for output, data in zip(engine.state.output, engine.state.batch):
            probabilities = torch.as_tensor(output[self.pred_key]).detach().float().cpu().reshape(-1).tolist()
            if len(probabilities) != len(self.class_names):
                raise ValueError(
                    f"case '{data.get(self.case_key)}': {len(probabilities)} probabilities for "
                    f"{len(self.class_names)} classes."
                )
            label = int(np.argmax(probabilities))
            self._rows.append(
                {
                    "case": str(data.get(self.case_key, f"case_{len(self._rows)}")),
                    "predicted_label": label,
                    "predicted_class": self.class_names[label],
                    "probability": probabilities[label],
                    "probabilities": dict(zip(self.class_names, probabilities)),
                }
            )

    def __call__(self, engine) -> None:
        rows = [r for part in _gather(list(self._rows)) for r in part]
        if idist.get_rank() == 0:
            self.write(rows)

    def write(self, rows: Sequence[Mapping]) -> tuple[Path, Path]:
        """Write ``rows`` (as collected) to the CSV and JSON files; returns their paths."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        json_path = write_json_atomic(list(rows), self.output_dir / f"{self.filename}.json")
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(
            ["case", "predicted_label", "predicted_class", "probability"] + [f"p_{n}" for n in self.class_names]
        )
        for row in rows:
            writer.writerow(
                [row["case"], row["predicted_label"], row["predicted_class"], f"{row['probability']:.6f}"]
                + [f"{row['probabilities'][n]:.6f}" for n in self.class_names]
            )
        csv_path = self.output_dir / f"{self.filename}.csv"
        tmp = csv_path.with_name(f".{csv_path.name}.tmp")
        try:
            tmp.write_text(buffer.getvalue(), encoding="utf-8")
            os.replace(tmp, csv_path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        logger.info("predictions of %d cases -> %s, %s", len(rows), csv_path, json_path)
        return csv_path, json_path


class AttentionMapWriter:
    """Handler writing the IA-Net and PA-Net attention maps of every case.

    Each map (one weight per patch, ``[H / patch, W / patch]``) is spread over its patch and over all slices of
    the network input, giving ``<case>_attention_ia.nii.gz`` and ``<case>_attention_pa.nii.gz`` on the grid of
    the preprocessed image (its affine), so they overlay the resized ROI. ``<case>_attention.png`` shows the
    middle slice of one phase with each map on top. Needs ``SplitNetworkOutput`` and
    ``LCADBInference(return_attention=True)``; without attention outputs it writes nothing.

    Args:
        output_dir: folder of the files, created when missing.
        class_names: class names in label order (PNG title), defaults to ``constants.LESION_CLASSES``.
        overlay_phase: phase shown under the maps, defaults to ``"C+A"`` (arterial).
        nifti: write the NIfTI heatmaps, defaults to True.
        png: write the PNG overlay, defaults to True.
        case_key: batch key of the case name, defaults to ``"case"``.
        image_key: batch key of the network input ``[8, H, W, D]``, defaults to ``"image"``.
        keys: output keys of the two maps, defaults to ``("attention_ia", "attention_pa")``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Sequence[str] = LESION_CLASSES,
        overlay_phase: str = "C+A",
        nifti: bool = True,
        png: bool = True,
        case_key: str = "case",
        image_key: str = CommonKeys.IMAGE,
        keys: Sequence[str] = ("attention_ia", "attention_pa"),
    ) -> None:
        self.output_dir = Path(os.fspath(output_dir))
        self.class_names = list(class_names)
        self.overlay_channel = PHASES.index(look_up_option(overlay_phase, PHASES))
        self.overlay_phase = overlay_phase
        self.nifti = nifti
        self.png = png
        self.case_key = case_key
        self.image_key = image_key
        self.keys = tuple(keys)
        self._warned = False

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        for output, data in zip(engine.state.output, engine.state.batch):
            if not all(k in output for k in self.keys):
                if not self._warned:
                    logger.warning("AttentionMapWriter: no attention in the output (return_attention=False?).")
                    self._warned = True
                return
            maps = {k: torch.as_tensor(output[k]).detach().float().cpu().numpy() for k in self.keys}
            self.write(str(data.get(self.case_key, "case")), data[self.image_key], maps, output.get(CommonKeys.PRED))

    def write(self, case: str, image: Any, maps: Mapping[str, np.ndarray], probabilities: Any = None) -> list[Path]:
        """Write the heatmaps and overlay of one case; ``image`` is the network input ``[C, H, W, D]``."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        volume = torch.as_tensor(image).detach().float().cpu().numpy()
        spatial = volume.shape[1:]
        affine = np.asarray(image.affine, dtype=np.float64) if hasattr(image, "affine") else np.eye(4)
        heatmaps = {k: _spread(m, spatial) for k, m in maps.items()}
        written = []
        if self.nifti:
            for key, heatmap in heatmaps.items():
                path = self.output_dir / f"{case}_{key}.nii.gz"
                tmp = path.with_name(f".{path.name}.tmp.nii.gz")
                try:
                    nib.save(nib.Nifti1Image(heatmap.astype(np.float32), affine), str(tmp))
                    os.replace(tmp, path)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
                written.append(path)
        if self.png:
            title = case
            if probabilities is not None:
                probs = torch.as_tensor(probabilities).detach().float().cpu().reshape(-1)
                label = int(probs.argmax())
                title = f"{case}: {self.class_names[label]} ({float(probs[label]):.2f})"
            path = self.output_dir / f"{case}_attention.png"
            _plot_overlay(volume[self.overlay_channel], heatmaps, self.overlay_phase, title, path)
            written.append(path)
        return written


def _spread(attention: np.ndarray, spatial: Sequence[int]) -> np.ndarray:
    """``[h, w]`` patch weights -> ``[H, W, D]``: each weight over its ``H/h x W/w`` patch and every slice."""
    grid_h, grid_w = attention.shape[-2:]
    height, width, depth = spatial
    if height % grid_h or width % grid_w:
        raise ValueError(f"attention grid {attention.shape} does not tile the image grid {tuple(spatial)}.")
    plane = np.kron(attention.reshape(grid_h, grid_w), np.ones((height // grid_h, width // grid_w)))
    return np.repeat(plane[:, :, None], depth, axis=2)


def _plot_overlay(phase: np.ndarray, heatmaps: Mapping[str, np.ndarray], phase_name: str, title: str, path: Path):
    z = phase.shape[-1] // 2
    fig, axes = plt.subplots(1, len(heatmaps) + 1, figsize=(3.2 * (len(heatmaps) + 1), 3.4))
    axes[0].imshow(phase[:, :, z].T, cmap="gray", origin="lower")
    axes[0].set_title(f"{phase_name}, slice {z}", fontsize=9)
    for ax, (key, heatmap) in zip(axes[1:], heatmaps.items()):
        ax.imshow(phase[:, :, z].T, cmap="gray", origin="lower")
        shown = ax.imshow(heatmap[:, :, z].T, cmap="jet", alpha=0.45, origin="lower", vmin=0.0)
        ax.set_title(key.replace("_", " "), fontsize=9)
        fig.colorbar(shown, ax=ax, fraction=0.046)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    _save_figure(fig, path)
