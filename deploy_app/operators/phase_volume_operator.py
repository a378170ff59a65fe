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
"""Assembly of the 8 selected series into one ``[8, X, Y, Z]`` volume on the reference (C+A) grid.

Each series becomes a volume with its own geometry (orientation, pixel spacing, matrix, slice spacing), then
is resampled onto the grid of the reference phase with MONAI ``SpatialResample`` (trilinear, zero outside the
series' field of view). The reference is the arterial phase (C+A): it is the phase the lesion types are told
apart on, it is usually a thin-slice 3D gradient-echo acquisition (finer through-plane than T2WI or DWI), and the
other contrast phases usually share its geometry, so four of the eight phases need no interpolation.

The SDK's ``DICOMSeriesToVolumeOperator`` is not used: its affine scales the row direction by PixelSpacing[0]
(the spacing *between rows*), which is wrong for non-square pixels, and it yields one ``Image`` per run.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from monai.deploy.core import Fragment, Operator, OperatorSpec
from monai.deploy.core.domain.dicom_series_selection import StudySelectedSeries
from pydicom.dataset import Dataset
from pydicom.pixels import apply_rescale

from ..domain import PhaseVolume
from ..errors import StudyInputError
from ..multiframe import describe_image, frame_number, unique_instances

__all__ = ["REFERENCE_PHASE", "PhaseVolumeOperator", "assemble_phases", "series_geometry", "series_volume"]

#: Phase whose series defines the common grid (see the module docstring).
REFERENCE_PHASE = "C+A"

_ORIENTATION_TOL = 1e-3  # direction cosines
_SPACING_TOL = 0.01  # relative slice-spacing variation accepted as regular


def _image_key(ds: Dataset) -> str:
    number = frame_number(ds)
    return str(ds.SOPInstanceUID) + (f":{number}" if number is not None else "")


def series_geometry(datasets: list[Dataset], label: str) -> tuple[np.ndarray, list[Dataset]]:
    """Affine (voxel index -> LPS mm) of one image set and its images sorted by slice (ascending along the slice
    normal); the pixel data is not read. The images are single-frame instances or frames of a multi-frame instance
    (:func:`deploy_app.multiframe.frames_of`).

    ``label`` starts every error message, e.g. ``"phase 'C+A'"``.

    Raises:
        StudyInputError: naming the phase and file when geometry tags are missing or inconsistent, or the slices
            are not evenly spaced.
    """
    if len(datasets) < 2:
        raise StudyInputError(f"{label}: the series has {len(datasets)} image, a volume needs at least 2.")
    first = datasets[0]
    for ds in datasets:
        for keyword in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns"):
            if keyword not in ds:
                raise StudyInputError(f"{label}: {describe_image(ds)} has no {keyword}.")
        if int(getattr(ds, "NumberOfFrames", 1) or 1) != 1:
            raise StudyInputError(f"{label}: {describe_image(ds)} is a multi-frame image of an unsupported kind.")
        same_iop = np.allclose(
            np.asarray(ds.ImageOrientationPatient, float),
            np.asarray(first.ImageOrientationPatient, float),
            atol=_ORIENTATION_TOL,
        )
        if not same_iop or (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise StudyInputError(f"{label}: {describe_image(ds)} differs in orientation or matrix from the series.")
        if not np.allclose(np.asarray(ds.PixelSpacing, float), np.asarray(first.PixelSpacing, float)):
            raise StudyInputError(f"{label}: {describe_image(ds)} differs in pixel spacing from the series.")

    iop = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    ordered = sorted(datasets, key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))
    positions = np.array([np.asarray(ds.ImagePositionPatient, float) for ds in ordered])
    steps = np.diff(positions, axis=0)
    distances = steps @ normal
    if np.any(distances <= 1e-6):
        dup = ordered[int(np.argmin(distances)) + 1]
        raise StudyInputError(f"{label}: two slices share one position ({describe_image(dup)}).")
    if np.ptp(distances) > _SPACING_TOL * float(np.mean(distances)):
        raise StudyInputError(
            f"{label}: slices are not evenly spaced (spacing {distances.min():.3f}..{distances.max():.3f} mm)."
        )

    spacing = np.asarray(first.PixelSpacing, dtype=np.float64)  # [between rows, between columns]
    affine = np.eye(4)
    affine[:3, 0] = row_dir * spacing[1]  # x = column index, along the row direction
    affine[:3, 1] = col_dir * spacing[0]  # y = row index, along the column direction
    affine[:3, 2] = (positions[-1] - positions[0]) / (len(ordered) - 1)
    affine[:3, 3] = positions[0]
    return affine, ordered


def series_volume(datasets: list[Dataset], label: str) -> tuple[np.ndarray, np.ndarray, list[Dataset]]:
    """Volume ``[X, Y, Z]`` (float32, modality LUT applied), affine and sorted instances of one series
    (see :func:`series_geometry`).

    Raises:
        StudyInputError: naming the phase and file, as :func:`series_geometry` or when pixel data cannot be decoded.
    """
    affine, ordered = series_geometry(datasets, label)
    planes = []
    for ds in ordered:
        try:
            planes.append(np.asarray(apply_rescale(ds.pixel_array, ds), dtype=np.float32))
        except Exception as err:  # pydicom raises several types for broken pixel data
            raise StudyInputError(f"{label}: cannot decode the pixel data of {describe_image(ds)}: {err}") from err
    volume = np.stack(planes, axis=0).transpose(2, 1, 0)  # [Z, rows, cols] -> [X=cols, Y=rows, Z]
    return np.ascontiguousarray(volume), affine, ordered


def assemble_phases(
    study_selected_series: StudySelectedSeries, phases: tuple[str, ...], reference_phase: str = REFERENCE_PHASE
) -> PhaseVolume:
    """Resample the selected series of every phase onto the reference phase's grid.

    Args:
        study_selected_series: the phase selector's output, one selected series per phase.
        phases: phase names in network channel order.
        reference_phase: phase whose grid is used.

    Raises:
        StudyInputError: for a missing phase, series in different Frames of Reference (naming the phases), or
            any error of :func:`series_volume`.
    """
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    by_phase = {s.selection_name: s.series for s in study_selected_series.selected_series}
    missing = [p for p in phases if p not in by_phase]
    if missing:
        raise StudyInputError(f"phases {missing} have no selected series.")
    if reference_phase not in phases:
        raise ValueError(f"reference_phase must be one of {phases}, got {reference_phase!r}.")

    datasets = {p: [inst.get_native_sop_instance() for inst in by_phase[p].get_sop_instances()] for p in phases}
    frames = {p: {str(getattr(ds, "FrameOfReferenceUID", "")) for ds in dsets} for p, dsets in datasets.items()}
    for phase, uids in frames.items():
        if len(uids) != 1 or "" in uids:
            raise StudyInputError(f"phase {phase!r}: its images do not share one FrameOfReferenceUID ({sorted(uids)}).")
    reference_for = next(iter(frames[reference_phase]))
    others = {p: next(iter(u)) for p, u in frames.items() if next(iter(u)) != reference_for}
    if others:
        raise StudyInputError(
            f"phases {sorted(others)} are in a different Frame of Reference than {reference_phase} "
            f"({reference_for}): {others}. The phases cannot be aligned without registration."
        )

    ref_volume, ref_affine, ref_slices = series_volume(datasets[reference_phase], f"phase {reference_phase!r}")
    resample = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float32)
    dst_affine = torch.as_tensor(ref_affine, dtype=torch.float64)
    channels = []
    for phase in phases:
        if phase == reference_phase:
            channels.append(ref_volume)
            continue
        volume, affine, _ = series_volume(datasets[phase], f"phase {phase!r}")
        image = MetaTensor(torch.from_numpy(volume)[None], affine=torch.as_tensor(affine, dtype=torch.float64))
        out = resample(image, dst_affine=dst_affine, spatial_size=ref_volume.shape)
        channels.append(out[0].numpy())
    return PhaseVolume(
        image=np.stack(channels, axis=0).astype(np.float32, copy=False),
        affine=ref_affine,
        reference_phase=reference_phase,
        reference_slices=ref_slices,
        frame_of_reference_uid=reference_for,
        phase_series_uids={p: str(by_phase[p].SeriesInstanceUID) for p in phases},
        source_datasets=unique_instances([ds for p in phases for ds in datasets[p]]),
        study_datasets=[
            inst.get_native_sop_instance()
            for series in study_selected_series.study.get_all_series()
            for inst in series.get_sop_instances()
        ],
        phase_images={p: sorted(_image_key(ds) for ds in datasets[p]) for p in phases},
        phase_sources={
            p: by_phase[p].image_set.label for p in phases if getattr(by_phase[p], "image_set", None) is not None
        },
    )


class PhaseVolumeOperator(Operator):
    """Builds the 8-phase volume of a study on the reference grid (see the module docstring).

    Named input:
        study_selected_series_list: the phase selector's output.

    Named output:
        phase_volume: a :class:`deploy_app.domain.PhaseVolume`.
    """

    def __init__(
        self, fragment: Fragment, *args, phases: tuple[str, ...], reference_phase: str = REFERENCE_PHASE, **kwargs
    ):
        self.phases = tuple(phases)
        self.reference_phase = reference_phase
        self.input_name_selection = "study_selected_series_list"
        self.output_name_volume = "phase_volume"
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input(self.input_name_selection)
        spec.output(self.output_name_volume)

    def compute(self, op_input, op_output, context):
        selection = op_input.receive(self.input_name_selection)
        if not selection or not isinstance(selection[0], StudySelectedSeries):
            raise ValueError(f"{self.input_name_selection} must be a non-empty list of StudySelectedSeries.")
        volume = assemble_phases(selection[0], self.phases, self.reference_phase)
        self._logger.info(
            "Phases resampled onto the %s grid %s (frame of reference %s).",
            self.reference_phase,
            volume.spatial_shape,
            volume.frame_of_reference_uid,
        )
        op_output.emit(volume, self.output_name_volume)
