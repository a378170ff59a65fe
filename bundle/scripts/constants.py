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
"""The class list and phase order of LCA-DB: the one place every other component reads them from."""

from __future__ import annotations

__all__ = ["LESION_CLASSES", "PHASES", "PHASE_FILE_NAMES", "ROI_MARGIN", "DEFAULT_ROI_SIZE", "DEFAULT_PATCH_SIZE"]

#: LLD-MMRI2023 lesion classes, index = label.
LESION_CLASSES: tuple[str, ...] = (
    "hepatic_hemangioma",
    "intrahepatic_cholangiocarcinoma",
    "hepatic_abscess",
    "hepatic_metastasis",
    "hepatic_cyst",
    "focal_nodular_hyperplasia",
    "hepatocellular_carcinoma",
)

#: Input channels of the network, index = channel. The reference loader puts C+Delay before C+V
#: (it reads ``C+Delay`` into the slot it calls "pvp"); checkpoints trained by it expect this order.
PHASES: tuple[str, ...] = ("T2WI", "DWI", "In Phase", "Out Phase", "C-pre", "C+A", "C+Delay", "C+V")

#: File stem of each phase in the LLD-MMRI classification layout ``images/<case>/<phase>.nii.gz``.
PHASE_FILE_NAMES: dict[str, str] = {phase: phase for phase in PHASES}

#: Margin added around a lesion box when its ROI is cropped, as in LLD-MMRI2023: (in-plane x, in-plane y, slices).
ROI_MARGIN: tuple[int, int, int] = (16, 16, 2)

#: Network input size (H, W, D) of the paper configuration and the in-plane patch size of PA-Net.
DEFAULT_ROI_SIZE: tuple[int, int, int] = (128, 128, 16)
DEFAULT_PATCH_SIZE: int = 32
