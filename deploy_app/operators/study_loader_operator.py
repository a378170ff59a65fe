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
"""Study loading: the SDK's DICOM loader, made strict about unreadable files and about one study per run."""

from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from pydicom.misc import is_dicom

from ..errors import StudyInputError

__all__ = ["SIDECAR_SUFFIXES", "StudyLoaderOperator"]

#: Files given with a study that are not DICOM (the lesion box file); everything else must be DICOM.
SIDECAR_SUFFIXES = (".json",)


class StudyLoaderOperator(DICOMDataLoaderOperator):
    """Loads the one DICOM study of the input folder.

    The SDK loader logs and skips files it cannot parse; a hospital study with a broken file must instead be
    reported, so every file that is not a sidecar (``*.json``) or hidden must be a DICOM Part 10 file.

    Named input:
        input_folder: optional folder overriding the constructor's ``input_folder``.

    Named output:
        dicom_study_list: a list holding the one ``DICOMStudy`` of the folder.

    Raises (in ``compute``):
        StudyInputError: naming the file that is not DICOM, or listing the studies when there are several.
    """

    def __init__(self, fragment, *args, input_folder: Path, **kwargs) -> None:
        self._strict_logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        super().__init__(fragment, *args, input_folder=Path(input_folder), must_load=True, **kwargs)

    def load_data_to_studies(self, input_path: Path):
        """Load the folder; see the class docstring for the extra checks."""
        input_path = Path(input_path)
        if not input_path.is_dir():
            raise StudyInputError(f"input folder {input_path} does not exist or is not a folder.")
        studies = super().load_data_to_studies(input_path)
        if len(studies) != 1:
            uids = [study.StudyInstanceUID for study in studies]
            raise StudyInputError(f"input folder {input_path} holds {len(studies)} studies, one is expected: {uids}.")
        self._strict_logger.info(
            "Loaded study %s: %d series.", studies[0].StudyInstanceUID, len(studies[0].get_all_series())
        )
        return studies

    def _load_data(self, files: list[str]):
        dicom_files = []
        for file in sorted(files):
            path = Path(file)
            if path.name.startswith(".") or path.suffix.lower() in SIDECAR_SUFFIXES:
                continue
            if not is_dicom(path):
                raise StudyInputError(
                    f"{path} is not a DICOM file (no DICM prefix; corrupt, truncated or not DICOM): "
                    "remove it from the study folder."
                )
            dicom_files.append(file)
        if not dicom_files:
            raise StudyInputError("the input folder holds no DICOM file.")
        return super()._load_data(dicom_files)
