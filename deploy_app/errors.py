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
"""Errors the app reports to its user with a clear message and a non-zero exit status."""

from __future__ import annotations

__all__ = ["ModelPackageError", "PACSSendError", "StudyInputError"]


class StudyInputError(ValueError):
    """The study given to the app cannot be processed: the message names the phase, series, lesion or file."""


class ModelPackageError(ValueError):
    """The model given with ``-m`` / ``HOLOSCAN_MODEL_PATH`` is not a usable LCA-DB TorchScript export."""


class PACSSendError(RuntimeError):
    """The SR was written but could not be sent to a configured PACS destination."""
