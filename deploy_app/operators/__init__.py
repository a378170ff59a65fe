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
"""Operators of the LCA-DB deploy app, one job each."""

from __future__ import annotations

from .inference_operator import LCADBInferenceOperator
from .lesion_roi_operator import LesionROIOperator
from .pacs_sender_operator import PACSSenderOperator
from .phase_selector_operator import PhaseSelectorOperator
from .phase_volume_operator import PhaseVolumeOperator
from .sr_writer_operator import ClassificationSRWriterOperator
from .study_loader_operator import StudyLoaderOperator

__all__ = [
    "ClassificationSRWriterOperator",
    "LCADBInferenceOperator",
    "LesionROIOperator",
    "PACSSenderOperator",
    "PhaseSelectorOperator",
    "PhaseVolumeOperator",
    "StudyLoaderOperator",
]
