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
"""Deterministic UIDs of what the app writes.

A re-run on the same study with the same model must replace what a PACS already holds, not add a second SR
series, so every UID the app writes is the ``2.25.`` form (PS3.5 B.2) of a name-based UUID (RFC 4122 version 5)
of the study's StudyInstanceUID, the SHA-256 of the model's weights and the role of the UID ("sr-series",
"sr-instance", "tracking L1", ...). (pydicom's ``generate_uid(prefix=None)`` and highdicom's ``UID()`` are random.)
"""

from __future__ import annotations

import uuid

__all__ = ["derived_uid", "device_uid"]

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:lcadb-monai:deploy-app:derived-uid")
_DEVICE_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:lcadb-monai:deploy-app:device-uid")


def derived_uid(study_instance_uid: str, weights_sha256: str, role: str) -> str:
    """The UID of ``role`` for this study and these weights: the same inputs give the same UID, any change of one
    gives another (at most 2.25. + 39 digits = 44 characters, within the 64 of a UI value)."""
    return f"2.25.{uuid.uuid5(_NAMESPACE, '|'.join((study_instance_uid, weights_sha256, role))).int}"


def device_uid(weights_sha256: str) -> str:
    """DeviceUID of the algorithm: the same for the same weights, another for other weights."""
    return f"2.25.{uuid.uuid5(_DEVICE_UID_NAMESPACE, weights_sha256).int}"
