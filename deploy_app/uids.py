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
"""Deterministic UIDs of what the app writes, derived from everything that shapes its content.

A PACS keeps one object per SOP Instance UID, and many (Orthanc by default, ``OverwriteInstances: false``) keep the
first one they received and answer a later C-STORE of the same UID with Success. So:

- the same inputs must give the same UIDs: a re-run replaces (or is a no-op), it does not add a series;
- changed inputs must give new UIDs: a result with other lesions, phases or weights is a new object that the PACS
  stores beside the old one, never silently dropped behind the old UID.

Each run computes one **content identity** (:func:`content_identity`, available as
``StudyResult.content_identity``): the SHA-256 of the study's StudyInstanceUID, the weights' SHA-256, model name and
version, the images of each phase (SOP Instance UIDs, with frame numbers for multi-frame images), each lesion's id,
source (box file entry, SEG segment, reader's SR) and box on the reference grid, the inference device kind and this
app's version. Every object the app writes derives its UIDs from it and a role (:func:`derived_uid`: ``"sr-series"``,
``"sr-instance"``, ``"attention-instance"``, ``"tracking L1"``, ...), so adding an output object needs only a new role
string. UIDs are the ``2.25.`` form (PS3.5 B.2) of a name-based UUID (RFC 4122 version 5); pydicom's
``generate_uid(prefix=None)`` and highdicom's ``UID()`` are random.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:
    from .domain import StudyResult

__all__ = ["content_identity", "derived_uid", "device_uid"]

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:lcadb-monai:deploy-app:derived-uid")
_DEVICE_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:lcadb-monai:deploy-app:device-uid")


def content_identity(study: StudyResult, app_version: str = __version__) -> str:
    """The SHA-256 (hex) of everything that shapes the content of a run's outputs (see the module docstring).

    Args:
        study: the run's result (lesions with their sources and boxes, the phase volume, the model identity).
        app_version: the app's version (its code shapes the content too).

    Returns:
        64 hexadecimal digits; the same inputs give the same identity.
    """
    volume = study.volume
    facts = {
        "study": str(volume.reference_slices[0].StudyInstanceUID),
        "weights_sha256": study.weights_sha256,
        "model": [study.model_name, study.model_version],
        "phases": {phase: list(images) for phase, images in sorted(volume.phase_images.items())},
        "phase_series": dict(sorted(volume.phase_series_uids.items())),
        "lesions": [
            {
                "id": r.lesion.lesion_id,
                "source": r.lesion.source,
                "box": [int(v) for v in r.lesion.box],
                "segmentation": str(r.lesion.segmentation.SOPInstanceUID) if r.lesion.segmentation else "",
                "segment": r.lesion.segment_number,
                "report": str(r.lesion.source_report.SOPInstanceUID) if r.lesion.source_report else "",
            }
            for r in study.lesions
        ],
        "device": str(study.device).split(":")[0],
        "app_version": app_version,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def derived_uid(identity: str, role: str) -> str:
    """The UID of ``role`` (e.g. ``"sr-instance"``) for the run whose :func:`content_identity` is ``identity``: the
    same identity and role give the same UID, anything else another one (at most 2.25. + 39 digits = 44
    characters, within the 64 of a UI value).

    Raises:
        ValueError: when ``identity`` or ``role`` is empty.
    """
    if not identity or not role:
        raise ValueError(f"identity and role must be non-empty, got {identity!r} and {role!r}.")
    return f"2.25.{uuid.uuid5(_NAMESPACE, f'{identity}|{role}').int}"


def device_uid(weights_sha256: str) -> str:
    """DeviceUID of the algorithm: the same for the same weights, another for other weights."""
    return f"2.25.{uuid.uuid5(_DEVICE_UID_NAMESPACE, weights_sha256).int}"
