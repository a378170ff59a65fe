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
"""Writers shared by the synthetic generator and the LLD-MMRI adapter: the classification layout
(``images/<case>/<phase>.nii.gz``, ``labels.txt``, ``datalist.json``), fold assignment and atomic output folders."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .constants import LESION_CLASSES, PHASE_FILE_NAMES, PHASES

__all__ = [
    "CaseRecord",
    "atomic_directory",
    "datalist_item",
    "stratified_folds",
    "write_classification_index",
    "write_nifti",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaseRecord:
    """One case of the classification layout: ``fold`` is 0..4 for training cases, None for test cases."""

    case: str
    label: int
    fold: int | None


def datalist_item(case: str, label: int, fold: int | None) -> dict:
    """The MONAI datalist item of contracts.md: one key per phase, ``image`` (PHASES order), case, label, fold."""
    paths = [f"images/{case}/{PHASE_FILE_NAMES[p]}.nii.gz" for p in PHASES]
    item: dict = dict(zip(PHASES, paths))
    item["image"] = paths
    item["case"] = case
    item["label"] = int(label)
    if fold is not None:
        item["fold"] = int(fold)
    return item


def stratified_folds(labels: Sequence[int], num_folds: int, rng: np.random.Generator) -> list[int]:
    """Fold index per case, stratified by class: each class is shuffled and dealt round-robin over the folds
    (as LLD-MMRI2023 ``main/preprocess/gene_cross_val.py`` splits each class into ``num_folds`` parts)."""
    if num_folds < 1:
        raise ValueError(f"num_folds must be >= 1, got {num_folds}.")
    folds = [0] * len(labels)
    start = 0
    for label in sorted({int(v) for v in labels}):
        idx = [i for i, v in enumerate(labels) if int(v) == label]
        idx = [idx[j] for j in rng.permutation(len(idx))]
        for j, i in enumerate(idx):
            folds[i] = (start + j) % num_folds
        start += len(idx)  # rotate so small classes do not all start in fold 0
    return folds


def write_classification_index(root: Path, cases: Sequence[CaseRecord]) -> Path:
    """Write ``labels.txt`` (``<case> <label>`` per line, as LLD-MMRI) and ``datalist.json``
    (``{"training": [...], "test": [...]}``) under ``root``; return the datalist path."""
    root = Path(root)
    with open(root / "labels.txt", "w", encoding="utf-8") as f:
        for c in cases:
            f.write(f"{c.case} {int(c.label)}\n")
    datalist = {
        "name": "LCA-DB lesion classification",
        "labels": {str(i): name for i, name in enumerate(LESION_CLASSES)},
        "training": [datalist_item(c.case, c.label, c.fold) for c in cases if c.fold is not None],
        "test": [datalist_item(c.case, c.label, None) for c in cases if c.fold is None],
    }
    path = root / "datalist.json"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(datalist, f, indent=1)
    return path


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray, dtype: str = "int16") -> None:
    """Write ``[X, Y, Z]`` as NIfTI-1 (gzip), cast to ``dtype`` (rounded and clipped for integer types)."""
    import nibabel as nib

    arr = np.asarray(array)
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        arr = np.clip(np.rint(arr), info.min, info.max)
    img = nib.Nifti1Image(arr.astype(dtype), affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


@contextlib.contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it is renamed to ``target``, on error removed.

    Raises:
        FileExistsError: when ``target`` exists and ``overwrite`` is False.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; the dataset is meant to be shared like any other output folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    logger.debug("wrote %s", target)
