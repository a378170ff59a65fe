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
"""LCA-DB bundle code: network, loss, reference checkpoint import, class list and phase order."""

from __future__ import annotations

from .constants import LESION_CLASSES, PHASES
from .loss import LCADBLoss
from .network import LCADB, LCADBInference, LCADBOutput
from .reference_checkpoint import load_reference_state_dict

__all__ = [
    "LCADB",
    "LCADBInference",
    "LCADBLoss",
    "LCADBOutput",
    "LESION_CLASSES",
    "PHASES",
    "load_reference_state_dict",
]
