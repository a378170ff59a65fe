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

__all__ = ["NAMING_STYLES", "SERIES_DESCRIPTIONS", "LesionTruth", "StudyTruth", "generate_dicom_study"]

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
    "lldmmri": {phase: phase for phase in PHASES},
}

NAMING_STYLES: tuple[str, ...] = tuple(SERIES_DESCRIPTIONS)

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
    """What :func:`generate_dicom_study` wrote (also saved as ``ground_truth.json``)."""

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

    def to_json(self) -> dict:
        return asdict(self)


def _uid(entropy: str, *parts: object) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[entropy, *[str(p) for p in parts]]))


def _fmt_time(t: dt.datetime) -> str:
    return t.strftime("%H%M%S.%f")[:13]


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
    options: SynthOptions | None = None,
    overwrite: bool = False,
) -> StudyTruth:
    """Write one synthetic MR study (8 series + SEG + ``ground_truth.json``) under ``output_dir``.

    Args:
        output_dir: study folder to create (``series_<number>/IM_<instance>.dcm``, ``series_100/SEG.dcm``).
        seed: seed of every random draw (UIDs are derived from it too, so a rerun is byte-identical).
        num_lesions: 1-3; None = random (ignored when ``labels`` is given).
        naming_style: SeriesDescription style (:data:`NAMING_STYLES`); None = the site's style.
        site: site profile (field strength, noise, geometry, class mix).
        labels: class index of each lesion; default: first drawn from the site's class mix, each further
            lesion of the same class with probability 0.7.
        matrix: (columns, rows) of T2WI, dual echo and dynamic series; DWI is coarser.
        num_slices: slices of those series (default: site's, 32-56).
        mixed_geometry: oblique T2WI with a non-square matrix and a C+Delay series with shifted coverage.
        options: :class:`scripts.synthetic.SynthOptions` appearance knobs.
        overwrite: replace an existing ``output_dir``.

    Returns:
        The :class:`StudyTruth` written to ``output_dir/ground_truth.json``.

    Raises:
        ValueError: for an unknown site or naming style, or invalid lesion count / labels.
    """
    from .synthetic import SynthOptions  # noqa: F811 (runtime import: synthetic imports this module lazily)

    options = options or SynthOptions()
    prof = options.site(get_site(site))
    style = naming_style or prof.naming_style
    if style not in SERIES_DESCRIPTIONS:
        raise ValueError(f"unknown naming_style {style!r}; known styles: {list(NAMING_STYLES)}.")
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
    series_uids: dict[str, str] = {}
    series_dirs: dict[str, str] = {}
    reference_datasets = []
    reference_masks: list[np.ndarray] = []
    target = Path(output_dir)
    with atomic_directory(target, overwrite=overwrite) as tmp:
        for phase in PHASES:
            grid = grids[phase]
            masks: list[np.ndarray] = []
            volume = core.render_phase(phantom, phase, grid, rng, partial_volume=pv, masks=masks)
            number, minutes = _SERIES_ORDER[phase]
            series_uid = _uid(entropy, "series", phase)
            series_uids[phase] = series_uid
            folder = tmp / f"series_{number:03d}"
            folder.mkdir()
            series_dirs[phase] = folder.name
            acq = day + dt.timedelta(minutes=minutes)
            datasets = _write_series(
                folder,
                volume,
                grid,
                phase,
                number,
                series_uid,
                study_uid,
                for_uid,
                entropy,
                style,
                prof,
                patient,
                day,
                acq,
            )
            if phase == REFERENCE_PHASE:
                reference_datasets = datasets
                reference_masks = masks
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
            series_descriptions=dict(SERIES_DESCRIPTIONS[style]),
            series_dirs=series_dirs,
        )
        with open(tmp / "ground_truth.json", "w", encoding="utf-8") as f:
            json.dump(truth.to_json(), f, indent=1)
    logger.info("wrote DICOM study %s (%d lesions) to %s", study_uid, len(lesions), target)
    return truth


def _write_series(
    folder: Path,
    volume: np.ndarray,
    grid: core.Grid,
    phase: str,
    series_number: int,
    series_uid: str,
    study_uid: str,
    for_uid: str,
    entropy: str,
    style: str,
    prof: core.SiteProfile,
    patient: dict,
    study_time: dt.datetime,
    acq_time: dt.datetime,
) -> list:
    """Write one MR series (one file per slice) and return the datasets (for the SEG)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    pixels = np.clip(np.rint(volume), 0, 65535).astype(np.uint16)
    lo, hi = np.percentile(pixels, [1, 99.5])
    ax = grid.axes_array
    params = _mr_parameters(phase, prof.field_strength)
    datasets = []
    for k in range(grid.shape[2]):
        sop_uid = _uid(entropy, "instance", phase, k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = _MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.SOPClassUID = _MR_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = study_time.strftime("%Y%m%d")
        ds.SeriesDate = acq_time.strftime("%Y%m%d")
        ds.AcquisitionDate = acq_time.strftime("%Y%m%d")
        ds.ContentDate = acq_time.strftime("%Y%m%d")
        ds.StudyTime = _fmt_time(study_time)
        ds.SeriesTime = _fmt_time(acq_time)
        ds.AcquisitionTime = _fmt_time(acq_time)
        ds.ContentTime = _fmt_time(acq_time)
        ds.AccessionNumber = patient["AccessionNumber"]
        ds.Modality = "MR"
        ds.Manufacturer = prof.manufacturer
        ds.InstitutionName = f"Synthetic hospital {prof.name}"
        ds.ReferringPhysicianName = ""
        ds.StationName = prof.name.upper()
        ds.StudyDescription = "MR LIVER DYNAMIC (SYNTHETIC)"
        ds.SeriesDescription = SERIES_DESCRIPTIONS[style][phase]
        ds.ManufacturerModelName = prof.model_name
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
        ds.PixelBandwidth = "450"
        ds.ProtocolName = SERIES_DESCRIPTIONS[style][phase]
        ds.FlipAngle = f"{params['FlipAngle']:.6g}"
        ds.PatientPosition = "FFS"
        if phase in ("C+A", "C+V", "C+Delay"):
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
        ds.InstanceNumber = str(k + 1)
        position = np.asarray(grid.origin) + k * grid.spacing[2] * ax[2]
        ds.ImagePositionPatient = [f"{v:.6g}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6g}" for v in (*ax[0], *ax[1])]
        ds.FrameOfReferenceUID = for_uid
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
        ds.PixelData = np.ascontiguousarray(pixels[:, :, k].T).tobytes()
        ds.save_as(folder / f"IM_{k + 1:04d}.dcm", enforce_file_format=True)
        datasets.append(ds)
    return datasets


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
