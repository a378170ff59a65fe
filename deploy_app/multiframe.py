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
"""Enhanced and Legacy Converted Enhanced MR images (one multi-frame file per series) as single-frame datasets.

An Enhanced MR Image (PS3.3 A.36.2, C.8.13.1) or a Legacy Converted Enhanced MR Image (A.71) stores a whole
series, often several stacks or temporal positions, in one instance: what a classic MR image says in its own header
(position, orientation, pixel spacing, echo and repetition time, ImageType, acquisition time, contrast) is in the
Multi-frame Functional Groups (C.7.6.16): the Shared Functional Groups Sequence for what all frames share, the
Per-frame Functional Groups Sequence for the rest. :func:`frames_of` gives each frame as a :class:`FrameDataset`
holding the instance's own attributes, then the shared groups, then the frame's groups, flattened (each group
macro's one item merged into the dataset), plus the classic name of what the functional groups name differently:

================================================ ============================== =============================
functional group macro (PS3.3)                   attribute                      classic attribute
================================================ ============================== =============================
MR Image Frame Type (C.8.13.5.1)                 FrameType                      ImageType
MR Echo (C.8.13.5.4)                             EffectiveEchoTime              EchoTime
Frame Content (C.7.6.16.2.2)                     FrameAcquisitionDateTime       AcquisitionDateTime
Frame Content (C.7.6.16.2.2)                     TemporalPositionIndex          TemporalPositionIdentifier
Contrast/Bolus Usage (C.7.6.16.2.12)             ContrastBolusAgentAdministered ContrastBolusAgent (YES: the
                                                                                agent of C.7.6.4b)
Enhanced Contrast/Bolus (C.7.6.4b), Contrast     ContrastBolusStartTime         ContrastBolusStartTime
Administration Profile Sequence
================================================ ============================== =============================

Pixel Measures, Plane Position, Plane Orientation (C.7.6.16.2.1, .3, .4), MR Timing and Related Parameters
(C.8.13.5.2), MR Diffusion (C.8.13.5.9), Pixel Value Transformation (C.7.6.16.2.9) and the Legacy Converted
instances' Unassigned Shared / Per-frame Converted Attributes macros (C.7.6.16.2) carry the classic keywords
already. The rest of the app (phase identification, volume assembly) then reads a multi-frame series exactly as a
single-frame one; a frame's pixels are decoded from its instance, once for all frames.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

__all__ = [
    "MULTIFRAME_MR_STORAGE",
    "FrameDataset",
    "describe_image",
    "frame_number",
    "frame_numbers",
    "frames_of",
    "segmentation_sources",
    "source_instance",
    "unique_instances",
]

#: Enhanced MR Image Storage and Legacy Converted Enhanced MR Image Storage (PS3.4 B.5).
MULTIFRAME_MR_STORAGE = {"1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.4"}

_NOT_COPIED = {
    "PixelData",
    "FloatPixelData",
    "DoubleFloatPixelData",
    "NumberOfFrames",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
}
# functional-group attribute -> classic attribute of the same meaning (see the module docstring)
_CLASSIC_NAMES = {
    "FrameType": "ImageType",
    "EffectiveEchoTime": "EchoTime",
    "FrameAcquisitionDateTime": "AcquisitionDateTime",
    "TemporalPositionIndex": "TemporalPositionIdentifier",
}
# per-frame values that replace the instance-level ones (ImageType value 3 "MIXED", the acquisition's start)
_OVERRIDING = ("FrameType", "FrameAcquisitionDateTime")
_FRAMES_CACHE_ATTRIBUTE = "_lcadb_frames"


class FrameDataset(Dataset):
    """One frame of a multi-frame image as a single-frame dataset (see the module docstring).

    Attributes:
        source: the multi-frame instance.
        frame_number: the frame's number in it (1-based, as Referenced Frame Number).
    """

    def __init__(self, source: Dataset, frame_number: int) -> None:
        super().__init__()
        self.source = source
        self.frame_number = int(frame_number)

    @property
    def pixel_array(self) -> np.ndarray:
        """The frame's pixels, decoded with its instance's other frames the first time one is asked for."""
        frames = self.source.pixel_array
        return frames[self.frame_number - 1] if int(self.source.get("NumberOfFrames", 1) or 1) > 1 else frames


def _merge_group(target: Dataset, group: Dataset) -> None:
    """Merge one functional-groups item (a set of macro sequences) into ``target``: each macro's single item
    is merged attribute by attribute; a macro with several items (e.g. one per contrast agent) is kept whole."""
    for element in group:
        if element.VR == "SQ" and len(element.value) == 1:
            for inner in element.value[0]:
                target[inner.tag] = inner
        else:
            target[element.tag] = element


def _replace(frame: Dataset, keyword: str, value) -> None:
    """Set ``keyword`` on ``frame`` as a new element: the frame's other elements are its instance's own objects,
    shared by every frame (copies would multiply an instance's large private headers by its frame count)."""
    frame.pop(keyword, None)
    setattr(frame, keyword, value)


def _contrast(frame: Dataset, instance: Dataset) -> None:
    """Classic ContrastBolusAgent / ContrastBolusStartTime of a frame from its Contrast/Bolus Usage (C.7.6.16.2.12)
    and the instance's Enhanced Contrast/Bolus module (C.7.6.4b)."""
    usage = frame.get("ContrastBolusUsageSequence")
    items = list(usage) if isinstance(usage, DicomSequence) else [frame]
    administered = {
        int(item.get("ContrastBolusAgentNumber", 0) or 0)
        for item in items
        if item.get("ContrastBolusAgentAdministered") == "YES"
    }
    phases = [str(item.ContrastBolusAgentPhase) for item in items if item.get("ContrastBolusAgentPhase")]
    if phases and "ContrastBolusAgentPhase" not in frame:
        _replace(frame, "ContrastBolusAgentPhase", phases[0])
    if not administered:
        if items and any("ContrastBolusAgentAdministered" in item for item in items):
            frame.pop("ContrastBolusAgent", None)
        return
    for agent in instance.get("ContrastBolusAgentSequence", []):
        if int(agent.get("ContrastBolusAgentNumber", 0) or 0) not in administered:
            continue
        _replace(frame, "ContrastBolusAgent", str(agent.get("CodeMeaning", "") or "contrast agent")[:64])
        for profile in agent.get("ContrastAdministrationProfileSequence", []):
            if profile.get("ContrastBolusStartTime"):
                _replace(frame, "ContrastBolusStartTime", profile.ContrastBolusStartTime)
                break
    if "ContrastBolusAgent" not in frame:
        _replace(frame, "ContrastBolusAgent", "contrast agent")


def _flatten(instance: Dataset, number: int, shared: Dataset | None, own: Dataset | None) -> FrameDataset:
    frame = FrameDataset(instance, number)
    for element in instance:
        if element.keyword not in _NOT_COPIED:
            frame[element.tag] = element
    for group in (shared, own):
        if group is not None:
            _merge_group(frame, group)
    for keyword, classic in _CLASSIC_NAMES.items():
        if keyword in frame and (classic not in frame or keyword in _OVERRIDING):
            value = frame.data_element(keyword).value
            _replace(frame, classic, f"{value:.10g}" if keyword == "EffectiveEchoTime" else value)
    _contrast(frame, instance)
    frame.file_meta = instance.file_meta
    if getattr(instance, "filename", None):
        frame.filename = instance.filename
    return frame


def frames_of(ds: Dataset) -> list[Dataset]:
    """The images of one instance: ``[ds]`` for a single-frame image, one :class:`FrameDataset` per frame of an
    Enhanced or Legacy Converted Enhanced MR image (built once per instance, then reused)."""
    if str(ds.get("SOPClassUID", "")) not in MULTIFRAME_MR_STORAGE or "PerFrameFunctionalGroupsSequence" not in ds:
        return [ds]
    cached = getattr(ds, _FRAMES_CACHE_ATTRIBUTE, None)
    if cached is None:
        shared_groups = ds.get("SharedFunctionalGroupsSequence")
        shared = shared_groups[0] if shared_groups else None
        per_frame = ds.PerFrameFunctionalGroupsSequence
        cached = [_flatten(ds, k, shared, per_frame[k - 1]) for k in range(1, int(ds.NumberOfFrames) + 1)]
        object.__setattr__(ds, _FRAMES_CACHE_ATTRIBUTE, cached)
    return cached


def source_instance(ds: Dataset) -> Dataset:
    """The stored instance an image comes from (the multi-frame instance of a :class:`FrameDataset`)."""
    return ds.source if isinstance(ds, FrameDataset) else ds


def frame_number(ds: Dataset) -> int | None:
    """Referenced Frame Number of an image: its frame in a multi-frame instance, None for a single-frame image."""
    return ds.frame_number if isinstance(ds, FrameDataset) else None


def describe_image(ds: Dataset) -> str:
    """An image in words for messages: its file (and frame), else its SOP Instance UID."""
    where = str(getattr(ds, "filename", None) or f"SOP instance {ds.get('SOPInstanceUID', '?')}")
    number = frame_number(ds)
    return f"{where} frame {number}" if number is not None else where


def unique_instances(datasets: Sequence[Dataset]) -> list[Dataset]:
    """The stored instances behind ``datasets`` (frames replaced by their instance), each once, in order."""
    seen: dict[str, Dataset] = {}
    for ds in datasets:
        instance = source_instance(ds)
        seen.setdefault(str(instance.SOPInstanceUID), instance)
    return list(seen.values())


def frame_numbers(ds: Dataset) -> list[int] | None:
    """Referenced Frame Number(s) of an image for an SR or SEG reference (None for a single-frame image)."""
    number = frame_number(ds)
    return None if number is None else [number]


def segmentation_sources(images: Sequence[Dataset]) -> tuple[list[Dataset], list | None]:
    """Source images and plane positions of a SEG whose frame ``k`` lies on ``images[k]``, as highdicom's
    ``Segmentation`` takes them: the images and no positions for single-frame images; for frames of one multi-frame
    instance, that instance and each frame's position (highdicom then references every frame of the instance at
    that position: the frame itself, and the other volumes' frames there when the instance holds several).

    Raises:
        ValueError: when the images are frames of several instances, or frames mixed with single-frame images.
    """
    from highdicom import PlanePositionSequence

    numbers = [frame_number(ds) for ds in images]
    if all(number is None for number in numbers):
        return list(images), None
    instances = {str(source_instance(ds).SOPInstanceUID) for ds in images}
    if None in numbers or len(instances) != 1:
        raise ValueError(f"the images must be frames of one multi-frame instance, got {len(instances)} instances.")
    positions = [
        PlanePositionSequence("PATIENT", image_position=[float(v) for v in ds.ImagePositionPatient]) for ds in images
    ]
    return [source_instance(images[0])], positions
