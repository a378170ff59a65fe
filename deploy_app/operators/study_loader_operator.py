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
"""Study loading, strict and lossless: every file of the folder is read, or the run stops naming each bad file.

The SDK's ``DICOMDataLoaderOperator`` logs and skips files it cannot parse, and keeps one instance per slice
position (dropping the others): a dynamic series with several temporal positions or a Dixon series with in-phase,
opposed-phase, water and fat images would lose all but one image per position. This loader keeps every instance;
the phase identification splits such series into volumes and reports real duplicates.
"""

from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.core.domain.dicom_series import DICOMSeries
from monai.deploy.core.domain.dicom_study import DICOMStudy
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from pydicom import dcmread
from pydicom.misc import is_dicom

from ..errors import StudyInputError

__all__ = ["SIDECAR_SUFFIXES", "StudyLoaderOperator", "read_study_folder"]

logger = logging.getLogger(__name__)

#: Files given with a study that are not DICOM (the lesion box file); everything else must be DICOM.
SIDECAR_SUFFIXES = (".json",)
_SKIPPED_NAMES = {"DICOMDIR"}
_STUDY_KEYWORDS = ("StudyID", "StudyDate", "StudyTime", "StudyDescription")
_SERIES_KEYWORDS = (
    "SeriesDate",
    "SeriesTime",
    "Modality",
    "SeriesDescription",
    "BodyPartExamined",
    "PatientPosition",
    "SeriesNumber",
    "Laterality",
)
_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def _copy_attributes(target, ds, keywords) -> None:
    for keyword in keywords:
        if keyword in ds:
            setattr(target, keyword, ds.data_element(keyword).value)


def _truncated_pixel_data(ds) -> str:
    """Why the uncompressed pixel data of ``ds`` is shorter than its header says ("" when it is complete)."""
    if "PixelData" not in ds or ds.file_meta.get("TransferSyntaxUID") is None:
        return ""
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return ""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    expected = (
        int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * frames * int(ds.BitsAllocated) + 7
    ) // 8
    found = len(ds.PixelData)
    return f"has truncated pixel data ({found} of {expected} bytes)" if found < expected else ""


def read_study_folder(folder: Path) -> DICOMStudy:
    """Read every file under ``folder`` (recursively) into one ``DICOMStudy``, keeping every instance.

    Hidden files, ``*.json`` sidecars and ``DICOMDIR`` are skipped; every other file must be a readable DICOM Part 10
    file with SOP Class, SOP Instance, Study and Series Instance UIDs, each SOP instance must appear once, and all
    files must belong to one study.

    Raises:
        StudyInputError: listing every bad file (and the studies found, when there are several).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise StudyInputError(f"input folder {folder} does not exist or is not a folder.")
    problems: list[str] = []
    datasets = []
    seen: dict[str, Path] = {}
    repeats: dict[tuple[Path, Path], list[str]] = {}  # (folder, folder of the first copy) -> file names
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or path.suffix.lower() in SIDECAR_SUFFIXES:
            continue
        if path.name in _SKIPPED_NAMES:
            continue
        if not is_dicom(path):
            problems.append(f"{path} is not a DICOM file (no DICM prefix: corrupt, truncated or not DICOM)")
            continue
        try:
            ds = dcmread(path)
            for _ in ds:  # pydicom parses elements lazily: a corrupt header must fail here, naming the file
                pass
            missing = [keyword for keyword in _REQUIRED if not str(ds.get(keyword, "") or "")]
            truncated = _truncated_pixel_data(ds)
        except Exception as err:  # pydicom raises many types on a corrupt header; each names the file here
            problems.append(f"{path} cannot be read as DICOM: {type(err).__name__}: {err}")
            continue
        if missing:
            problems.append(f"{path} has no {', '.join(missing)} (corrupt or incomplete header)")
            continue
        if truncated:
            problems.append(f"{path} {truncated}")
            continue
        uid = str(ds.SOPInstanceUID)
        if uid in seen:
            repeats.setdefault((path.parent, seen[uid].parent), []).append(f"{path.name} = {seen[uid].name}")
            continue
        seen[uid] = path
        datasets.append(ds)
    for (where, first), names in repeats.items():
        problems.append(
            f"{len(names)} file(s) in {where} repeat the SOP Instance UIDs of files in {first} "
            f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
        )
    if not datasets and not problems:
        problems.append(f"input folder {folder} holds no DICOM file")
    studies = sorted({str(ds.StudyInstanceUID) for ds in datasets})
    if len(studies) > 1:
        problems.append(f"input folder {folder} holds {len(studies)} studies, one is expected: {studies}")
    if problems:
        raise StudyInputError(f"{len(problems)} problem(s) with the study files: " + "; ".join(problems) + ".")

    study = DICOMStudy(studies[0])
    _copy_attributes(study, datasets[0], _STUDY_KEYWORDS)
    series_by_uid: dict[str, DICOMSeries] = {}
    for ds in datasets:
        uid = str(ds.SeriesInstanceUID)
        if uid not in series_by_uid:
            series_by_uid[uid] = DICOMSeries(uid)
            _copy_attributes(series_by_uid[uid], ds, _SERIES_KEYWORDS)
            study.add_series(series_by_uid[uid])
        series_by_uid[uid].add_sop_instance(ds)
    logger.info("Read study %s: %d files, %d series.", studies[0], len(datasets), len(series_by_uid))
    return study


class StudyLoaderOperator(DICOMDataLoaderOperator):
    """Loads the one DICOM study of the input folder with :func:`read_study_folder` (strict, lossless).

    Named input:
        input_folder: optional folder overriding the constructor's ``input_folder``.

    Named output:
        dicom_study_list: a list holding the one ``DICOMStudy`` of the folder.

    Raises (in ``compute``):
        StudyInputError: listing every file that is not readable DICOM, or the studies when there are several.
    """

    def __init__(self, fragment, *args, input_folder: Path, **kwargs) -> None:
        super().__init__(fragment, *args, input_folder=Path(input_folder), must_load=True, **kwargs)

    def load_data_to_studies(self, input_path: Path):
        """The folder's one study, as a one-element list (the SDK loader's output type)."""
        return [read_study_folder(Path(input_path))]
