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
"""Builds the official-format LLD-MMRI2023 fixture in this folder (run once; its output is committed).

The layout follows LMMMEng/LLD-MMRI2023 at commit e6809b0 (README.md lines 76-85, main/README.md lines 35-72
and 78-149, main/preprocess/crop_roi.py lines 17-30):

    released/images/<patient>/<studyUID>/<seriesUID>.nii.gz    8 whole volumes per patient (main/README.md 38-48)
    released/labels/Annotation.json                             {"Annotation_info": {patient: [per-phase item]}}
        item: studyUID, seriesUID, phase, pixel_spacing, slice_thickness,
              annotation.lesion.<idx>.category (0..6, -1 = validation, main/README.md 57-70)
              annotation.lesion.<idx>.bbox.3D_box {x_min, y_min, z_min, x_max, y_max, z_max}
    released/labels/labels_val.txt                              validation labels as "<case> <label>" (published after
                                                                the validation stage, README.md line 78)
    released/classification_dataset/images/<case>/<phase>.nii.gz   written by the *official* crop_roi.py
    released/classification_dataset/labels/labels.txt              "<case> <label>" (main/README.md 100-121)
    released/classification_dataset/labels/labels_val_inaccessible.txt   "<case> -1"
    released/classification_dataset/labels/{train,val}_fold{1..5}.txt    written by the *official* gene_cross_val.py
    folds/labels.txt, folds/{train,val}_fold{1..5}.txt          a 40-case labels file in LLD-MMRI proportions and the
                                                                folds the official gene_cross_val.py (seed 66) makes
    official_metrics.json                                       predictions and the official metrics.py scores

Usage (needs numpy, nibabel; SimpleITK and scikit-learn for the official tools; nothing of the official code is
committed here)::

    git -C <mirror of LMMMEng/LLD-MMRI2023> show HEAD:main/preprocess/crop_roi.py > /tmp/official/crop_roi.py  # etc.
    PYTHONPATH=<SimpleITK> python tests/data/lldmmri_official/make_fixture.py --official /tmp/official
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve().parent
PHASES = ("T2WI", "DWI", "In Phase", "Out Phase", "C-pre", "C+A", "C+V", "C+Delay")

#: patient -> lesion labels (lesion 0 first); -1 marks the challenge's validation cases (main/README.md line 70).
PATIENTS: dict[str, list[int]] = {
    "MR210001": [6, 6],
    "MR210002": [0],
    "MR210003": [5],
    "MR210004": [4],
    "MR210005": [3],
    "MR210006": [1],
    "MR210007": [2],
    "MR210008": [-1],
    "MR210009": [-1],
}
#: true labels of the validation cases, as later published
VALIDATION_LABELS = {"MR210008": 6, "MR210009": 0}
#: patient whose NIfTI headers carry 1 mm spacing while Annotation.json has the true spacing (README line 57)
WRONG_HEADER = "MR210003"
#: patient whose C+V box ends one voxel past the image edge in x (crop_roi.py lines 64-73 clip and pad it)
PAST_EDGE = "MR210004"


def _volume(rng: np.random.Generator, shape: tuple[int, int, int], boxes: list[tuple[int, ...]]) -> np.ndarray:
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    vol = 100 + 20 * np.sin(x / 5.0) + 10 * np.cos(y / 7.0) + 3 * z + rng.integers(0, 2, shape)
    for x0, y0, z0, x1, y1, z1 in boxes:
        vol[x0:x1, y0:y1, z0 : z1 + 1] += 150
    return vol.astype(np.int16)


def build_released(root: Path) -> None:
    rng = np.random.default_rng(20230428)
    info: dict[str, list] = {}
    for p, (patient, labels) in enumerate(PATIENTS.items()):
        study = f"1.2.840.113619.2.55.3.{604688119 + p}"
        items = []
        for s, phase in enumerate(PHASES):
            series = f"{study}.{s + 1}"
            shape = (16, 16, 5) if phase == "DWI" else (32, 32, 8)
            spacing = (2.5, 2.5, 8.0) if phase == "DWI" else (1.25, 1.25, 6.0)
            scale = 0.5 if phase == "DWI" else 1.0
            boxes = []
            for i in range(len(labels)):
                cx, cy = (10 + 12 * i) * scale, (12 + 3 * (s % 3)) * scale
                x0, y0 = int(cx), int(cy)
                w = max(int(6 * scale), 2)
                boxes.append((x0, y0, 2 if phase != "DWI" else 1, x0 + w, y0 + w, 4 if phase != "DWI" else 2))
            if patient == PAST_EDGE and phase == "C+V":
                x0, y0, z0, _, y1, z1 = boxes[0]
                boxes[0] = (shape[0] - 5, y0, z0, shape[0] + 1, y1, z1)
            vol = _volume(rng, shape, [(b[0], b[1], b[2], min(b[3], shape[0]), b[4], b[5]) for b in boxes])
            header = (1.0, 1.0, 1.0) if patient == WRONG_HEADER else spacing
            affine = np.diag([-header[0], -header[1], header[2], 1.0])
            folder = root / "images" / patient / study
            folder.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(vol, affine), str(folder / f"{series}.nii.gz"))
            lesions = {
                str(i): {
                    "category": labels[i],
                    "bbox": {"3D_box": dict(zip(("x_min", "y_min", "z_min", "x_max", "y_max", "z_max"), map(int, b)))},
                }
                for i, b in enumerate(boxes)
            }
            items.append(
                {
                    "studyUID": study,
                    "seriesUID": series,
                    "phase": phase,
                    "pixel_spacing": [spacing[1], spacing[0]],  # [row, column] = [y, x], crop_roi.py line 27
                    "slice_thickness": spacing[2],
                    "annotation": {"lesion": lesions},
                }
            )
        info[patient] = items
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "labels" / "Annotation.json").write_text(json.dumps({"Annotation_info": info}, indent=1))
    (root / "labels" / "labels_val.txt").write_text("".join(f"{c} {v}\n" for c, v in VALIDATION_LABELS.items()))
    labels_dir = root / "classification_dataset" / "labels"
    labels_dir.mkdir(parents=True, exist_ok=True)
    train, val = [], []
    for patient, labels in PATIENTS.items():
        for i, label in enumerate(labels):
            case = patient if i == 0 else f"{patient}_{i}"
            (val if label < 0 else train).append(f"{case} {label}\n")
    (labels_dir / "labels.txt").write_text("".join(train))
    (labels_dir / "labels_val_inaccessible.txt").write_text("".join(val))


def build_fold_labels(folder: Path) -> None:
    """40 cases, class counts in the proportions of the 394 labelled LLD-MMRI2023 cases, shuffled order."""
    counts = [5, 3, 3, 4, 6, 3, 16]
    rng = np.random.default_rng(66)
    cases = [(f"MR{300000 + i}", c) for c, n in enumerate(counts) for i in range(c * 100, c * 100 + n)]
    order = rng.permutation(len(cases))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.txt").write_text("".join(f"{cases[i][0]} {cases[i][1]}\n" for i in order))


def official_metrics(official: Path) -> dict:
    """Predictions on a subset where class 2 is absent from truth and prediction, scored by the official metrics.py."""
    sys.path.insert(0, str(official))
    import metrics  # the official main/metrics.py, not committed here

    rng = np.random.default_rng(7)
    target = np.array([0, 0, 1, 1, 3, 3, 4, 4, 5, 5, 6, 6, 6, 6, 0, 1])
    pred = target.copy()
    pred[[3, 9, 12]] = [6, 4, 1]
    logits = rng.normal(0, 1, (len(target), 7))
    logits[np.arange(len(target)), pred] += 6
    logits[:, 2] -= 10
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return {
        "source": "LMMMEng/LLD-MMRI2023@e6809b0 main/metrics.py (F1_score line 16-20, Cohen_Kappa line 10-14, ACC 4-8)",
        "probabilities": prob.tolist(),
        "labels": target.tolist(),
        "f1": float(metrics.F1_score(prob, target)),
        "kappa": float(metrics.Cohen_Kappa(prob, target)),
        "accuracy": float(metrics.ACC(prob, target)),
        "recall": float(metrics.Recall(prob, target)),
        "precision": float(metrics.Precision(prob, target)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="folder with the official main/ scripts")
    args = parser.parse_args()
    for name in ("released", "folds"):
        shutil.rmtree(HERE / name, ignore_errors=True)
    build_released(HERE / "released")
    cls = HERE / "released" / "classification_dataset"
    run = [sys.executable]
    subprocess.run(
        [
            *run,
            str(args.official / "preprocess" / "crop_roi.py"),
            "--data-dir",
            str(HERE / "released" / "images"),
            "--anno-path",
            str(HERE / "released" / "labels" / "Annotation.json"),
            "--save-dir",
            str(cls / "images"),
        ],
        check=True,
    )
    for labels, out in (
        (cls / "labels" / "labels.txt", cls / "labels"),
        (HERE / "folds" / "labels.txt", HERE / "folds"),
    ):
        if labels.parent.name == "folds":
            build_fold_labels(HERE / "folds")
        subprocess.run(
            [
                *run,
                str(args.official / "preprocess" / "gene_cross_val.py"),
                "--lab-path",
                str(labels),
                "--save-dir",
                str(out),
                "--num-folds",
                "5",
                "--seed",
                "66",
            ],
            check=True,
        )
    (HERE / "official_metrics.json").write_text(json.dumps(official_metrics(args.official), indent=1))


if __name__ == "__main__":
    main()
