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
"""Synthetic multi-phase liver MRI studies as DICOM, for the deploy app.

One study = 8 MR Image Storage series sharing one Frame of Reference (full field of view; DWI coarser with thicker
slices), a DICOM SEG (highdicom) with one segment per lesion referencing the C+A series, and
``ground_truth.json``. Images come from the same phantom core as the NIfTI datasets (``_synth_phantom``).
SeriesDescription names the phase in one of several vendor styles: :data:`SERIES_DESCRIPTIONS`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import _synth_phantom as core
from ._synth_io import atomic_directory
from ._synth_phantom import REFERENCE_PHASE, get_site
from .constants import LESION_CLASSES, PHASES
from .roi import box_from_mask

if TYPE_CHECKING:
    from .synthetic import SynthOptions

__all__ = [
    "LAYOUTS",
    "NAMING_STYLES",
    "SERIES_DESCRIPTIONS",
    "VENDOR_STYLES",
    "LesionTruth",
    "StudyTruth",
    "VendorStyle",
    "generate_dicom_study",
]

logger = logging.getLogger(__name__)

#: SeriesDescription per naming style and phase (exact strings; the deploy app matches them with regexes).
SERIES_DESCRIPTIONS: dict[str, dict[str, str]] = {
    "siemens": {
        "T2WI": "t2_haste_fs_tra_mbh",
        "DWI": "ep2d_diff_b50_800_tra_TRACEW",
        "In Phase": "t1_vibe_dixon_tra_in",
        "Out Phase": "t1_vibe_dixon_tra_opp",
        "C-pre": "t1_vibe_fs_tra_pre",
        "C+A": "t1_vibe_fs_tra_arterial",
        "C+V": "t1_vibe_fs_tra_portal_venous",
        "C+Delay": "t1_vibe_fs_tra_delay_3min",
    },
    "ge": {
        "T2WI": "Ax T2 FRFSE FS",
        "DWI": "Ax DWI b800",
        "In Phase": "Ax LAVA-Flex InPhase",
        "Out Phase": "Ax LAVA-Flex OutPhase",
        "C-pre": "Ax LAVA Pre",
        "C+A": "Ax LAVA Arterial",
        "C+V": "Ax LAVA Portal Venous",
        "C+Delay": "Ax LAVA Delayed 3min",
    },
    "philips": {
        "T2WI": "T2W_TSE_SPAIR_TRA",
        "DWI": "DWI_b0_800_TRA",
        "In Phase": "T1W_mDIXON_IP_TRA",
        "Out Phase": "T1W_mDIXON_OP_TRA",
        "C-pre": "eTHRIVE_PRE_TRA",
        "C+A": "eTHRIVE_ART_TRA",
        "C+V": "eTHRIVE_PV_TRA",
        "C+Delay": "eTHRIVE_DELAY_TRA",
    },
    "canon": {
        "T2WI": "FASE2D T2 FS AX",
        "DWI": "DWI b800 AX",
        "In Phase": "FFE2D DUAL ECHO IN",
        "Out Phase": "FFE2D DUAL ECHO OUT",
        "C-pre": "QUICK3D FS AX nativ",
        "C+A": "QUICK3D FS AX ART",
        "C+V": "QUICK3D FS AX PV",
        "C+Delay": "QUICK3D FS AX 3 min",
    },
    "uih": {
        "T2WI": "t2_fse_tra_fs_mbh",
        "DWI": "epi_dwi_tra_b50_800",
        "In Phase": "t1_gre_dual_tra_ip",
        "Out Phase": "t1_gre_dual_tra_op",
        "C-pre": "t1_quick3d_tra_fs_pre",
        "C+A": "t1_quick3d_tra_fs_ap",
        "C+V": "t1_quick3d_tra_fs_pvp",
        "C+Delay": "t1_quick3d_tra_fs_5min",
    },
    "lldmmri": {phase: phase for phase in PHASES},
}

NAMING_STYLES: tuple[str, ...] = tuple(SERIES_DESCRIPTIONS)


@dataclass(frozen=True)
class VendorStyle:
    """How one scanner vendor writes what the deploy app reads (conventions and sources: deploy_app/README.md,
    "Vendor conventions").

    Attributes:
        manufacturer: Manufacturer (0008,0070); None = the site profile's.
        model_name: ManufacturerModelName; None = the site profile's.
        image_type: ImageType per kind of image: ``se`` (T2), ``gre`` (T1 gradient echo), ``dwi``, ``in``/``opp``
            (Dixon in/opposed phase), ``water``/``fat``, ``adc``, ``sub``, ``mip``, ``loc`` (localizer).
        b_value: where the b-value goes: ``"standard"`` (DiffusionBValue, plus a Canon ``b=`` image comment),
            or ``(group, private creator, element offset, VR)``; None = nowhere (names only).
        temporal: how a single-series dynamic numbers its volumes: ``"position"`` (TemporalPositionIdentifier),
            ``"trigger"`` (TriggerTime) or ``"time"`` (AcquisitionTime only). (dciodvfy refuses TriggerTime on an
            ungated MR image, so no style uses ``"trigger"``; the app's TriggerTime split is unit-tested.)
        sequence_names: SequenceName (0018,0024) per kind (``se``, ``dwi``, ``dixon``, ``gre``, ``loc``).
        names: SeriesDescription of the extra series (``loc``, ``t2cor``, ``adc``, ``sub``, ``mip``, ``dyn``,
            ``dixon``).
    """

    manufacturer: str | None
    model_name: str | None
    image_type: dict[str, tuple[str, ...]]
    b_value: str | tuple | None
    temporal: str
    sequence_names: dict[str, str]
    names: dict[str, str]


_GENERIC = ("ORIGINAL", "PRIMARY", "OTHER")
_GENERIC_TYPES = {
    "se": _GENERIC,
    "gre": _GENERIC,
    "dwi": _GENERIC,
    "in": _GENERIC,
    "opp": _GENERIC,
    "water": ("DERIVED", "PRIMARY", "WATER"),
    "fat": ("DERIVED", "PRIMARY", "FAT"),
    "adc": ("DERIVED", "PRIMARY", "ADC"),
    "sub": ("DERIVED", "PRIMARY", "SUBTRACTION"),
    "mip": ("DERIVED", "SECONDARY", "MIP"),
    "loc": ("ORIGINAL", "PRIMARY", "LOCALIZER"),
}

VENDOR_STYLES: dict[str, VendorStyle] = {
    "siemens": VendorStyle(
        "SIEMENS",
        "MAGNETOM Aera",
        {
            **_GENERIC_TYPES,
            "se": ("ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"),
            "gre": ("ORIGINAL", "PRIMARY", "M", "NORM", "DIS3D"),
            "dwi": ("ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW", "ND", "NORM"),
            "in": ("ORIGINAL", "PRIMARY", "DIXON", "IN_PHASE"),
            "opp": ("ORIGINAL", "PRIMARY", "DIXON", "OPP_PHASE"),
            "water": ("DERIVED", "PRIMARY", "DIXON", "WATER"),
            "fat": ("DERIVED", "PRIMARY", "DIXON", "FAT"),
            "adc": ("DERIVED", "PRIMARY", "DIFFUSION", "ADC", "ND", "NORM"),
            "sub": ("DERIVED", "PRIMARY", "SUBTRACTION", "NORM", "DIS3D"),
            "mip": ("DERIVED", "PRIMARY", "MIP", "NORM", "DIS3D"),
            "loc": ("ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"),  # a localizer by its fl2d1 sequence and 3 planes
        },
        (0x0019, "SIEMENS MR HEADER", 0x0C, "IS"),
        "position",
        {"se": "*haste2d1", "dwi": "*ep_b800t", "dixon": "*fl3d2", "gre": "*fl3d1", "loc": "*fl2d1"},
        {
            "loc": "localizer",
            "t2cor": "t2_haste_cor_mbh",
            "adc": "ep2d_diff_b50_800_tra_ADC",
            "sub": "t1_vibe_fs_tra_arterial_SUB",
            "mip": "t1_vibe_fs_tra_arterial_SUB_MIP_TRA",
            "dyn": "t1_vibe_fs_tra_dynamic",
            "dixon": "t1_vibe_dixon_tra",
        },
    ),
    "ge": VendorStyle(
        "GE MEDICAL SYSTEMS",
        "Discovery MR750",
        {**_GENERIC_TYPES, "loc": _GENERIC},  # in/opposed phase by echo times; localizer by SeriesPlane
        (0x0043, "GEMS_PARM_01", 0x39, "IS"),
        "position",
        {"se": "ssfse", "dwi": "epi2", "dixon": "lavaflex", "gre": "lava", "loc": "3-plane"},
        {
            "loc": "3-Plane Loc",
            "t2cor": "Cor T2 SSFSE",
            "adc": "Apparent Diffusion Coefficient (mm2/s)",
            "sub": "Ax LAVA Arterial SUB",
            "mip": "Ax LAVA Arterial SUB MIP",
            "dyn": "Ax LAVA Multiphase",
            "dixon": "Ax LAVA-Flex",
        },
    ),
    "philips": VendorStyle(
        "Philips Medical Systems",
        "Ingenia",
        {
            **_GENERIC_TYPES,
            "se": ("ORIGINAL", "PRIMARY", "M_SE", "M", "SE"),
            "gre": ("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"),
            "dwi": ("ORIGINAL", "PRIMARY", "M_SE", "M", "SE"),
            "in": ("DERIVED", "PRIMARY", "IP", "IP"),
            "opp": ("DERIVED", "PRIMARY", "OP", "OP"),
            "water": ("DERIVED", "PRIMARY", "W", "W"),
            "fat": ("DERIVED", "PRIMARY", "F", "F"),
            "loc": ("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"),
        },
        (0x2001, "Philips Imaging DD 001", 0x03, "FL"),
        "position",
        {"se": "TSE", "dwi": "DwiSE", "dixon": "FFE", "gre": "T1FFE", "loc": "FFE"},
        {
            "loc": "Survey",
            "t2cor": "T2W_SSH_COR",
            "adc": "dADC_b0_800",
            "sub": "eTHRIVE_ART_SUB",
            "mip": "eTHRIVE_ART_SUB_MIP",
            "dyn": "eTHRIVE_DYN_TRA",
            "dixon": "T1W_mDIXON_TRA",
        },
    ),
    "canon": VendorStyle(
        "CANON_MEC",
        "Vantage Orian",
        dict(_GENERIC_TYPES),
        "standard",
        "time",
        {"se": "FASE", "dwi": "DWI_EPI", "dixon": "FFE2D", "gre": "QUICK3D", "loc": "FFE2D"},
        {
            "loc": "Locator",
            "t2cor": "FASE2D T2 COR",
            "adc": "ADC AX",
            "sub": "QUICK3D ART SUB",
            "mip": "QUICK3D ART SUB MIP",
            "dyn": "QUICK3D FS AX DYNAMIC",
            "dixon": "FFE2D DUAL ECHO",
        },
    ),
    "uih": VendorStyle(
        "UIH",
        "uMR 780",
        dict(_GENERIC_TYPES),
        (0x0065, "Image Private Header", 0x09, "FD"),
        "position",
        {"se": "fse", "dwi": "epi_dwi", "dixon": "gre_dixon", "gre": "quick3d", "loc": "gre"},
        {
            "loc": "localizer",
            "t2cor": "t2_ssfse_cor",
            "adc": "epi_dwi_tra_b50_800_ADC",
            "sub": "t1_quick3d_tra_fs_ap_sub",
            "mip": "t1_quick3d_tra_fs_ap_sub_mip",
            "dyn": "t1_quick3d_tra_fs_dyn",
            "dixon": "t1_gre_dixon_tra",
        },
    ),
    "lldmmri": VendorStyle(
        None,
        None,
        {**_GENERIC_TYPES, "dwi": _GENERIC, "adc": ("DERIVED", "PRIMARY", "ADC")},
        None,
        "time",
        {"se": "*haste2d1", "dwi": "*ep_b800t", "dixon": "*fl3d2", "gre": "*fl3d1", "loc": "*fl2d1"},
        {
            "loc": "Localizer",
            "t2cor": "T2WI coronal",
            "adc": "ADC",
            "sub": "Subtraction",
            "mip": "MIP",
            "dyn": "Dynamic",
            "dixon": "Dual echo",
        },
    ),
}

#: Study layouts: each phase its own series, or the dynamic phases (and the Dixon images) in one series.
LAYOUTS: tuple[str, ...] = ("separate", "single-series")

#: Acquisition order, series number and minutes after the first series.
_SERIES_ORDER = {
    "T2WI": (3, 0.0),
    "DWI": (5, 4.0),
    "In Phase": (7, 7.0),
    "Out Phase": (8, 7.0),
    "C-pre": (10, 10.0),
    "C+A": (11, 11.5),
    "C+V": (12, 12.2),
    "C+Delay": (13, 14.0),
}
_INJECTION_MIN = 11.0
_DYNAMIC_PHASES = ("C-pre", "C+A", "C+V", "C+Delay")
_SEG_SERIES_NUMBER = 100
_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def _mr_parameters(phase: str, field_strength: float) -> dict:
    """Plausible sequence parameters per phase (TR/TE in ms)."""
    three_t = field_strength >= 2.0
    if phase == "T2WI":
        return dict(
            ScanningSequence="SE",
            SequenceVariant=["SK", "SP"],
            ScanOptions="FS",
            MRAcquisitionType="2D",
            RepetitionTime=1400.0 if three_t else 1200.0,
            EchoTime=95.0,
            EchoTrainLength=128,
            FlipAngle=150.0,
            SequenceName="*haste2d1",
        )
    if phase == "DWI":
        return dict(
            ScanningSequence="EP",
            SequenceVariant=["SK", "SP"],
            ScanOptions="FS",
            MRAcquisitionType="2D",
            RepetitionTime=6000.0 if three_t else 5000.0,
            EchoTime=60.0,
            EchoTrainLength=1,
            FlipAngle=90.0,
            SequenceName="*ep_b800t",
        )
    if phase in ("In Phase", "Out Phase"):
        te_out, te_in = (1.15, 2.3) if three_t else (2.38, 4.76)
        return dict(
            ScanningSequence="GR",
            SequenceVariant=["SP"],
            ScanOptions="",
            MRAcquisitionType="3D",
            RepetitionTime=6.7,
            EchoTime=te_in if phase == "In Phase" else te_out,
            EchoTrainLength=2,
            FlipAngle=9.0,
            SequenceName="*fl3d2",
        )
    return dict(
        ScanningSequence="GR",
        SequenceVariant=["SK", "SP"],
        ScanOptions="FS",
        MRAcquisitionType="3D",
        RepetitionTime=4.0 if three_t else 4.5,
        EchoTime=1.9 if three_t else 2.1,
        EchoTrainLength=1,
        FlipAngle=12.0,
        SequenceName="*fl3d1",
    )


@dataclass
class LesionTruth:
    """Ground truth of one lesion: SEG segment number, class, box on the C+A grid (half-open voxel indices
    ``[x0, y0, z0, x1, y1, z1]``, x = column, y = row, z = slice in the C+A series' instance order) and
    centre (LPS mm)."""

    segment_number: int
    label: int
    class_name: str
    box_voxels: list[int]
    center_mm: list[float]
    diameter_mm: float
    atypical: bool


@dataclass
class StudyTruth:
    """What :func:`generate_dicom_study` wrote (also saved as ``ground_truth.json``).

    ``series``/``series_dirs`` map each phase to its series (several phases share one in the single-series
    layouts); ``phase_instance_uids`` lists each phase's SOP instances (the part of the series that is the phase);
    ``distractors`` maps each extra series' kind (``loc``, ``t2cor``, ``adc``, ``sub``, ``mip``) to its UID."""

    study_instance_uid: str
    frame_of_reference_uid: str
    reference_phase: str
    reference_series_instance_uid: str
    seg_series_instance_uid: str
    seg_path: str
    naming_style: str
    site: str
    lesions: list[LesionTruth]
    series: dict[str, str]
    series_descriptions: dict[str, str]
    series_dirs: dict[str, str] = field(default_factory=dict)
    layout: str = "separate"
    distractors: dict[str, str] = field(default_factory=dict)
    phase_instance_uids: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class _Part:
    """One volume of a series to write: its pixels and grid, the kind of image, sequence parameters and times."""

    key: str  # phase or extra kind, for instance UIDs
    volume: np.ndarray
    grid: core.Grid
    kind: str  # key of VendorStyle.image_type
    params: dict
    acq_time: dt.datetime
    contrast: bool
    extra: dict = field(default_factory=dict)


def _uid(entropy: str, *parts: object) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[entropy, *[str(p) for p in parts]]))


def _fmt_time(t: dt.datetime) -> str:
    return t.strftime("%H%M%S.%f")[:13]


def _plane_grid(centre: Sequence[float], shape: Sequence[int], spacing: Sequence[float], plane: str) -> core.Grid:
    """A coronal or sagittal grid centred on ``centre`` (rows along the patient's feet direction)."""
    axes = {
        "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0)),
        "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0), (-1.0, 0.0, 0.0)),
    }[plane]
    ax = np.asarray(axes)
    half = (np.asarray(shape, dtype=float) - 1) / 2 * np.asarray(spacing, dtype=float)
    origin = np.asarray(centre, dtype=float) - (half[:, None] * ax).sum(axis=0)
    return core.Grid(
        shape=tuple(int(v) for v in shape),  # type: ignore[arg-type]
        spacing=tuple(float(v) for v in spacing),  # type: ignore[arg-type]
        origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        axes=axes,
        thickness=float(spacing[2]),
    )


def generate_dicom_study(
    output_dir: str | os.PathLike,
    seed: int = 0,
    num_lesions: int | None = None,
    naming_style: str | None = None,
    site: str = "site_a",
    *,
    labels: Sequence[int] | None = None,
    matrix: Sequence[int] = (256, 256),
    num_slices: int | None = None,
    mixed_geometry: bool = False,
    layout: str = "separate",
    distractors: bool = False,
    options: SynthOptions | None = None,
    overwrite: bool = False,
) -> StudyTruth:
    """Write one synthetic MR study (8 phases + SEG + ``ground_truth.json``) under ``output_dir``.

    Args:
        output_dir: study folder to create (``series_<number>/IM_<instance>.dcm``, ``series_100/SEG.dcm``).
        seed: seed of every random draw (UIDs are derived from it too, so a rerun is byte-identical).
        num_lesions: 1-3; None = random (ignored when ``labels`` is given).
        naming_style: vendor style (:data:`NAMING_STYLES`, :data:`VENDOR_STYLES`): SeriesDescription, Manufacturer,
            ImageType, b-value tags, sequence names; None = the site's style.
        site: site profile (field strength, noise, geometry, class mix).
        labels: class index of each lesion; default: first drawn from the site's class mix, each further
            lesion of the same class with probability 0.7.
        matrix: (columns, rows) of T2WI, dual echo and dynamic series; DWI is coarser.
        num_slices: slices of those series (default: site's, 32-56).
        mixed_geometry: oblique T2WI with a non-square matrix and a C+Delay series with shifted coverage (the
            latter only in the ``separate`` layout).
        layout: ``"separate"``: one series per phase; ``"single-series"``: the four dynamic phases in one series
            (temporal positions) and the in-phase, opposed-phase, water and fat images in one Dixon series.
        distractors: add the series a real study holds besides the 8 phases: a 3-plane localizer, a coronal T2,
            a b=50 volume in the DWI series, an ADC map, an arterial subtraction and its MIP.
        options: :class:`scripts.synthetic.SynthOptions` appearance knobs.
        overwrite: replace an existing ``output_dir``.

    Returns:
        The :class:`StudyTruth` written to ``output_dir/ground_truth.json``.

    Raises:
        ValueError: for an unknown site, naming style or layout, or invalid lesion count / labels.
    """
    from .synthetic import SynthOptions  # noqa: F811 (runtime import: synthetic imports this module lazily)

    options = options or SynthOptions()
    prof = options.site(get_site(site))
    style = naming_style or prof.naming_style
    if style not in SERIES_DESCRIPTIONS:
        raise ValueError(f"unknown naming_style {style!r}; known styles: {list(NAMING_STYLES)}.")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known layouts: {list(LAYOUTS)}.")
    vendor = VENDOR_STYLES[style]
    rng = np.random.default_rng([int(seed), 17])
    if labels is None:
        n = int(num_lesions) if num_lesions is not None else int(rng.integers(1, 4))
        if not 1 <= n <= 3:
            raise ValueError(f"num_lesions must be 1, 2 or 3, got {num_lesions}.")
        first = int(rng.choice(len(LESION_CLASSES), p=prof.class_probabilities()))
        labels = [first] + [
            first if rng.uniform() < 0.7 else int(rng.integers(len(LESION_CLASSES))) for _ in range(n - 1)
        ]
    labels = [int(v) for v in labels]
    if not 1 <= len(labels) <= 3 or any(not 0 <= v < len(LESION_CLASSES) for v in labels):
        raise ValueError(f"labels must be 1-3 class indices in 0..{len(LESION_CLASSES) - 1}, got {labels}.")

    grids = core.study_grids(prof, matrix, num_slices, mixed_geometry)
    if layout == "single-series":  # one acquisition: every dynamic phase on the arterial grid
        for phase in _DYNAMIC_PHASES:
            grids[phase] = grids[REFERENCE_PHASE]
    zr = core.coverage_z(grids)
    zr = (zr[0] + prof.dwi_thickness, zr[1] - prof.dwi_thickness)
    phantom = core.sample_study(
        rng,
        prof,
        labels,
        zr,
        options.size_range_mm,
        options.atypical_fraction,
        options.jitter,
        options.misregistration_mm,
    )
    entropy = f"lcadb-synth:{seed}:{prof.name}:{style}:{tuple(matrix)}:{num_slices}:{mixed_geometry}:{labels}"
    if layout != "separate" or distractors:
        entropy += f":{layout}:{distractors}"
    study_uid = _uid(entropy, "study")
    for_uid = _uid(entropy, "frame-of-reference")
    day = dt.datetime(2023, 1, 2, 8, 30) + dt.timedelta(
        days=int(rng.integers(0, 700)), minutes=int(rng.integers(0, 480))
    )
    patient = {
        "PatientName": f"SYNTHETIC^{prof.name.upper()}^{int(seed)}",
        "PatientID": f"LCADB-SYN-{int(seed):06d}",
        "PatientBirthDate": f"{1940 + int(rng.integers(0, 50))}0101",
        "PatientSex": str(rng.choice(["F", "M"])),
        "AccessionNumber": f"SYN{int(seed) % 10**9:09d}",
    }
    pv = None if options.partial_volume else 1
    volumes: dict[str, np.ndarray] = {}
    reference_masks: list[np.ndarray] = []
    for phase in PHASES:
        masks: list[np.ndarray] = []
        volumes[phase] = core.render_phase(phantom, phase, grids[phase], rng, partial_volume=pv, masks=masks)
        if phase == REFERENCE_PHASE:
            reference_masks = masks

    def part(phase: str, kind: str, **extra) -> _Part:
        params = _mr_parameters(phase, prof.field_strength)
        params["SequenceName"] = vendor.sequence_names[
            {"T2WI": "se", "DWI": "dwi", "In Phase": "dixon", "Out Phase": "dixon"}.get(phase, "gre")
        ]
        when = day + dt.timedelta(minutes=_SERIES_ORDER[phase][1])
        return _Part(phase, volumes[phase], grids[phase], kind, params, when, phase in _DYNAMIC_PHASES[1:], extra)

    # series number -> (series key, description, parts)
    plan: dict[int, tuple[str, str, list[_Part]]] = {}
    for phase in ("T2WI", "DWI"):
        plan[_SERIES_ORDER[phase][0]] = (phase, SERIES_DESCRIPTIONS[style][phase], [part(phase, phase_kind(phase))])
    if layout == "separate":
        for phase in ("In Phase", "Out Phase", *_DYNAMIC_PHASES):
            plan[_SERIES_ORDER[phase][0]] = (phase, SERIES_DESCRIPTIONS[style][phase], [part(phase, phase_kind(phase))])
    else:
        in_phase, out_phase = volumes["In Phase"], volumes["Out Phase"]
        dixon = [part("In Phase", "in"), part("Out Phase", "opp")]
        for key, volume in (("water", (in_phase + out_phase) / 2), ("fat", np.abs(in_phase - out_phase) / 2)):
            derived = part("In Phase", key)
            derived.key, derived.volume = f"dixon-{key}", volume.astype(np.float32)
            dixon.append(derived)
        plan[_SERIES_ORDER["In Phase"][0]] = ("dixon", vendor.names["dixon"], dixon)
        dynamic = [part(phase, "gre") for phase in _DYNAMIC_PHASES]
        start = dynamic[0].acq_time
        for position, p in enumerate(dynamic, start=1):
            if vendor.temporal == "position":
                p.extra.update(TemporalPositionIdentifier=position, NumberOfTemporalPositions=len(dynamic))
            elif vendor.temporal == "trigger":
                p.extra.update(TriggerTime=f"{(p.acq_time - start).total_seconds() * 1000:.0f}")
            p.contrast = True  # the agent is recorded for the whole dynamic series, the mask included
        plan[_SERIES_ORDER["C-pre"][0]] = ("dynamic", vendor.names["dyn"], dynamic)
    if distractors:
        _plan_distractors(plan, vendor, volumes, grids, phantom, rng, day, part)

    series_uids: dict[str, str] = {}
    series_dirs: dict[str, str] = {}
    phase_instances: dict[str, list[str]] = {}
    extra_series: dict[str, str] = {}
    reference_datasets: list = []
    target = Path(output_dir)
    with atomic_directory(target, overwrite=overwrite) as tmp:
        for number in sorted(plan):
            key, description, parts = plan[number]
            series_uid = _uid(entropy, "series", key)
            folder = tmp / f"series_{number:03d}"
            folder.mkdir()
            written = _write_series(
                folder, parts, number, description, series_uid, study_uid, for_uid, entropy, vendor, prof, patient, day
            )
            for p, datasets in written:
                if p.key in PHASES:
                    series_uids[p.key] = series_uid
                    series_dirs[p.key] = folder.name
                    phase_instances[p.key] = [str(ds.SOPInstanceUID) for ds in datasets]
                    if p.key == REFERENCE_PHASE:
                        reference_datasets = datasets
            if key in vendor.names and key not in ("dyn", "dixon"):
                extra_series[key] = series_uid
        seg_uid = _uid(entropy, "seg-series")
        seg_dir = tmp / f"series_{_SEG_SERIES_NUMBER:03d}"
        seg_dir.mkdir()
        _write_seg(seg_dir / "SEG.dcm", reference_datasets, reference_masks, seg_uid, entropy, day)
        lesions = []
        for i, (lesion, mask) in enumerate(zip(phantom.lesions, reference_masks)):
            box = list(box_from_mask(mask))
            lesions.append(
                LesionTruth(
                    segment_number=i + 1,
                    label=lesion.label,
                    class_name=lesion.class_name,
                    box_voxels=box,
                    center_mm=[round(float(v), 3) for v in lesion.centre],
                    diameter_mm=round(lesion.diameter_mm, 2),
                    atypical=lesion.atypical,
                )
            )
        descriptions = dict(SERIES_DESCRIPTIONS[style])
        if layout != "separate":
            descriptions.update({p: vendor.names["dixon"] for p in ("In Phase", "Out Phase")})
            descriptions.update({p: vendor.names["dyn"] for p in _DYNAMIC_PHASES})
        truth = StudyTruth(
            study_instance_uid=study_uid,
            frame_of_reference_uid=for_uid,
            reference_phase=REFERENCE_PHASE,
            reference_series_instance_uid=series_uids[REFERENCE_PHASE],
            seg_series_instance_uid=seg_uid,
            seg_path=f"{seg_dir.name}/SEG.dcm",
            naming_style=style,
            site=prof.name,
            lesions=lesions,
            series=series_uids,
            series_descriptions=descriptions,
            series_dirs=series_dirs,
            layout=layout,
            distractors=extra_series,
            phase_instance_uids=phase_instances,
        )
        with open(tmp / "ground_truth.json", "w", encoding="utf-8") as f:
            json.dump(truth.to_json(), f, indent=1)
    logger.info("wrote DICOM study %s (%d lesions) to %s", study_uid, len(lesions), target)
    return truth


def phase_kind(phase: str) -> str:
    """The :attr:`VendorStyle.image_type` key of a phase's own series."""
    return {"T2WI": "se", "DWI": "dwi", "In Phase": "in", "Out Phase": "opp"}.get(phase, "gre")


def _plan_distractors(plan, vendor, volumes, grids, phantom, rng, day, part) -> None:
    """Add the localizer, coronal T2, b=50 DWI volume, ADC map, subtraction and MIP series to ``plan``."""
    reference = grids[REFERENCE_PHASE]
    cols, rows, n = reference.shape
    centre = reference.origin + (np.asarray(reference.shape) - 1) / 2 @ (
        np.asarray(reference.spacing)[:, None] * reference.axes_array
    )
    loc_shape, loc_spacing = (max(cols // 2, 8), max(rows // 2, 8), 3), (reference.spacing[0] * 2,) * 2 + (20.0,)
    localizer = []
    for plane in ("axial", "coronal", "sagittal"):
        grid = (
            core.axial_grid(centre, loc_shape, loc_spacing, 8.0)
            if plane == "axial"
            else _plane_grid(centre, loc_shape, loc_spacing, plane)
        )
        p = part("C-pre", "loc")
        p.key, p.grid, p.contrast = f"loc-{plane}", grid, False
        p.volume = core.render_phase(phantom, "C-pre", grid, rng, partial_volume=1)
        p.params.update(SequenceName=vendor.sequence_names["loc"], MRAcquisitionType="2D", ScanOptions="")
        p.acq_time = day - dt.timedelta(minutes=2)
        if vendor.manufacturer == "GE MEDICAL SYSTEMS":
            p.extra["_private"] = [(0x0019, "GEMS_ACQU_01", 0x17, "SS", 256)]  # SeriesPlane: 3-plane
        localizer.append(p)
    plan[1] = ("loc", vendor.names["loc"], localizer)

    t2 = part("T2WI", "se")
    grid = _plane_grid(
        centre, (cols, rows, max(n // 2, 6)), (*reference.spacing[:2], reference.spacing[2] * 1.5), "coronal"
    )
    t2.key, t2.grid = "t2cor", grid
    t2.volume = core.render_phase(phantom, "T2WI", grid, rng, partial_volume=1)
    t2.acq_time = day - dt.timedelta(minutes=1)
    plan[2] = ("t2cor", vendor.names["t2cor"], [t2])

    dwi_key, dwi_description, (dwi,) = plan[_SERIES_ORDER["DWI"][0]]
    low_b = part("DWI", "dwi")
    low_b.key, low_b.volume = "dwi-b50", (volumes["DWI"] * 1.8).astype(np.float32)
    low_b.extra["_b_value"] = 50
    dwi.extra["_b_value"] = 800
    plan[_SERIES_ORDER["DWI"][0]] = (dwi_key, dwi_description, [low_b, dwi])
    adc = part("DWI", "adc")
    adc.key = "adc"
    adc.volume = np.clip(3000.0 - volumes["DWI"] * 4.0, 0, None).astype(np.float32)
    plan[6] = ("adc", vendor.names["adc"], [adc])

    subtraction = np.clip(volumes[REFERENCE_PHASE] - volumes["C-pre"], 0, None).astype(np.float32)
    sub = part(REFERENCE_PHASE, "sub")
    sub.key, sub.volume = "sub", subtraction
    plan[14] = ("sub", vendor.names["sub"], [sub])
    mip = part(REFERENCE_PHASE, "mip")
    padded = np.pad(subtraction, ((0, 0), (0, 0), (2, 2)), mode="edge")
    mip.key = "mip"
    mip.volume = np.max(np.stack([padded[:, :, k : k + subtraction.shape[2]] for k in range(5)]), axis=0)
    plan[15] = ("mip", vendor.names["mip"], [mip])


def _write_series(
    folder: Path,
    parts: list[_Part],
    series_number: int,
    description: str,
    series_uid: str,
    study_uid: str,
    for_uid: str,
    entropy: str,
    vendor: VendorStyle,
    prof: core.SiteProfile,
    patient: dict,
    study_time: dt.datetime,
) -> list[tuple[_Part, list]]:
    """Write one MR series (one file per slice of each part) and return each part's datasets (for the SEG)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    out = []
    instance = 0
    series_time = min(p.acq_time for p in parts)
    for p in parts:
        grid, params, acq_time = p.grid, p.params, p.acq_time
        pixels = np.clip(np.rint(p.volume), 0, 65535).astype(np.uint16)
        lo, hi = np.percentile(pixels, [1, 99.5])
        ax = grid.axes_array
        phase = p.key if p.key in PHASES else None
        b = p.extra.get("_b_value", 800 if p.kind == "dwi" else None)
        if b is not None and "ep_b800" in params["SequenceName"]:  # Siemens names the b-value in the sequence
            params = {**params, "SequenceName": params["SequenceName"].replace("ep_b800", f"ep_b{b}")}
        datasets = []
        for k in range(grid.shape[2]):
            instance += 1
            sop_uid = _uid(entropy, "instance", p.key, k)
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = _MR_IMAGE_STORAGE
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            ds = Dataset()
            ds.file_meta = meta
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.ImageType = list(vendor.image_type[p.kind])
            ds.SOPClassUID = _MR_IMAGE_STORAGE
            ds.SOPInstanceUID = sop_uid
            ds.StudyDate = study_time.strftime("%Y%m%d")
            ds.SeriesDate = series_time.strftime("%Y%m%d")
            ds.AcquisitionDate = acq_time.strftime("%Y%m%d")
            ds.ContentDate = acq_time.strftime("%Y%m%d")
            ds.StudyTime = _fmt_time(study_time)
            ds.SeriesTime = _fmt_time(series_time)
            ds.AcquisitionTime = _fmt_time(acq_time)
            ds.ContentTime = _fmt_time(acq_time)
            ds.AccessionNumber = patient["AccessionNumber"]
            ds.Modality = "MR"
            ds.Manufacturer = vendor.manufacturer or prof.manufacturer
            ds.InstitutionName = f"Synthetic hospital {prof.name}"
            ds.ReferringPhysicianName = ""
            ds.StationName = prof.name.upper()
            ds.StudyDescription = "MR LIVER DYNAMIC (SYNTHETIC)"
            ds.SeriesDescription = description
            ds.ManufacturerModelName = vendor.model_name or prof.model_name
            ds.PatientName = patient["PatientName"]
            ds.PatientID = patient["PatientID"]
            ds.PatientBirthDate = patient["PatientBirthDate"]
            ds.PatientSex = patient["PatientSex"]
            ds.BodyPartExamined = "ABDOMEN"
            ds.ScanningSequence = params["ScanningSequence"]
            ds.SequenceVariant = params["SequenceVariant"]
            ds.ScanOptions = params["ScanOptions"]
            ds.MRAcquisitionType = params["MRAcquisitionType"]
            ds.SequenceName = params["SequenceName"]
            ds.SliceThickness = f"{grid.slab:.6g}"
            ds.RepetitionTime = f"{params['RepetitionTime']:.6g}"
            ds.EchoTime = f"{params['EchoTime']:.6g}"
            ds.NumberOfAverages = "1"
            ds.ImagingFrequency = f"{42.577478 * prof.field_strength:.6f}"
            ds.ImagedNucleus = "1H"
            ds.EchoNumbers = "2" if phase == "In Phase" else "1"
            ds.MagneticFieldStrength = f"{prof.field_strength:.6g}"
            ds.SpacingBetweenSlices = f"{grid.spacing[2]:.6g}"
            ds.EchoTrainLength = str(params["EchoTrainLength"])
            if "TriggerTime" in p.extra:
                ds.TriggerTime = p.extra["TriggerTime"]
            ds.PixelBandwidth = "450"
            ds.ProtocolName = description
            ds.FlipAngle = f"{params['FlipAngle']:.6g}"
            ds.PatientPosition = "FFS"
            if p.contrast:
                inj = study_time + dt.timedelta(minutes=_INJECTION_MIN)
                ds.ContrastBolusAgent = "Gadoterate meglumine"
                ds.ContrastBolusRoute = "IV"
                ds.ContrastBolusVolume = "15"
                ds.ContrastBolusStartTime = _fmt_time(inj)
                ds.ContrastBolusIngredient = "GADOLINIUM"
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.StudyID = "1"
            ds.SeriesNumber = str(series_number)
            ds.AcquisitionNumber = "1"
            ds.InstanceNumber = str(instance)
            position = np.asarray(grid.origin) + k * grid.spacing[2] * ax[2]
            ds.ImagePositionPatient = [f"{v:.6g}" for v in position]
            ds.ImageOrientationPatient = [f"{v:.6g}" for v in (*ax[0], *ax[1])]
            ds.FrameOfReferenceUID = for_uid
            if "TemporalPositionIdentifier" in p.extra:
                ds.TemporalPositionIdentifier = p.extra["TemporalPositionIdentifier"]
                ds.NumberOfTemporalPositions = p.extra["NumberOfTemporalPositions"]
            ds.PositionReferenceIndicator = ""
            ds.SliceLocation = f"{float(position @ ax[2]):.6g}"
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = int(grid.shape[1])
            ds.Columns = int(grid.shape[0])
            ds.PixelSpacing = [f"{grid.spacing[1]:.6g}", f"{grid.spacing[0]:.6g}"]  # row spacing, column spacing
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 0
            ds.WindowCenter = f"{(lo + hi) / 2:.0f}"
            ds.WindowWidth = f"{max(hi - lo, 1):.0f}"
            ds.InPlanePhaseEncodingDirection = "ROW"
            if b is not None:
                _write_b_value(ds, vendor, float(b))
            for group, creator, offset, vr, value in p.extra.get("_private", []):
                ds.private_block(group, creator, create=True).add_new(offset, vr, value)
            ds.PixelData = np.ascontiguousarray(pixels[:, :, k].T).tobytes()
            ds.save_as(folder / f"IM_{instance:04d}.dcm", enforce_file_format=True)
            datasets.append(ds)
        out.append((p, datasets))
    return out


def _write_b_value(ds, vendor: VendorStyle, b: float) -> None:
    """Write the b-value where the vendor style keeps it (see :class:`VendorStyle`)."""
    if vendor.b_value == "standard":
        ds.DiffusionBValue = b
        ds.ImageComments = f"b={b:g}"
    elif isinstance(vendor.b_value, tuple):
        group, creator, offset, vr = vendor.b_value
        value = {"IS": str(int(b)), "FL": b, "FD": b}[vr]
        if group == 0x0043:  # GE: slop_int_6..9, the b-value plus 10^9 (dcm2niix issue 602)
            value = [str(1_000_000_000 + int(b)), "8", "0", "0"]
        ds.private_block(group, creator, create=True).add_new(offset, vr, value)


def _write_seg(
    path: Path, sources: list, masks: list[np.ndarray], series_uid: str, entropy: str, when: dt.datetime
) -> None:
    """DICOM SEG (BINARY) on the reference series, one segment per lesion."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    labelmap = np.zeros(masks[0].shape, dtype=np.uint8)
    for i, m in enumerate(masks):
        labelmap[m & (labelmap == 0)] = i + 1
    frames = np.ascontiguousarray(np.transpose(labelmap, (2, 1, 0)))  # [slices, rows, columns]
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=f"Lesion {i + 1}",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            anatomic_regions=[codes.SCT.Liver],
            tracking_id=f"lesion-{i + 1}",
            tracking_uid=_uid(entropy, "tracking", i + 1),
        )
        for i in range(len(masks))
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=_SEG_SERIES_NUMBER,
        sop_instance_uid=_uid(entropy, "seg-instance"),
        instance_number=1,
        manufacturer="LCA-DB MONAI plugin",
        manufacturer_model_name="lcadb-synth",
        software_versions="0.1.0",
        device_serial_number="0",
        series_description="Lesions (synthetic ground truth)",
    )
    # highdicom stamps the current time and fresh UIDs here: fix them so that a rerun is byte-identical
    created = when + dt.timedelta(minutes=30)
    seg.ContentDate = seg.SeriesDate = seg.InstanceCreationDate = created.strftime("%Y%m%d")
    seg.ContentTime = seg.SeriesTime = seg.InstanceCreationTime = _fmt_time(created)
    for item in seg.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = created.strftime("%Y%m%d%H%M%S")
    org_uid = _uid(entropy, "dimension-organization")
    for item in [*seg.get("DimensionOrganizationSequence", []), *seg.get("DimensionIndexSequence", [])]:
        item.DimensionOrganizationUID = org_uid
    seg.save_as(path, enforce_file_format=True)
