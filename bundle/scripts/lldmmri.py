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
"""Adapter from the released LLD-MMRI2023 dataset to the classification layout the bundle trains on.

All references are to LMMMEng/LLD-MMRI2023 at commit e6809b0 (``main/`` = its baseline code). The release comes
in two forms (``main/README.md`` lines 35-149), both handled here:

1. Whole volumes + boxes, converted by :func:`convert_lldmmri`::

       <data_dir>/images/<patient>/<studyUID>/<seriesUID>.nii.gz
       <data_dir>/labels/Annotation.json
           {"Annotation_info": {"<patient>": [{"studyUID", "seriesUID", "phase", "pixel_spacing", "slice_thickness",
             "annotation": {"lesion": {"<idx>": {"category": <label or -1>, "bbox": {"3D_box": {"x_min", "y_min",
             "z_min", "x_max", "y_max", "z_max"}}}}}}, ...one item per phase]}}

   ``category`` -1 marks the challenge's validation cases (``main/README.md`` line 70); their labels come from a
   label file (``<case> <label>`` lines) or the authors' fold CSVs. ``pixel_spacing`` is ``[row, column]``
   (``main/preprocess/crop_roi.py`` line 27 orders it ``(slice_thickness, spacing[0], spacing[1])`` for the
   ``[z, y, x]`` array) and, with ``slice_thickness``, is the true spacing (``main/README.md`` line 57).

2. The pre-cropped ``classification_dataset`` (``main/README.md`` lines 78-149): ``images/<case>/<phase>.nii.gz``
   (the same layout as ours) and ``labels/labels.txt``, ``labels_val_inaccessible.txt``, ``train_fold<k>.txt``,
   ``val_fold<k>.txt`` (``<case> <label>``, space-separated, read with ``np.loadtxt`` by
   ``main/datasets/mp_liver_dataset.py`` line 22). :func:`index_classification_dataset` writes a datalist for it.

Cropping follows ``main/preprocess/crop_roi.py``: it reads each series with SimpleITK (array ``[z, y, x]``),
slices ``[z_min:z_max + 1, y_min:y_max, x_min:x_max]`` after growing x/y by 16 voxels (zero-padding outside the
image, lines 64-73 and 87-88) and z by 2 slices (clipped, lines 74-76), and skips a lesion whose ``z_min`` or
``z_max`` is not a valid slice index (lines 57-62). Lesion ``0`` of a patient becomes case ``<patient>``, lesion
``i`` case ``<patient>_<i>`` (lines 91-94). Our ``x`` = first array axis of ``[X, Y, Z]`` = SimpleITK's x.
Where we differ (``box_policy="strict"``, the default): a box that reaches outside the image (in-plane, or
``z_min < 0``) is an error naming the case and file (it usually means the annotation belongs to another series),
where crop_roi.py clips it (zero-padding in-plane); ``box_policy="official"`` does what crop_roi.py does.
crop_roi.py compares x with the row count and y with the column count (lines 67-68); on non-square images we use
the right axis.

Splits, as published: the authors' fold CSVs (``lesion_classifier,dataset,label``, ``dataset`` = Train, Val or
Test; fold k = the k-th CSV's Val cases), the released split files (``val_fold<k>.txt`` = fold k-1,
``labels_val_inaccessible.txt`` = the validation set) and test lists; else the folds
``main/preprocess/gene_cross_val.py`` makes (:func:`official_folds`).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._synth_io import atomic_directory, datalist_item, write_nifti
from .constants import LESION_CLASSES, PHASE_FILE_NAMES, PHASES, ROI_MARGIN
from .roi import crop_lesion_roi, roi_slices

__all__ = [
    "BOX_POLICIES",
    "CATEGORY_NAMES",
    "OFFICIAL_FOLD_SEED",
    "ConversionResult",
    "InvalidCaseError",
    "LesionRecord",
    "SkippedCase",
    "convert_lldmmri",
    "index_classification_dataset",
    "main",
    "official_folds",
    "read_annotations",
    "read_fold_csvs",
    "read_label_file",
    "read_split_dir",
]

logger = logging.getLogger(__name__)

#: Category names of LLD-MMRI2023 (main/README.md lines 58-65), index = label; -1 = "Inaccessible" (no label).
CATEGORY_NAMES: dict[str, int] = {
    "hepatic_hemangioma": 0,
    "intrahepatic_cholangiocarcinoma": 1,
    "hepatic_abscess": 2,
    "hepatic_metastasis": 3,
    "hepatic_cyst": 4,
    "focal_nodular_hyperplasia": 5,
    "hepatocellular_carcinoma": 6,
}

#: Seed of the official folds (main/README.md line 147, main/preprocess/gene_cross_val.py line 70).
OFFICIAL_FOLD_SEED = 66

#: ``strict``: a box must lie inside the image; ``official``: clip and zero-pad it as crop_roi.py does.
BOX_POLICIES = ("strict", "official")

_UNLABELLED = -1
_SPLITS = {"train": "Train", "val": "Val", "test": "Test"}
#: datalist sections in the order they are written; "validation" = the challenge's validation set
_SECTIONS = ("training", "validation", "test")


class InvalidCaseError(ValueError):
    """A lesion case that cannot be converted: missing phase, box outside the volume, unknown class,
    unreadable file or a case the split files do not place. ``case`` and ``file`` name what was being read."""

    def __init__(self, case: str, file: str | os.PathLike, reason: str) -> None:
        self.case = case
        self.file = str(file)
        self.reason = reason
        super().__init__(case, file, reason)  # all arguments, so that pickle and copy rebuild the error

    def __str__(self) -> str:
        return f"case {self.case!r}, file {self.file}: {self.reason}"


@dataclass(frozen=True)
class SkippedCase:
    """A case left out with ``skip_invalid=True``."""

    case: str
    file: str
    reason: str


@dataclass
class LesionRecord:
    """One lesion = one classification case: per-phase series file, box (half-open ``x0, y0, z0, x1, y1, z1``)
    and annotated spacing ``(x, y, z)`` in mm. ``label`` is None for ``category: -1`` until a label file fills it."""

    case: str
    patient: str
    index: str
    label: int | None
    series: dict[str, Path] = field(default_factory=dict)
    boxes: dict[str, tuple[int, int, int, int, int, int]] = field(default_factory=dict)
    spacing: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (file, reason) found while reading the JSON
    annotation: Path | None = None
    unlabelled: bool = False  # category -1 in Annotation.json: a validation case of the challenge


@dataclass
class ConversionResult:
    """What :func:`convert_lldmmri` wrote: the datalist path, the converted cases and the skipped ones."""

    datalist: Path
    cases: list[str]
    skipped: list[SkippedCase]


def _parse_label(value: object) -> int | None:
    """Category -> label 0..6, -1 for "Inaccessible"; None for an unknown class. Accepts ints, digit strings and
    the README names."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)) or (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
        v = int(value)
        return v if _UNLABELLED <= v < len(LESION_CLASSES) else None
    if isinstance(value, str):
        return CATEGORY_NAMES.get(value.strip().lower())
    return None


def _spacing(item: dict) -> tuple[float, float, float] | None:
    """``(x, y, z)`` mm from ``pixel_spacing`` ``[row, column]`` and ``slice_thickness``; None when absent."""
    try:
        row, col = (float(v) for v in item["pixel_spacing"])
        thickness = float(item["slice_thickness"])
    except (KeyError, TypeError, ValueError):
        return None
    if min(row, col, thickness) <= 0:
        return None
    return (col, row, thickness)


def read_annotations(data_dir: str | os.PathLike, annotation: str | os.PathLike | None = None) -> list[LesionRecord]:
    """Read ``labels/Annotation.json`` into one :class:`LesionRecord` per lesion (case), in file order.

    ``category: -1`` gives ``label=None, unlabelled=True`` (not an error). Structural problems of a lesion (unknown
    class, malformed box, unknown phase) are stored in ``LesionRecord.errors`` so that the caller can stop or skip
    per case.

    Raises:
        FileNotFoundError: when the annotation file does not exist.
        ValueError: when it is not JSON or lacks ``Annotation_info``.
    """
    data_dir = Path(data_dir)
    path = Path(annotation) if annotation is not None else data_dir / "labels" / "Annotation.json"
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)["Annotation_info"]
        items_of = dict(info.items())
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not an LLD-MMRI Annotation.json (needs 'Annotation_info'): {e}") from e
    records: dict[str, LesionRecord] = {}
    for patient, items in items_of.items():
        for item in items:
            phase = item.get("phase")
            image = data_dir / "images" / patient / str(item.get("studyUID")) / f"{item.get('seriesUID')}.nii.gz"
            lesions = (item.get("annotation") or {}).get("lesion") or {}
            for idx, ann in lesions.items():
                case = patient if str(idx) == "0" else f"{patient}_{idx}"
                rec = records.setdefault(case, LesionRecord(case, patient, str(idx), None, annotation=path))
                if phase not in PHASES:
                    logger.warning("case %s: ignoring unknown phase %r (%s)", case, phase, image)
                    continue
                label = _parse_label(ann.get("category"))
                if label is None:
                    rec.errors.append((str(path), f"unknown class {ann.get('category')!r} for phase {phase}"))
                elif label == _UNLABELLED:
                    rec.unlabelled = True
                elif rec.label is not None and rec.label != label:
                    rec.errors.append((str(path), f"phase {phase} has class {label}, other phases {rec.label}"))
                else:
                    rec.label = label
                try:
                    b = ann["bbox"]["3D_box"]
                    # crop_roi.py: x/y maxima exclusive, z_max inclusive -> half-open z1 = z_max + 1
                    box = (
                        int(b["x_min"]),
                        int(b["y_min"]),
                        int(b["z_min"]),
                        int(b["x_max"]),
                        int(b["y_max"]),
                        int(b["z_max"]) + 1,
                    )
                except (KeyError, TypeError, ValueError) as e:
                    rec.errors.append((str(path), f"malformed 3D_box for phase {phase}: {e!r}"))
                    continue
                rec.series[phase] = image
                rec.boxes[phase] = box
                spacing = _spacing(item)
                if spacing is not None:
                    rec.spacing[phase] = spacing
    for rec in records.values():
        if rec.unlabelled and rec.label is not None:
            rec.errors.append((str(path), f"class {rec.label} on some phases and -1 on others"))
    return list(records.values())


def read_label_file(path: str | os.PathLike) -> list[tuple[str, int]]:
    """Read a released label/split file: one ``<case> <label>`` per line, space-separated (``labels.txt``,
    ``train_fold<k>.txt``, ``val_fold<k>.txt``, ``labels_val_inaccessible.txt``; read with ``np.loadtxt`` by
    ``main/datasets/mp_liver_dataset.py`` line 22 and ``main/preprocess/gene_cross_val.py`` line 24). Labels are
    0..6 or -1 (not released). An empty file (a fold without cases of any class) gives an empty list.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: for a line that is not ``<case> <label>``, a label outside -1..6, or a case listed twice.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label file not found: {path}")
    out: list[tuple[str, int]] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            label = _parse_label(parts[-1]) if len(parts) == 2 else None
            if label is None or not re.fullmatch(r"-?\d+", parts[-1]):
                raise ValueError(f"{path}:{number}: expected '<case> <label>' with a label in -1..6, got {line!r}.")
            if parts[0] in seen:
                raise ValueError(f"{path}:{number}: case {parts[0]!r} is listed twice.")
            seen.add(parts[0])
            out.append((parts[0], label))
    return out


def official_folds(
    cases: Sequence[tuple[str, int]], num_folds: int = 5, seed: int = OFFICIAL_FOLD_SEED, num_classes: int = 7
) -> dict[str, int]:
    """The folds ``main/preprocess/gene_cross_val.py`` writes, 0-based (``val_fold<k>.txt`` = fold k-1).

    As there (lines 8-37 and 72): ``random.seed(seed)``; for each class 0..num_classes-1 in turn, that class's
    cases in file order are shuffled with ``random.shuffle`` and cut into ``num_folds`` contiguous chunks, the
    first ``len % num_folds`` chunks one case longer; chunk i of every class is validation fold i. The result is
    exactly the official one when ``cases`` is ``labels.txt`` in file order.

    Args:
        cases: ``(case, label)`` in file order; labels outside 0..num_classes-1 are ignored (as there).
        num_folds: number of folds, default 5.
        seed: the seed given to gene_cross_val.py, default 66.
        num_classes: classes looped over, default 7.

    Returns:
        ``{case: fold}`` for every case with a label in 0..num_classes-1.
    """
    if num_folds < 1:
        raise ValueError(f"num_folds must be >= 1, got {num_folds}.")
    rng = random.Random(seed)  # same stream as random.seed(seed) + random.shuffle on the module-level generator
    folds: dict[str, int] = {}
    for cls in range(num_classes):
        members = [case for case, label in cases if int(label) == cls]
        rng.shuffle(members)
        size, remainder = divmod(len(members), num_folds)
        start = 0
        for i in range(num_folds):
            end = start + size + (1 if i < remainder else 0)
            for case in members[start:end]:
                folds[case] = i
            start = end
    return folds


def read_split_dir(split_dir: str | os.PathLike) -> dict[str, tuple[str, int | None, int]]:
    """Read the released split files of ``classification_dataset/labels`` (main/README.md lines 100-143).

    ``labels.txt`` lists the training cases, ``val_fold<k>.txt`` fold k's validation cases (fold k-1 here), and
    ``labels_val_inaccessible.txt`` the challenge's validation set (label -1). Each ``train_fold<k>.txt`` must be
    ``labels.txt`` minus ``val_fold<k>.txt``, as gene_cross_val.py writes them.

    Returns:
        ``{case: (section, fold, label)}``: section ``"training"`` with its fold (None when no fold file exists)
        or ``"validation"`` (fold None, label -1 unless the file gives one).

    Raises:
        FileNotFoundError: when the folder or its ``labels.txt`` does not exist.
        ValueError: when the fold files disagree with ``labels.txt`` (naming the file and the cases).
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"split folder not found: {split_dir}")
    labels = read_label_file(split_dir / "labels.txt")
    label_of = dict(labels)
    out: dict[str, tuple[str, int | None, int]] = {case: ("training", None, label) for case, label in labels}
    val_files = sorted(split_dir.glob("val_fold*.txt"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    for k, path in enumerate(val_files, start=1):
        if path.name != f"val_fold{k}.txt":
            raise ValueError(
                f"{split_dir}: fold files must be val_fold1.txt .. val_fold{len(val_files)}.txt, found {path.name}."
            )
        val = read_label_file(path)
        for case, label in val:
            if case not in label_of:
                raise ValueError(f"{path}: case {case!r} is not in {split_dir / 'labels.txt'}.")
            if label != label_of[case]:
                raise ValueError(f"{path}: case {case!r} has label {label}, labels.txt {label_of[case]}.")
            if out[case][1] is not None:
                raise ValueError(f"{path}: case {case!r} is also in val_fold{out[case][1] + 1}.txt.")
            out[case] = ("training", k - 1, label)
        train_path = split_dir / f"train_fold{k}.txt"
        if train_path.is_file():
            expected = set(label_of) - {c for c, _ in val}
            train = {c for c, _ in read_label_file(train_path)}
            if train != expected:
                diff = sorted(train ^ expected)[:10]
                raise ValueError(f"{train_path} is not labels.txt minus {path.name}: differs in {diff}.")
    if val_files:
        unplaced = [c for c, (_, fold, _) in out.items() if fold is None]
        if unplaced:
            raise ValueError(f"{split_dir}: cases of labels.txt in no val_fold file: {unplaced[:10]}.")
    inaccessible = split_dir / "labels_val_inaccessible.txt"
    if inaccessible.is_file():
        for case, label in read_label_file(inaccessible):
            if case in out:
                raise ValueError(f"{inaccessible}: case {case!r} is also a training case in labels.txt.")
            out[case] = ("validation", None, label)
    return out


def read_fold_csvs(paths: Sequence[str | os.PathLike]) -> dict[str, tuple[str, int | None, int | None]]:
    """Read the authors' fold CSVs (``lesion_classifier,dataset,label``), one per fold in fold order.

    Returns:
        ``{case: (split, fold, label)}`` with split ``"training"`` (fold = the CSV where the case is Val, or None
        if it is never Val) or ``"test"`` (fold None); label None when the CSV has none (or -1).

    Raises:
        ValueError: for a CSV without those columns or an unknown ``dataset`` value.
    """
    out: dict[str, tuple[str, int | None, int | None]] = {}
    for fold, p in enumerate(paths):
        with open(p, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            cols = {c.strip().lower(): c for c in reader.fieldnames or []}
            if not {"lesion_classifier", "dataset", "label"} <= set(cols):
                raise ValueError(
                    f"{p}: fold CSV needs columns lesion_classifier,dataset,label, got {reader.fieldnames}."
                )
            for row in reader:
                case = row[cols["lesion_classifier"]].strip()
                split = _SPLITS.get(row[cols["dataset"]].strip().lower())
                if split is None:
                    raise ValueError(
                        f"{p}: case {case!r} has dataset {row[cols['dataset']]!r}; expected Train/Val/Test."
                    )
                label = _parse_label(row[cols["label"]])
                label = None if label == _UNLABELLED else label
                prev = out.get(case)
                if split == "Test":
                    out[case] = ("test", None, label)
                elif split == "Val":
                    out[case] = ("training", fold, label)
                elif prev is None:
                    out[case] = ("training", None, label)
    return out


def _load_series(case: str, path: Path, cache: dict) -> tuple[np.ndarray, np.ndarray]:
    """Load a series (cached: the caller clears the cache between patients)."""
    if path in cache:
        return cache[path]
    if not path.is_file():
        raise InvalidCaseError(case, path, "series file is missing")
    try:
        import nibabel as nib

        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        if data.ndim == 4 and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise ValueError(f"expected a 3D volume, got shape {data.shape}")
    except InvalidCaseError:
        raise
    except Exception as e:  # nibabel raises several types for a corrupt file
        raise InvalidCaseError(case, path, f"unreadable image ({type(e).__name__}: {e})") from e
    cache[path] = (data, img.affine)
    return cache[path]


def _crop_official(data: np.ndarray, box: Sequence[int], margin: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """crop_roi.py lines 57-88 on an ``[X, Y, Z]`` array: grow x/y by the margin, zero-pad what leaves the image
    (wherever the box lies), grow z by the margin clipped to the volume; a ``z_min``/``z_max`` that is not a slice
    index is an error (crop_roi.py skips that lesion's phase). Returns the crop and its start index (x, y, z)."""
    x0, y0, z0, x1, y1, z1 = (int(v) for v in box)
    num_slices = data.shape[2]
    if z0 >= num_slices or z1 - 1 >= num_slices:
        raise ValueError(
            f"z_min {z0} / z_max {z1 - 1} is not a slice of the {num_slices}-slice volume (crop_roi.py lines "
            "57-62 skip this lesion's phase, leaving the case without it)"
        )
    if not (x0 < x1 and y0 < y1 and z0 < z1):
        raise ValueError(f"box {tuple(box)} is empty")
    lo = [x0 - int(margin[0]), y0 - int(margin[1]), max(z0 - int(margin[2]), 0)]
    hi = [x1 + int(margin[0]), y1 + int(margin[1]), min(z1 + int(margin[2]), num_slices)]
    src = tuple(slice(max(min(lo[a], data.shape[a]), 0), max(min(hi[a], data.shape[a]), 0)) for a in range(3))
    crop = np.asarray(data[src])
    pads = [(src[a].start - lo[a], hi[a] - lo[a] - crop.shape[a] - (src[a].start - lo[a])) for a in range(2)]
    crop = np.pad(crop, [pads[0], pads[1], (0, 0)], mode="constant")
    return crop, np.array(lo, dtype=float)


def _affine_with_spacing(affine: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """``affine`` with its column lengths (voxel sizes) replaced by ``spacing``, keeping directions and origin."""
    out = np.array(affine, dtype=float)
    norms = np.linalg.norm(out[:3, :3], axis=0)
    norms[norms == 0] = 1.0
    out[:3, :3] = out[:3, :3] / norms * np.asarray(spacing, dtype=float)
    return out


def _convert_case(
    rec: LesionRecord,
    out_dir: Path,
    margin: Sequence[int],
    pad_in_plane: bool,
    cache: dict,
    box_policy: str,
    annotated_spacing: bool,
) -> None:
    if rec.errors:
        file, reason = rec.errors[0]
        raise InvalidCaseError(rec.case, file, reason)
    missing = [p for p in PHASES if p not in rec.series]
    if missing:
        raise InvalidCaseError(
            rec.case, rec.annotation or "Annotation.json", f"missing phase(s) {missing}: no annotated series"
        )
    crops = {}
    for phase in PHASES:
        data, affine = _load_series(rec.case, rec.series[phase], cache)
        box = rec.boxes[phase]
        try:
            if box_policy == "official":
                crop, start = _crop_official(data, box, margin)
            else:
                crop = crop_lesion_roi(data, box, margin, pad_in_plane=pad_in_plane)
                (sx, sy, sz), pads = roi_slices(box, data.shape, margin)
                before = [pads[0][0], pads[1][0]] if pad_in_plane else [0, 0]
                start = np.array([sx.start - before[0], sy.start - before[1], sz.start], dtype=float)
        except ValueError as e:
            raise InvalidCaseError(rec.case, rec.series[phase], f"phase {phase}: {e}") from e
        affine = np.array(affine, dtype=float)
        if annotated_spacing and phase in rec.spacing:
            header = np.linalg.norm(affine[:3, :3], axis=0)
            if not np.allclose(header, rec.spacing[phase], rtol=0.01):
                logger.info(
                    "case %s, %s: header spacing %s, Annotation.json %s: using Annotation.json",
                    rec.case,
                    rec.series[phase].name,
                    np.round(header, 4).tolist(),
                    list(rec.spacing[phase]),
                )
            affine = _affine_with_spacing(affine, rec.spacing[phase])
        crop_affine = affine.copy()
        crop_affine[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
        crops[phase] = (crop, crop_affine, data.dtype)
    case_dir = out_dir / "images" / rec.case
    case_dir.mkdir(parents=True)
    for phase, (crop, crop_affine, dtype) in crops.items():
        write_nifti(case_dir / f"{PHASE_FILE_NAMES[phase]}.nii.gz", crop, crop_affine, dtype=np.dtype(dtype).name)


def _write_index(root: Path, entries: Sequence[tuple[str, int | None, str, int | None]]) -> Path:
    """``labels.txt`` (labelled cases) and ``datalist.json`` with the sections training (with folds),
    validation and test; a case without a label has no ``label`` key (prediction only)."""
    with open(root / "labels.txt", "w", encoding="utf-8") as f:
        for case, label, _, _ in entries:
            if label is not None:
                f.write(f"{case} {int(label)}\n")
    datalist: dict = {
        "name": "LLD-MMRI2023 lesion classification",
        "labels": {str(i): name for i, name in enumerate(LESION_CLASSES)},
    }
    for section in _SECTIONS:
        items = []
        for case, label, sec, fold in entries:
            if sec != section:
                continue
            item = datalist_item(case, _UNLABELLED if label is None else label, fold)
            if label is None:
                del item["label"]
            items.append(item)
        datalist[section] = items
    path = root / "datalist.json"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(datalist, f, indent=1)
    return path


def _extra_labels(label_files: Sequence[str | os.PathLike]) -> dict[str, tuple[int, str]]:
    """``{case: (label, file)}`` of every labelled line of the label files; a conflict between files is an error."""
    out: dict[str, tuple[int, str]] = {}
    for path in label_files:
        for case, label in read_label_file(path):
            if label == _UNLABELLED:
                continue
            if case in out and out[case][0] != label:
                raise ValueError(f"case {case!r}: label {label} in {path} but {out[case][0]} in {out[case][1]}.")
            out[case] = (label, str(path))
    return out


def convert_lldmmri(
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    annotation: str | os.PathLike | None = None,
    label_files: Sequence[str | os.PathLike] | None = None,
    split_dir: str | os.PathLike | None = None,
    test_lists: Sequence[str | os.PathLike] | None = None,
    fold_csvs: Sequence[str | os.PathLike] | None = None,
    num_folds: int = 5,
    seed: int = OFFICIAL_FOLD_SEED,
    margin: Sequence[int] = ROI_MARGIN,
    pad_in_plane: bool = True,
    box_policy: str = "strict",
    annotated_spacing: bool = True,
    skip_invalid: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionResult:
    """Convert the released LLD-MMRI layout (whole volumes + Annotation.json) into the classification layout +
    MONAI datalist, keeping the published splits.

    Datalist sections: ``training`` (labelled, with ``fold``), ``validation`` (the challenge's validation set:
    ``category: -1`` in Annotation.json or ``labels_val_inaccessible.txt``) and ``test``. A -1 case gets its label
    from ``label_files``, the split files or the fold CSVs; without one it has no ``label`` (prediction only).

    Args:
        data_dir: released dataset root (``images/``, ``labels/Annotation.json``).
        output_dir: classification dataset root to create (written to a temporary folder, then renamed).
        annotation: Annotation.json path; default ``data_dir/labels/Annotation.json``.
        label_files: ``<case> <label>`` files that fill -1 labels (e.g. ``classification_dataset/labels/labels.txt``
            and the validation labels published after the challenge); a disagreement with Annotation.json is an error.
        split_dir: the released ``classification_dataset/labels`` folder (see :func:`read_split_dir`): training
            cases and folds from ``labels.txt``/``val_fold<k>.txt``, validation cases from
            ``labels_val_inaccessible.txt``.
        test_lists: ``<case> [<label>]`` files of test cases (e.g. the 104 test cases released later).
        fold_csvs: the authors' fold CSVs in fold order (fold k = k-th file's Val cases, Test rows = test).
        num_folds: folds made when no split file gives them; default 5.
        seed: seed of those folds; default 66 (gene_cross_val.py). Folds are made by :func:`official_folds` over
            the training cases in the order of the first label file listing them, then of Annotation.json.
        margin: ROI margin (x, y, z); default ROI_MARGIN (16, 16, 2) as crop_roi.py.
        pad_in_plane: zero-pad the in-plane margin outside the image as crop_roi.py does; default True.
        box_policy: ``"strict"`` (default): a box reaching outside the image is an error; ``"official"``: clip and
            zero-pad it as crop_roi.py does (see the module docstring).
        annotated_spacing: write the crops with Annotation.json's ``pixel_spacing``/``slice_thickness`` (the true
            spacing, main/README.md line 57) instead of the NIfTI header's; default True.
        skip_invalid: skip invalid cases (listed in the result) instead of stopping at the first one.
        overwrite: replace an existing ``output_dir``.
        progress: show a tqdm progress bar.

    Returns:
        :class:`ConversionResult` (datalist path, converted cases, skipped cases).

    Raises:
        InvalidCaseError: for the first invalid case when ``skip_invalid`` is False (nothing is written), including
            an annotated labelled case that split files were given for but that none of them lists.
        FileNotFoundError / ValueError: for a missing or malformed annotation file, label file, split file or CSV.
        FileExistsError: when ``output_dir`` exists and ``overwrite`` is False.
    """
    from monai.utils import look_up_option, optional_import

    box_policy = look_up_option(box_policy, BOX_POLICIES)
    tqdm, has_tqdm = optional_import("tqdm", name="tqdm")
    annotation_path = Path(annotation) if annotation is not None else Path(data_dir) / "labels" / "Annotation.json"
    records = read_annotations(data_dir, annotation)
    skipped: list[SkippedCase] = []

    def fail(case: str, file: str | os.PathLike, reason: str) -> None:
        err = InvalidCaseError(case, file, reason)
        if not skip_invalid:
            raise err
        logger.warning("skipping %s", err)
        skipped.append(SkippedCase(case, str(file), reason))

    # published placement: {case: (section, fold, source file)}; labels from every source: {case: (label, file)}
    placed: dict[str, tuple[str, int | None, str]] = {}
    extra = _extra_labels(label_files or [])
    order: list[str] = [case for path in label_files or [] for case, _ in read_label_file(path)]
    if split_dir is not None:
        for case, (section, fold, label) in read_split_dir(split_dir).items():
            placed[case] = (section, fold, str(split_dir))
            if label != _UNLABELLED and extra.get(case, (label,))[0] != label:
                raise ValueError(
                    f"case {case!r}: label {label} in {split_dir} but {extra[case][0]} in {extra[case][1]}."
                )
            if label != _UNLABELLED:
                extra[case] = (label, str(Path(split_dir) / "labels.txt"))
        order += [case for case, _ in read_label_file(Path(split_dir) / "labels.txt")]
    if fold_csvs:
        for case, (section, fold, label) in read_fold_csvs(fold_csvs).items():
            placed[case] = (section, fold, str(fold_csvs[0]))
            if label is not None:
                extra.setdefault(case, (label, str(fold_csvs[0])))
    for path in test_lists or []:
        with open(path, encoding="utf-8-sig") as f:
            for number, line in enumerate(f, start=1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) > 2 or (len(parts) == 2 and _parse_label(parts[1]) is None):
                    raise ValueError(f"{path}:{number}: expected '<case> [<label>]', got {line!r}.")
                placed[parts[0]] = ("test", None, str(path))
                if len(parts) == 2 and int(parts[1]) != _UNLABELLED:
                    extra.setdefault(parts[0], (int(parts[1]), str(path)))
    published = split_dir is not None or bool(fold_csvs) or bool(test_lists)

    known = {r.case for r in records}
    for case in [c for c in placed if c not in known]:
        fail(case, placed[case][2], "listed in the split files but not annotated in Annotation.json")
    kept: list[LesionRecord] = []
    for r in records:
        if r.case in extra:
            label, file = extra[r.case]
            if r.label is None and not r.errors:
                r.label = label
            elif r.label is not None and r.label != label:
                r.errors.append((file, f"class {r.label} in Annotation.json but {label} in {file}"))
        if r.case not in placed:
            if r.unlabelled:
                placed[r.case] = ("validation", None, str(annotation_path))
            elif published:
                fail(
                    r.case,
                    annotation_path,
                    "annotated but in none of the split files given (pass its list with "
                    "--test-list, or convert without split files)",
                )
                continue
            else:
                placed[r.case] = ("training", None, str(annotation_path))
        if r.label is None and placed[r.case][0] == "training" and not r.errors:
            r.errors.append((str(annotation_path), "training case without a label (category -1 and no label file)"))
        kept.append(r)

    # folds for training cases the split files leave without one: the official algorithm, over all of them
    need = [r for r in kept if placed[r.case][0] == "training" and placed[r.case][1] is None and r.label is not None]
    rank = {case: i for i, case in reversed(list(enumerate(order)))}
    need.sort(key=lambda r: rank.get(r.case, len(rank)))
    made = official_folds([(r.case, int(r.label)) for r in need], num_folds, seed)  # type: ignore[arg-type]
    for r in need:
        placed[r.case] = ("training", made[r.case], placed[r.case][2])

    converted: list[LesionRecord] = []
    target = Path(output_dir)
    with atomic_directory(target, overwrite=overwrite) as tmp:
        cache: dict = {}
        patient = None
        iterator = tqdm(kept, desc="LLD-MMRI cases", unit="case") if has_tqdm and progress else kept
        for rec in iterator:
            if rec.patient != patient:  # a patient's lesions are consecutive: keep one patient's series in memory
                cache.clear()
                patient = rec.patient
            try:
                _convert_case(rec, tmp, margin, pad_in_plane, cache, box_policy, annotated_spacing)
            except InvalidCaseError as e:
                if not skip_invalid:
                    raise
                logger.warning("skipping %s", e)
                skipped.append(SkippedCase(e.case, e.file, e.reason))
                continue
            converted.append(rec)
        if not converted:
            raise ValueError(f"no valid case to convert in {data_dir} (skipped {len(skipped)}).")
        entries = [(r.case, r.label, placed[r.case][0], placed[r.case][1]) for r in converted]
        datalist = _write_index(tmp, entries)
        with open(tmp / "skipped.json", "w", encoding="utf-8") as f:
            json.dump([s.__dict__ for s in skipped], f, indent=1)
    counts = {s: sum(e[2] == s for e in entries) for s in _SECTIONS}
    logger.info("converted %d cases %s, skipped %d -> %s", len(entries), counts, len(skipped), target)
    return ConversionResult(target / datalist.name, [r.case for r in converted], skipped)


def index_classification_dataset(
    dataset_dir: str | os.PathLike,
    *,
    label_files: Sequence[str | os.PathLike] | None = None,
    num_folds: int = 5,
    seed: int = OFFICIAL_FOLD_SEED,
    datalist_file: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a MONAI datalist for the released pre-cropped ``classification_dataset`` (main/README.md 78-149),
    whose ``images/<case>/<phase>.nii.gz`` is already the layout the bundle reads: nothing is copied.

    Sections: ``training`` = ``labels/labels.txt`` with the folds of ``val_fold<k>.txt`` (made by
    :func:`official_folds` when the files are absent), ``validation`` = ``labels_val_inaccessible.txt`` (labelled
    from ``label_files`` where given). The crops crop_roi.py wrote carry no spacing (it saves
    ``sitk.GetImageFromArray(roi)``, crop_roi.py line 90): every voxel reads as 1 mm.

    Args:
        dataset_dir: the ``classification_dataset`` folder (``images/``, ``labels/``).
        label_files: extra ``<case> <label>`` files, e.g. the validation labels published after the challenge.
        num_folds: folds made when no ``val_fold<k>.txt`` exists; default 5.
        seed: their seed; default 66.
        datalist_file: where to write; default ``<dataset_dir>/datalist.json``.
        overwrite: replace an existing datalist.

    Returns:
        Path of the datalist.

    Raises:
        InvalidCaseError: for a listed case without all 8 phase files (naming the case and the missing file).
        FileExistsError: when the datalist exists and ``overwrite`` is False.
        FileNotFoundError / ValueError: for missing or inconsistent label files.
    """
    root = Path(dataset_dir)
    path = Path(datalist_file) if datalist_file is not None else root / "datalist.json"
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it.")
    placed = read_split_dir(root / "labels")
    extra = _extra_labels(label_files or [])
    training = [(case, label) for case, (section, _, label) in placed.items() if section == "training"]
    made = official_folds(training, num_folds, seed) if all(placed[c][1] is None for c, _ in training) else {}
    entries = []
    for case, (section, fold, label) in placed.items():
        for phase in PHASES:
            file = root / "images" / case / f"{PHASE_FILE_NAMES[phase]}.nii.gz"
            if not file.is_file():
                raise InvalidCaseError(case, file, f"phase {phase} file is missing")
        if label == _UNLABELLED:
            label = extra.get(case, (None, ""))[0]
        elif case in extra and extra[case][0] != label:
            raise ValueError(
                f"case {case!r}: label {label} in {root / 'labels'} but {extra[case][0]} in {extra[case][1]}."
            )
        entries.append((case, label, section, made.get(case, fold) if section == "training" else None))
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.") as staging:
        os.replace(_write_index(Path(staging), entries), path)  # same folder: an atomic rename
    logger.info("indexed %d cases of %s -> %s", len(entries), root, path)
    return path


def _index_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m scripts.lldmmri index",
        description="Write datalist.json for the released pre-cropped LLD-MMRI2023 classification_dataset.",
    )
    p.add_argument("dataset_dir", type=Path, help="classification_dataset folder (images/, labels/)")
    p.add_argument("--labels", type=Path, nargs="+", default=None, help="extra '<case> <label>' files")
    p.add_argument("--num-folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=OFFICIAL_FOLD_SEED)
    p.add_argument("--datalist", type=Path, default=None, help="default DATASET_DIR/datalist.json")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    print(
        index_classification_dataset(
            args.dataset_dir,
            label_files=args.labels,
            num_folds=args.num_folds,
            seed=args.seed,
            datalist_file=args.datalist,
            overwrite=args.overwrite,
        )
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m scripts.lldmmri DATA_DIR OUTPUT_DIR [options]`` converts the whole-volume release;
    ``python -m scripts.lldmmri index CLASSIFICATION_DATASET [options]`` indexes the pre-cropped one."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if argv[:1] == ["index"]:
            return _index_main(argv[1:])
        return _convert_main(argv)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _convert_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m scripts.lldmmri",
        description="Convert the released LLD-MMRI2023 layout to the LCA-DB classification layout "
        "(`python -m scripts.lldmmri index DIR` indexes the pre-cropped classification_dataset instead).",
    )
    p.add_argument("data_dir", type=Path, help="released root with images/ and labels/Annotation.json")
    p.add_argument("output_dir", type=Path, help="classification dataset root to create")
    p.add_argument("--annotation", type=Path, default=None, help="default DATA_DIR/labels/Annotation.json")
    p.add_argument("--labels", type=Path, nargs="+", default=None, help="'<case> <label>' files filling -1 labels")
    p.add_argument("--split-dir", type=Path, default=None, help="released classification_dataset/labels folder")
    p.add_argument("--test-list", type=Path, nargs="+", default=None, help="'<case> [<label>]' files of test cases")
    p.add_argument("--fold-csv", type=Path, nargs="+", default=None, help="the authors' fold CSVs in fold order")
    p.add_argument("--num-folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=OFFICIAL_FOLD_SEED)
    p.add_argument("--box-policy", choices=BOX_POLICIES, default="strict", help="'official' clips as crop_roi.py")
    p.add_argument("--header-spacing", action="store_true", help="keep the NIfTI header spacing")
    p.add_argument("--no-pad", action="store_true", help="clip the in-plane margin instead of zero-padding it")
    p.add_argument("--skip-invalid", action="store_true", help="skip invalid cases and list them")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    result = convert_lldmmri(
        args.data_dir,
        args.output_dir,
        annotation=args.annotation,
        label_files=args.labels,
        split_dir=args.split_dir,
        test_lists=args.test_list,
        fold_csvs=args.fold_csv,
        num_folds=args.num_folds,
        seed=args.seed,
        box_policy=args.box_policy,
        annotated_spacing=not args.header_spacing,
        pad_in_plane=not args.no_pad,
        skip_invalid=args.skip_invalid,
        overwrite=args.overwrite,
    )
    print(result.datalist)
    for s in result.skipped:
        print(f"skipped {s.case}: {s.file}: {s.reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
