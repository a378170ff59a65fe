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
"""Study loading, lossless and tolerant of what a PACS export or a CD carries besides the images.

The SDK's ``DICOMDataLoaderOperator`` logs and skips files it cannot parse, and keeps one instance per slice
position (dropping the others): a dynamic series with several temporal positions or a Dixon series with in-phase,
opposed-phase, water and fat images would lose all but one image per position. This loader keeps every instance;
the phase identification splits such series into volumes and reports real duplicates.

What is not needed does not stop the study; each such file is named once in a warning:

- files that are not DICOM (no ``DICM`` prefix: ``README.txt``, ``Thumbs.db``, ``*.xml``; not one named ``*.dcm``,
  ``*.dicom`` or ``*.ima``, which is a damaged image), ``DICOMDIR`` and other media directories, hidden files and
  ``*.json`` sidecars (the lesion box file);
- byte-identical copies of one instance (the same file twice, e.g. from two exports);
- damaged files (a corrupt header, truncated pixel data, the same SOP Instance UID with other content) and files
  in a transfer syntax no installed decoder reads: they are recorded against their series
  (:data:`FILE_PROBLEMS`); the phase identification stops the run, naming the file, when such a series serves a
  phase, and only warns otherwise.

A damaged file whose series cannot be read from it at all (a file named as DICOM without the ``DICM`` prefix
included), several studies in one folder, or a folder without a DICOM image still stop the run here, each file
named.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from monai.deploy.core.domain.dicom_series import DICOMSeries
from monai.deploy.core.domain.dicom_study import DICOMStudy
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from pydicom import dcmread
from pydicom.misc import is_dicom

from ..errors import StudyInputError
from ..phase_identification import FILE_PROBLEMS

__all__ = [
    "DICOM_SUFFIXES",
    "FILE_PROBLEMS",
    "SIDECAR_SUFFIXES",
    "SKIPPED_FILES",
    "StudyLoaderOperator",
    "file_problems",
    "read_study_folder",
    "undecodable_transfer_syntax",
]

logger = logging.getLogger(__name__)

#: Files given with a study that are not DICOM (the lesion box file), skipped without a warning.
SIDECAR_SUFFIXES = (".json",)
#: File names that claim DICOM: such a file without the DICM prefix is damaged, not a stray file.
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
#: Attribute of a loaded ``DICOMStudy``: the files skipped as not needed, each with the reason, in words.
SKIPPED_FILES = "lcadb_skipped_files"
_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
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
_DECODER_PACKAGES = "pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg (or python-gdcm)"


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


def undecodable_transfer_syntax(ds) -> str:
    """Why the pixel data of ``ds`` cannot be decoded here ("" when an installed pydicom pixel-data handler can):
    checked from the transfer syntax alone, before any pixel is decoded."""
    from pydicom.pixels import get_decoder

    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if "PixelData" not in ds or syntax is None:
        return ""
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:
        return f"is in transfer syntax {syntax}, which pydicom cannot decode"
    if available:
        return ""
    return (
        f"is in transfer syntax {syntax} ({syntax.name}) and no installed decoder reads it "
        f"(install {_DECODER_PACKAGES})"
    )


def _read(path: Path) -> tuple[object | None, str, str]:
    """``(dataset, problem, series uid)``: the dataset when the file is usable, else what is wrong with it and, when
    its header says, the series it belongs to."""
    try:
        ds = dcmread(path)
        for _ in ds:  # pydicom parses elements lazily: a corrupt header must fail here, naming the file
            pass
        missing = [keyword for keyword in _REQUIRED if not str(ds.get(keyword, "") or "")]
        problem = (
            f"has no {', '.join(missing)} (corrupt or incomplete header)" if missing else _truncated_pixel_data(ds)
        )
    except Exception as err:  # pydicom raises many types on a corrupt header; each names the file here
        ds, problem = None, f"cannot be read as DICOM: {type(err).__name__}: {err}"
    if not problem:
        return ds, "", str(ds.SeriesInstanceUID)
    series = str(ds.get("SeriesInstanceUID", "") or "") if ds is not None else ""
    if not series:
        try:  # the header up to the series may still be readable (damage in later elements or the pixels)
            series = str(dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)
        except Exception:  # noqa: BLE001 - whatever fails, the series stays unknown and the run stops on the file
            series = ""
    return None, problem, series


def _named(paths: Iterable[str], limit: int = 20) -> str:
    paths = list(paths)
    return ", ".join(paths[:limit]) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def file_problems(series) -> list[str]:
    """What is wrong with the files of one loaded series (damaged files, undecodable pixels), in words."""
    return list(getattr(series, FILE_PROBLEMS, []))


def read_study_folder(folder: Path) -> DICOMStudy:
    """Read every file under ``folder`` (recursively) into one ``DICOMStudy``, keeping every instance.

    What is not needed is skipped with a warning and listed in the study's :data:`SKIPPED_FILES`; damaged and
    undecodable files are recorded in their series' :data:`FILE_PROBLEMS` (see the module docstring).

    Raises:
        StudyInputError: naming every damaged file whose series cannot be told, or the studies when there are
            several, or when the folder holds no DICOM instance.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise StudyInputError(f"input folder {folder} does not exist or is not a folder.")
    problems: list[str] = []
    skipped: dict[str, list[str]] = {}
    damaged: dict[str, list[str]] = {}  # series uid -> "<file> <what is wrong>"
    datasets = []
    seen: dict[str, Path] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or path.suffix.lower() in SIDECAR_SUFFIXES:
            continue
        if path.name.upper() == "DICOMDIR":
            skipped.setdefault("a DICOMDIR (media directory, the images are read from the folder)", []).append(
                str(path)
            )
            continue
        if not is_dicom(path):
            if path.suffix.lower() in DICOM_SUFFIXES:  # named as DICOM: a damaged image, perhaps of a phase
                problems.append(
                    f"{path} is not a DICOM file (no DICM prefix) although its name says so: corrupt or truncated, "
                    "and its series cannot be told, so it may be one of the phases"
                )
            else:
                skipped.setdefault("not DICOM (no DICM prefix)", []).append(str(path))
            continue
        ds, problem, series = _read(path)
        if ds is None:
            if series:
                damaged.setdefault(series, []).append(f"{path} {problem}")
            else:
                problems.append(f"{path} {problem}; its series cannot be told, so it may be one of the phases")
            continue
        if str(ds.get("SOPClassUID", "")) == _MEDIA_DIRECTORY:
            skipped.setdefault("a DICOMDIR (media directory, the images are read from the folder)", []).append(
                str(path)
            )
            continue
        uid = str(ds.SOPInstanceUID)
        if uid in seen:
            if path.read_bytes() == seen[uid].read_bytes():
                skipped.setdefault("a byte-identical copy of another file", []).append(f"{path} (= {seen[uid]})")
            else:
                damaged.setdefault(series, []).append(
                    f"{path} repeats the SOP Instance UID {uid} of {seen[uid]} with other content"
                )
            continue
        seen[uid] = path
        undecodable = undecodable_transfer_syntax(ds)
        if undecodable:
            damaged.setdefault(series, []).append(f"{path} {undecodable}")
        datasets.append(ds)
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
            setattr(series_by_uid[uid], FILE_PROBLEMS, [])
            study.add_series(series_by_uid[uid])
        series_by_uid[uid].add_sop_instance(ds)
    for uid, messages in damaged.items():
        if uid in series_by_uid:
            getattr(series_by_uid[uid], FILE_PROBLEMS).extend(messages)
        number = getattr(series_by_uid.get(uid), "SeriesNumber", "?")
        logger.warning(
            "Series %s (%s): %d file(s) damaged or undecodable; the run stops if the series serves a phase: %s",
            number,
            uid,
            len(messages),
            "; ".join(messages),
        )
    for reason, paths in skipped.items():
        logger.warning("Skipped %d file(s), %s: %s", len(paths), reason, _named(paths))
    setattr(study, SKIPPED_FILES, [f"{path}: {reason}" for reason, paths in skipped.items() for path in paths])
    logger.info("Read study %s: %d files, %d series.", studies[0], len(datasets), len(series_by_uid))
    return study


class StudyLoaderOperator(DICOMDataLoaderOperator):
    """Loads the one DICOM study of the input folder with :func:`read_study_folder` (lossless; files that are not
    needed are skipped with a warning).

    Named input:
        input_folder: optional folder overriding the constructor's ``input_folder``.

    Named output:
        dicom_study_list: a list holding the one ``DICOMStudy`` of the folder.

    Raises (in ``compute``):
        StudyInputError: as :func:`read_study_folder`.
    """

    def __init__(self, fragment, *args, input_folder: Path, **kwargs) -> None:
        super().__init__(fragment, *args, input_folder=Path(input_folder), must_load=True, **kwargs)

    def load_data_to_studies(self, input_path: Path):
        """The folder's one study, as a one-element list (the SDK loader's output type)."""
        return [read_study_folder(Path(input_path))]
