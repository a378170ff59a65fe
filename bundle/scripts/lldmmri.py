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

Input, as released and as read by LMMMEng/LLD-MMRI2023 ``main/preprocess/crop_roi.py`` (see also its
``main/README.md``)::

    <data_dir>/images/<patient>/<studyUID>/<seriesUID>.nii.gz
    <data_dir>/labels/Annotation.json
        {"Annotation_info": {"<patient>": [{"studyUID", "seriesUID", "phase", "pixel_spacing", "slice_thickness",
          "annotation": {"lesion": {"<idx>": {"category": <label>, "bbox": {"3D_box": {"x_min", "y_min", "z_min",
          "x_max", "y_max", "z_max"}}}}}}, ...one item per phase]}}

crop_roi.py reads each series with SimpleITK (array ``[z, y, x]``), slices ``[z_min:z_max + 1, y_min:y_max,
x_min:x_max]`` after growing x/y by 16 voxels (zero-padding outside the image) and z by 2 slices (clipped), and
skips a lesion whose ``z_min`` or ``z_max`` is not a valid slice index. Lesion ``0`` of a patient becomes case
``<patient>``, lesion ``i`` case ``<patient>_<i>``; each phase is saved as ``<case>/<phase>.nii.gz``. This module
does the same (``x`` = first array axis of our ``[X, Y, Z]`` volumes = SimpleITK's x), with the shared
:func:`scripts.roi.crop_lesion_roi`, and turns a bad lesion into :class:`InvalidCaseError` instead of a print.

Splits: the authors' fold CSVs (columns ``lesion_classifier,dataset,label``; ``dataset`` is Train, Val or Test;
one CSV per fold, fold k's validation cases marked Val), else a stratified split by class as
``main/preprocess/gene_cross_val.py`` makes.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._synth_io import CaseRecord, atomic_directory, stratified_folds, write_classification_index, write_nifti
from .constants import LESION_CLASSES, PHASE_FILE_NAMES, PHASES, ROI_MARGIN
from .roi import crop_lesion_roi, roi_slices

__all__ = [
    "CATEGORY_NAMES",
    "ConversionResult",
    "InvalidCaseError",
    "LesionRecord",
    "SkippedCase",
    "convert_lldmmri",
    "main",
    "read_annotations",
    "read_fold_csvs",
]

logger = logging.getLogger(__name__)

#: Category names of LLD-MMRI2023 (main/README.md), index = label; -1 = "Inaccessible" (no label released).
CATEGORY_NAMES: dict[str, int] = {
    "hepatic_hemangioma": 0,
    "intrahepatic_cholangiocarcinoma": 1,
    "hepatic_abscess": 2,
    "hepatic_metastasis": 3,
    "hepatic_cyst": 4,
    "focal_nodular_hyperplasia": 5,
    "hepatocellular_carcinoma": 6,
}

_SPLITS = {"train": "Train", "val": "Val", "test": "Test"}


class InvalidCaseError(ValueError):
    """A lesion case that cannot be converted: missing phase, box outside the volume, unknown class or
    unreadable file. ``case`` and ``file`` name what was being read."""

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
    """One lesion = one classification case: per-phase series file and box (half-open ``x0, y0, z0, x1, y1, z1``)."""

    case: str
    patient: str
    index: str
    label: int | None
    series: dict[str, Path] = field(default_factory=dict)
    boxes: dict[str, tuple[int, int, int, int, int, int]] = field(default_factory=dict)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (file, reason) found while reading the JSON
    annotation: Path | None = None


@dataclass
class ConversionResult:
    """What :func:`convert_lldmmri` wrote: the datalist path, the converted cases and the skipped ones."""

    datalist: Path
    cases: list[str]
    skipped: list[SkippedCase]


def _parse_label(value: object) -> int | None:
    """Category -> label; None for an unknown class. Accepts 0..6, "0".."6" and the README names."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)) or (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
        v = int(value)
        return v if 0 <= v < len(LESION_CLASSES) else None
    if isinstance(value, str):
        return CATEGORY_NAMES.get(value.strip().lower())
    return None


def read_annotations(data_dir: str | os.PathLike, annotation: str | os.PathLike | None = None) -> list[LesionRecord]:
    """Read ``labels/Annotation.json`` into one :class:`LesionRecord` per lesion (case).

    Structural problems of a lesion (unknown class, malformed box, unknown phase) are stored in
    ``LesionRecord.errors`` so that the caller can stop or skip per case.

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
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not an LLD-MMRI Annotation.json (needs 'Annotation_info'): {e}") from e
    records: dict[str, LesionRecord] = {}
    for patient, items in info.items():
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
    return sorted(records.values(), key=lambda r: (r.patient, r.index))


def read_fold_csvs(paths: Sequence[str | os.PathLike]) -> dict[str, tuple[str, int | None, int | None]]:
    """Read the authors' fold CSVs (``lesion_classifier,dataset,label``), one per fold in fold order.

    Returns:
        ``{case: (split, fold, label)}`` with split ``"training"`` (fold = the CSV where the case is Val, or None
        if it is never Val) or ``"test"`` (fold None).

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


def _convert_case(rec: LesionRecord, out_dir: Path, margin: Sequence[int], pad_in_plane: bool, cache: dict) -> None:
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
            crop = crop_lesion_roi(data, box, margin, pad_in_plane=pad_in_plane)
            (sx, sy, sz), pads = roi_slices(box, data.shape, margin)
        except ValueError as e:
            raise InvalidCaseError(rec.case, rec.series[phase], f"phase {phase}: {e}") from e
        start = np.array(
            [sx.start - (pads[0][0] if pad_in_plane else 0), sy.start - (pads[1][0] if pad_in_plane else 0), sz.start],
            dtype=float,
        )
        crop_affine = np.array(affine, dtype=float)
        crop_affine[:3, 3] = crop_affine[:3, :3] @ start + crop_affine[:3, 3]
        crops[phase] = (crop, crop_affine, data.dtype)
    case_dir = out_dir / "images" / rec.case
    case_dir.mkdir(parents=True)
    for phase, (crop, crop_affine, dtype) in crops.items():
        write_nifti(case_dir / f"{PHASE_FILE_NAMES[phase]}.nii.gz", crop, crop_affine, dtype=np.dtype(dtype).name)


def convert_lldmmri(
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    annotation: str | os.PathLike | None = None,
    fold_csvs: Sequence[str | os.PathLike] | None = None,
    num_folds: int = 5,
    seed: int = 66,
    margin: Sequence[int] = ROI_MARGIN,
    pad_in_plane: bool = True,
    skip_invalid: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionResult:
    """Convert the released LLD-MMRI layout into the classification layout + MONAI datalist.

    Args:
        data_dir: released dataset root (``images/``, ``labels/Annotation.json``).
        output_dir: classification dataset root to create (written to a temporary folder, then renamed).
        annotation: Annotation.json path; default ``data_dir/labels/Annotation.json``.
        fold_csvs: the authors' fold CSVs in fold order (fold k = k-th file). None: all labelled cases go to
            ``training`` with stratified folds (``seed``, as gene_cross_val.py with its default seed 66). With CSVs,
            only the cases they list are converted; training cases never marked Val get stratified folds.
        num_folds: folds when no CSV defines them; default 5.
        seed: seed of the stratified fold assignment.
        margin: ROI margin (x, y, z); default ROI_MARGIN (16, 16, 2) as crop_roi.py.
        pad_in_plane: zero-pad the in-plane margin outside the image as crop_roi.py does; default True.
        skip_invalid: skip invalid cases (listed in the result) instead of stopping at the first one.
        overwrite: replace an existing ``output_dir``.
        progress: show a tqdm progress bar.

    Returns:
        :class:`ConversionResult` (datalist path, converted cases, skipped cases).

    Raises:
        InvalidCaseError: for the first invalid case when ``skip_invalid`` is False (nothing is written).
        FileNotFoundError / ValueError: for a missing or malformed annotation file or fold CSV.
        FileExistsError: when ``output_dir`` exists and ``overwrite`` is False.
    """
    from monai.utils import optional_import

    tqdm, has_tqdm = optional_import("tqdm", name="tqdm")
    records = read_annotations(data_dir, annotation)
    splits = read_fold_csvs(fold_csvs) if fold_csvs else None
    skipped: list[SkippedCase] = []

    def fail(case: str, file: str | os.PathLike, reason: str) -> None:
        err = InvalidCaseError(case, file, reason)
        if not skip_invalid:
            raise err
        logger.warning("skipping %s", err)
        skipped.append(SkippedCase(case, str(file), reason))

    if splits is not None:
        known = {r.case for r in records}
        for case in sorted(set(splits) - known):
            fail(
                case,
                annotation or Path(data_dir) / "labels" / "Annotation.json",
                "listed in the fold CSVs but not annotated",
            )
        records = [r for r in records if r.case in splits]
        for r in records:  # CSV label fills in unlabelled (-1) cases; a conflict is an error
            csv_label = splits[r.case][2]
            if r.label is None and csv_label is not None and not r.errors:
                r.label = csv_label
            elif csv_label is not None and r.label is not None and csv_label != r.label:
                r.errors.append((str(fold_csvs[0]), f"class {r.label} in Annotation.json but {csv_label} in the CSV"))
    for r in records:
        if r.label is None and not r.errors:
            r.errors.append(
                (str(annotation or Path(data_dir) / "labels" / "Annotation.json"), "unknown class (no label)")
            )

    converted: list[LesionRecord] = []
    target = Path(output_dir)
    with atomic_directory(target, overwrite=overwrite) as tmp:
        cache: dict = {}
        patient = None
        iterator = tqdm(records, desc="LLD-MMRI cases", unit="case") if has_tqdm and progress else records
        for rec in iterator:
            if rec.patient != patient:  # records are sorted by patient: keep one patient's series in memory
                cache.clear()
                patient = rec.patient
            try:
                _convert_case(rec, tmp, margin, pad_in_plane, cache)
            except InvalidCaseError as e:
                if not skip_invalid:
                    raise
                logger.warning("skipping %s", e)
                skipped.append(SkippedCase(e.case, e.file, e.reason))
                continue
            converted.append(rec)
        if not converted:
            raise ValueError(f"no valid case to convert in {data_dir} (skipped {len(skipped)}).")
        cases = _assign_splits(converted, splits, num_folds, seed)
        datalist = write_classification_index(tmp, cases)
        with open(tmp / "skipped.json", "w", encoding="utf-8") as f:
            json.dump([s.__dict__ for s in skipped], f, indent=1)
    return ConversionResult(target / datalist.name, [r.case for r in converted], skipped)


def _assign_splits(records: Sequence[LesionRecord], splits: dict | None, num_folds: int, seed: int) -> list[CaseRecord]:
    rng = np.random.default_rng(seed)
    out: dict[str, CaseRecord] = {}
    need_fold = []
    for r in records:
        split, fold = ("training", None) if splits is None else splits[r.case][:2]
        if split == "test":
            out[r.case] = CaseRecord(r.case, int(r.label), None)  # type: ignore[arg-type]
        elif fold is not None:
            out[r.case] = CaseRecord(r.case, int(r.label), int(fold))  # type: ignore[arg-type]
        else:
            need_fold.append(r)
    folds = stratified_folds([int(r.label) for r in need_fold], num_folds, rng)  # type: ignore[arg-type]
    for r, f in zip(need_fold, folds):
        out[r.case] = CaseRecord(r.case, int(r.label), f)  # type: ignore[arg-type]
    return [out[r.case] for r in records]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m scripts.lldmmri DATA_DIR OUTPUT_DIR [--fold-csv F1 ... F5] [--skip-invalid]``."""
    p = argparse.ArgumentParser(
        description="Convert the released LLD-MMRI2023 layout to the LCA-DB classification layout."
    )
    p.add_argument("data_dir", type=Path, help="released root with images/ and labels/Annotation.json")
    p.add_argument("output_dir", type=Path, help="classification dataset root to create")
    p.add_argument("--annotation", type=Path, default=None, help="default DATA_DIR/labels/Annotation.json")
    p.add_argument("--fold-csv", type=Path, nargs="+", default=None, help="fold CSVs in fold order")
    p.add_argument("--num-folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=66)
    p.add_argument("--no-pad", action="store_true", help="clip the in-plane margin instead of zero-padding it")
    p.add_argument("--skip-invalid", action="store_true", help="skip invalid cases and list them")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    result = convert_lldmmri(
        args.data_dir,
        args.output_dir,
        annotation=args.annotation,
        fold_csvs=args.fold_csv,
        num_folds=args.num_folds,
        seed=args.seed,
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
