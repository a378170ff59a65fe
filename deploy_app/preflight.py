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
"""What the app checks before it reads a study (fail fast), and the per-stage timing of its log.

Reading and resampling a study takes tens of seconds; a model file without its metadata, an output folder that
cannot be written or a PACS block with a missing key must stop the run before that, each with its own message.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import time
import zipfile
from pathlib import Path

from .bundle_access import INFERENCE_CONFIG, PREPROCESSING_ID, find_model_files
from .errors import ModelPackageError, StudyInputError

__all__ = ["check_model_package", "check_output_folder", "timed_stage"]

logger = logging.getLogger(__name__)


def check_model_package(path: Path) -> list[Path]:
    """The model files of ``path`` (one, or the members of an ensemble; see
    :func:`deploy_app.bundle_access.find_model_files`), each checked without loading the network: a TorchScript
    archive embedding the bundle's ``metadata.json`` (name, version, class names) and its ``inference.json`` (with
    the ``image_preprocessing`` id).

    Raises:
        ModelPackageError: naming the file and what is missing from it.
    """
    return [_check_model_file(file) for file in find_model_files(Path(path))]


def _check_model_file(file: Path) -> Path:
    try:
        with zipfile.ZipFile(file) as archive:
            extra = {
                Path(name).name: archive.read(name)
                for name in archive.namelist()
                if Path(name).parent.name == "extra" and Path(name).name in ("metadata.json", INFERENCE_CONFIG)
            }
    except (OSError, zipfile.BadZipFile) as err:
        raise ModelPackageError(f"cannot read the model archive {file}: {err}") from err
    try:
        metadata = json.loads(extra["metadata.json"])
        channels = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
        if not (metadata.get("name") and metadata.get("version") and channels):
            raise KeyError("name, version or channel_def")
    except (KeyError, TypeError, ValueError) as err:
        raise ModelPackageError(
            f"{file} has no usable embedded bundle metadata ({err}): export it with "
            "'python -m monai.bundle ckpt_export ... --meta_file configs/metadata.json'."
        ) from err
    try:
        config = json.loads(extra[INFERENCE_CONFIG])
    except (KeyError, ValueError) as err:
        raise ModelPackageError(
            f"{file} has no usable embedded {INFERENCE_CONFIG} ({err}): export it with "
            "'python -m monai.bundle ckpt_export ... --config_file configs/inference.json'."
        ) from err
    if PREPROCESSING_ID not in config:
        raise ModelPackageError(f"the inference config embedded in {file} has no {PREPROCESSING_ID!r} id.")
    return file


def check_output_folder(folder: Path) -> Path:
    """Create ``folder`` when needed and check that a file can be written there (the probe file is removed).

    Raises:
        StudyInputError: naming the folder and the operating system's reason.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".lcadb-write-check-"):
            pass
    except OSError as err:
        raise StudyInputError(f"output folder {folder} cannot be written: {err}") from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StudyInputError(f"output folder {folder} cannot be written (no write permission).")
    return folder


@functools.cache
def timed_stage(cls: type) -> type:
    """A subclass of the operator class ``cls`` whose ``compute`` logs one INFO line ``stage <name>  <seconds> s``
    (or ``failed after``) each time it finishes; same name, docstring and behaviour otherwise.

    Holoscan binds ``compute`` when the operator is constructed, so the timing must be in the class the operator is
    built from: ``timed_stage(MyOperator)(fragment, ..., name="my_op")``.
    """

    def compute(self, op_input, op_output, context):
        stage = str(self.name).removesuffix("_op")
        start = time.perf_counter()
        try:
            result = cls.compute(self, op_input, op_output, context)
        except BaseException:
            logger.info("stage %-13s failed after %.2f s", stage, time.perf_counter() - start)
            raise
        logger.info("stage %-13s %.2f s", stage, time.perf_counter() - start)
        return result

    return type(cls.__name__, (cls,), {"compute": compute, "__doc__": cls.__doc__, "__module__": cls.__module__})
