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
"""Enhanced MR Image Storage objects built from the standard's module definitions, for the input tests.

The deploy app reads Enhanced MR through its own flattening of the functional groups
(``deploy_app/multiframe.py``); the fixtures must not come from that code. This builder follows DICOM PS3.3
(2024 editions), module by module, and every object it writes is checked with dicom3tools' ``dciodvfy``:

- A.36.2 Enhanced MR Image IOD: Patient (C.7.1.1), General Study (C.7.2.1), General Series (C.7.3.1), MR Series
  (C.8.13.6), Frame of Reference (C.7.4.1), General Equipment (C.7.5.1), Enhanced General Equipment (C.7.5.2),
  Image Pixel (C.7.6.3), Enhanced Contrast/Bolus (C.7.6.4b), Multi-frame Functional Groups (C.7.6.16),
  Multi-frame Dimension (C.7.6.17), Acquisition Context (C.7.6.14), Enhanced MR Image (C.8.13.1, with the MR
  Image and Spectroscopy Instance macro C.8.13.2 and the MR Image Description macro C.8.13.3), MR Pulse Sequence
  (C.8.13.4), SOP Common (C.12.1);
- the functional group macros of A.36.2.5: Pixel Measures (C.7.6.16.2.1), Frame Content (C.7.6.16.2.2), Plane
  Position (Patient) (C.7.6.16.2.3), Plane Orientation (Patient) (C.7.6.16.2.4), Frame Anatomy (C.7.6.16.2.8),
  Contrast/Bolus Usage (C.7.6.16.2.12), MR Image Frame Type (C.8.13.5.1), MR Timing and Related Parameters
  (C.8.13.5.2), MR FOV/Geometry (C.8.13.5.3), MR Echo (C.8.13.5.4), MR Modifier (C.8.13.5.5), MR Imaging
  Modifier (C.8.13.5.6), MR Receive Coil (C.8.13.5.7), MR Transmit Coil (C.8.13.5.8), MR Diffusion
  (C.8.13.5.9), MR Averages (C.8.13.5.10), MR Spatial Saturation (C.8.13.5.11).

The source is a classic (single-frame) study of the project's generator: each volume becomes a stack, several
volumes of one acquisition (a dynamic's phases, a Dixon's echoes, a DWI's b-values) become temporal positions or
frames with their own MR Echo / MR Diffusion / MR Image Frame Type values in one instance, as a scanner writes them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

__all__ = ["ENHANCED_MR_IMAGE_STORAGE", "EnhancedVolume", "enhanced_mr_image", "enhanced_study"]

ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
_DIMENSIONS = (  # (index pointer, functional group pointer, label): C.7.6.17.1
    (0x00209056, 0x00209111, "Stack ID"),
    (0x00209057, 0x00209111, "In-Stack Position Number"),
)
_TEMPORAL = (0x00209128, 0x00209111, "Temporal Position Index")


@dataclass
class EnhancedVolume:
    """One volume of the classic study to store in an Enhanced MR instance.

    Attributes:
        datasets: its classic single-frame instances.
        frame_type: FrameType (C.8.13.5.1.1): 4 values, e.g. ``("ORIGINAL", "PRIMARY", "VOLUME", "NONE")``.
        agent_phase: Contrast/Bolus Agent Phase (C.7.6.16.2.12), None without contrast.
        temporal_position: Temporal Position Index, None for a single time point.
    """

    datasets: list[Dataset]
    frame_type: tuple[str, str, str, str]
    agent_phase: str | None = None
    temporal_position: int | None = None


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _item(**attributes) -> DicomSequence:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return DicomSequence([item])


def _sorted_slices(datasets: Sequence[Dataset]) -> list[Dataset]:
    iop = np.asarray(datasets[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    return sorted(datasets, key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))


def _pulse_sequence(first: Dataset) -> dict:
    """MR Pulse Sequence module (C.8.13.4) from the classic Scanning Sequence / Sequence Variant."""
    sequence = {
        str(v)
        for v in ([first.ScanningSequence] if isinstance(first.ScanningSequence, str) else first.ScanningSequence)
    }
    return dict(
        PulseSequenceName=str(first.get("SequenceName", "") or "unknown")[:16],
        MRAcquisitionType=first.MRAcquisitionType,
        EchoPulseSequence="GRADIENT" if "GR" in sequence and "SE" not in sequence else "SPIN",
        MultiPlanarExcitation="NO",
        PhaseContrast="NO",
        TimeOfFlightContrast="NO",
        SteadyStatePulseSequence="NONE",
        EchoPlanarPulseSequence="YES" if "EP" in sequence else "NO",
        SaturationRecovery="NO",
        SpectrallySelectedSuppression="FAT" if "FS" in str(first.get("ScanOptions", "")) else "NONE",
        OversamplingPhase="NONE",
        GeometryOfKSpaceTraversal="RECTILINEAR",
        RectilinearPhaseEncodeReordering="LINEAR",
        SegmentedKSpaceTraversal="SINGLE",
        NumberOfKSpaceTrajectories=1,
        **({"CoverageOfKSpace": "FULL"} if first.MRAcquisitionType == "3D" else {}),
        **({} if "GR" in sequence and "SE" not in sequence else {"MultipleSpinEcho": "NO"}),
    )


def _shared_groups(first: Dataset, acquisition_contrast: str) -> Dataset:
    groups = Dataset()
    groups.PixelMeasuresSequence = _item(
        PixelSpacing=list(first.PixelSpacing),
        SliceThickness=first.SliceThickness,
        SpacingBetweenSlices=first.get("SpacingBetweenSlices", first.SliceThickness),
    )
    groups.PixelValueTransformationSequence = _item(RescaleIntercept=0, RescaleSlope=1, RescaleType="US")
    groups.PlaneOrientationSequence = _item(ImageOrientationPatient=list(first.ImageOrientationPatient))
    groups.FrameAnatomySequence = _item(
        AnatomicRegionSequence=DicomSequence([_code(codes.SCT.Abdomen.value, "SCT", codes.SCT.Abdomen.meaning)]),
        FrameLaterality="U",
    )
    groups.MRTimingAndRelatedParametersSequence = _item(
        RepetitionTime=float(first.RepetitionTime),
        FlipAngle=float(first.FlipAngle),
        EchoTrainLength=int(first.EchoTrainLength),
        RFEchoTrainLength=int(first.EchoTrainLength),
        GradientEchoTrainLength=0,
        SpecificAbsorptionRateSequence=_item(
            SpecificAbsorptionRateDefinition="IEC_WHOLE_BODY", SpecificAbsorptionRateValue=0.5
        ),
        OperatingModeSequence=DicomSequence(
            [
                _item(OperatingModeType=kind, OperatingMode="IEC_NORMAL")[0]
                for kind in ("STATIC FIELD", "RF", "GRADIENT")
            ]
        ),
        GradientOutputType="DB_DT",
        GradientOutput=0.0,
    )
    groups.MRFOVGeometrySequence = _item(
        InPlanePhaseEncodingDirection=first.get("InPlanePhaseEncodingDirection", "ROW"),
        MRAcquisitionFrequencyEncodingSteps=int(first.Columns),
        MRAcquisitionPhaseEncodingStepsInPlane=int(first.Rows),
        PercentSampling=100.0,
        PercentPhaseFieldOfView=100.0,
        **({"MRAcquisitionPhaseEncodingStepsOutOfPlane": 1} if first.MRAcquisitionType == "3D" else {}),
    )
    groups.MRModifierSequence = _item(
        InversionRecovery="NO",
        FlowCompensation="NONE",
        T2Preparation="NO",
        SpectrallySelectedExcitation="NONE",
        SpatialPresaturation="NONE",
        PartialFourier="NO",
        ParallelAcquisition="NO",
        **({"Spoiling": "RF_AND_GRADIENT"} if "GR" in str(first.ScanningSequence) else {}),
    )
    groups.MRImagingModifierSequence = _item(
        MagnetizationTransfer="NONE",
        BloodSignalNulling="NO",
        Tagging="NONE",
        TransmitterFrequency=float(first.ImagingFrequency),
        PixelBandwidth=float(first.get("PixelBandwidth", 450)),
    )
    groups.MRReceiveCoilSequence = _item(
        ReceiveCoilName="BODY", ReceiveCoilManufacturerName="", ReceiveCoilType="BODY", QuadratureReceiveCoil="NO"
    )
    groups.MRTransmitCoilSequence = _item(
        TransmitCoilName="BODY", TransmitCoilManufacturerName="", TransmitCoilType="BODY"
    )
    groups.MRAveragesSequence = _item(NumberOfAverages=float(first.get("NumberOfAverages", 1)))
    groups.MRSpatialSaturationSequence = DicomSequence([])
    return groups


def enhanced_mr_image(
    volumes: Sequence[EnhancedVolume],
    series_instance_uid: str,
    series_number: int,
    series_description: str,
    acquisition_contrast: str,
    b_values: Sequence[float | None] | None = None,
) -> Dataset:
    """One Enhanced MR Image Storage instance holding ``volumes`` (see the module docstring).

    Args:
        volumes: the volumes, each a stack (several with ``temporal_position`` set: a dynamic series).
        series_instance_uid: the new series' UID.
        series_number: its number.
        series_description: its description.
        acquisition_contrast: Acquisition Contrast (C.8.13.1.1.4), e.g. ``"T1"``, ``"T2"``, ``"DIFFUSION"``.
        b_values: per volume, the MR Diffusion macro's b-value (None: no MR Diffusion macro).

    Returns:
        The dataset, with file meta (Explicit VR Little Endian).
    """
    first = volumes[0].datasets[0]
    temporal = any(v.temporal_position is not None for v in volumes)
    contrast = any(v.agent_phase for v in volumes)
    ds = Dataset()
    for keyword in (
        "SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
        "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription",
        "Modality", "FrameOfReferenceUID", "PositionReferenceIndicator", "Manufacturer", "InstitutionName",
        "StationName", "ManufacturerModelName", "BodyPartExamined", "PatientPosition", "SeriesDate", "SeriesTime",
        "MagneticFieldStrength",
    ):  # fmt: skip
        if keyword in first:
            setattr(ds, keyword, first.data_element(keyword).value)
    ds.SOPClassUID = ENHANCED_MR_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.DeviceSerialNumber = "LCADB-TEST-0001"  # Enhanced General Equipment: type 1
    ds.SoftwareVersions = "enhanced-mr-test-builder 1"
    ds.InstanceNumber = 1
    times = [
        dt.datetime.strptime(
            str(v.datasets[0].AcquisitionDate) + str(v.datasets[0].AcquisitionTime)[:6], "%Y%m%d%H%M%S"
        )
        for v in volumes
    ]
    start = min(times)
    ds.ContentDate, ds.ContentTime = start.strftime("%Y%m%d"), start.strftime("%H%M%S")
    ds.AcquisitionDateTime = start.strftime("%Y%m%d%H%M%S")
    ds.AcquisitionDuration = 10.0
    ds.AcquisitionNumber = 1
    ds.ContentQualification = "RESEARCH"
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.ImageType = [
        volumes[0].frame_type[0] if len({v.frame_type[0] for v in volumes}) == 1 else "MIXED",
        "PRIMARY",
        *(volumes[0].frame_type[k] if len({v.frame_type[k] for v in volumes}) == 1 else "MIXED" for k in (2, 3)),
    ]
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = acquisition_contrast
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionContextSequence = DicomSequence([])
    if ds.ImageType[0] != "DERIVED":  # MR Pulse Sequence: required for ORIGINAL or MIXED images only
        for keyword, value in _pulse_sequence(first).items():
            setattr(ds, keyword, value)
    if contrast:
        agent = _code("GADOTERATE", "99LCADBTEST", "Gadoterate meglumine")
        agent.ContrastBolusAgentNumber = 1
        agent.ContrastBolusAdministrationRouteSequence = DicomSequence([_code("47625008", "SCT", "Intravenous route")])
        agent.ContrastBolusIngredientCodeSequence = DicomSequence([_code("GADOLINIUM", "99LCADBTEST", "Gadolinium")])
        agent.ContrastBolusVolume = 15.0
        agent.ContrastBolusIngredientConcentration = 0.5
        agent.ContrastAdministrationProfileSequence = _item(
            ContrastBolusVolume=15.0,
            ContrastBolusStartTime=str(
                next(v.datasets[0].ContrastBolusStartTime for v in volumes if "ContrastBolusStartTime" in v.datasets[0])
            ),
        )
        ds.ContrastBolusAgentSequence = DicomSequence([agent])

    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = int(first.Rows), int(first.Columns)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0

    organization = generate_uid()
    ds.DimensionOrganizationSequence = _item(DimensionOrganizationUID=organization)
    ds.DimensionOrganizationType = "3D_TEMPORAL" if temporal else "3D"
    index = []
    for pointer, group, label in ((_TEMPORAL,) if temporal else ()) + _DIMENSIONS:
        item = Dataset()
        item.DimensionIndexPointer, item.FunctionalGroupPointer = pointer, group
        item.DimensionOrganizationUID, item.DimensionDescriptionLabel = organization, label
        index.append(item)
    ds.DimensionIndexSequence = DicomSequence(index)

    shared = _shared_groups(first, acquisition_contrast)
    per_frame, planes = [], []
    for v, volume in enumerate(volumes):
        acquired = times[v]
        for position, image in enumerate(_sorted_slices(volume.datasets), start=1):
            frame = Dataset()
            content = Dataset()
            content.FrameAcquisitionNumber = 1
            content.FrameReferenceDateTime = acquired.strftime("%Y%m%d%H%M%S")
            content.FrameAcquisitionDateTime = acquired.strftime("%Y%m%d%H%M%S")
            content.FrameAcquisitionDuration = 10000.0
            content.StackID = "1"
            content.InStackPositionNumber = position
            if temporal:
                content.TemporalPositionIndex = volume.temporal_position
            content.DimensionIndexValues = ([volume.temporal_position] if temporal else []) + [1, position]
            frame.FrameContentSequence = DicomSequence([content])
            frame.PlanePositionSequence = _item(ImagePositionPatient=list(image.ImagePositionPatient))
            frame.MRImageFrameTypeSequence = _item(
                FrameType=list(volume.frame_type),
                PixelPresentation="MONOCHROME",
                VolumetricProperties="VOLUME",
                VolumeBasedCalculationTechnique="NONE",
                ComplexImageComponent="MAGNITUDE",
                AcquisitionContrast=acquisition_contrast,
            )
            frame.MREchoSequence = _item(EffectiveEchoTime=float(image.EchoTime))
            if b_values is not None and b_values[v] is not None:
                frame.MRDiffusionSequence = _item(
                    DiffusionBValue=float(b_values[v]),
                    DiffusionDirectionality="ISOTROPIC" if b_values[v] else "NONE",
                )
            if contrast:
                frame.ContrastBolusUsageSequence = _item(
                    ContrastBolusAgentNumber=1,
                    ContrastBolusAgentAdministered="YES" if volume.agent_phase != "PRE_CONTRAST" else "NO",
                    ContrastBolusAgentDetected="",
                    ContrastBolusAgentPhase=volume.agent_phase or "PRE_CONTRAST",
                )
            per_frame.append(frame)
            planes.append(image.pixel_array.astype(np.uint16))
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.NumberOfFrames = len(per_frame)
    ds.PixelData = np.stack(planes).tobytes()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENHANCED_MR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def enhanced_study(source: Path, truth, target: Path) -> dict[str, set[tuple[str, int]]]:
    """The generator's classic ``separate``-layout study ``source`` (its ``truth``) rewritten as Enhanced MR into
    ``target``: T2WI, the coronal T2, the ADC map, the subtraction and the MIP one instance each; the DWI's two
    b-values in one instance (MR Diffusion per frame); in-phase and opposed-phase in one instance (FrameType and
    MR Echo per frame); the four dynamic phases in one instance of four temporal positions (Contrast/Bolus Usage
    per frame). The localizer and the lesion SEG are copied as they are.

    Returns:
        phase -> its frames, ``(SOPInstanceUID, frame number)``.
    """
    import shutil

    import pydicom

    def read(folder: str) -> list[Dataset]:
        return [pydicom.dcmread(path) for path in sorted((source / folder).glob("*.dcm"))]

    phase_uids = {phase: set(uids) for phase, uids in truth.phase_instance_uids.items()}
    written: dict[str, set[tuple[str, int]]] = {}

    def save(ds: Dataset, folder: str, phases: Sequence[str | None]) -> None:
        (target / folder).mkdir(parents=True, exist_ok=True)
        ds.save_as(target / folder / "ENHANCED.dcm", enforce_file_format=True)
        per_volume = len(ds.PerFrameFunctionalGroupsSequence) // len(phases)
        for v, phase in enumerate(phases):
            if phase is not None:
                written[phase] = {(str(ds.SOPInstanceUID), v * per_volume + k) for k in range(1, per_volume + 1)}

    def one(folder: str, frame_type, contrast: str, phase: str | None, b_value=None) -> None:
        datasets = read(folder)
        ds = enhanced_mr_image(
            [EnhancedVolume(datasets, frame_type)], str(datasets[0].SeriesInstanceUID), int(datasets[0].SeriesNumber),
            str(datasets[0].SeriesDescription), contrast, None if b_value is None else [b_value],
        )  # fmt: skip
        save(ds, folder, [phase])

    dirs = truth.series_dirs
    distractor_dirs = {}
    for folder in sorted(p.name for p in source.iterdir() if p.is_dir()):
        uid = str(pydicom.dcmread(next((source / folder).glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)
        distractor_dirs.update({kind: folder for kind, value in truth.distractors.items() if value == uid})
    one(dirs["T2WI"], ("ORIGINAL", "PRIMARY", "VOLUME", "NONE"), "T2", "T2WI")
    one(distractor_dirs["t2cor"], ("ORIGINAL", "PRIMARY", "VOLUME", "NONE"), "T2", None)
    one(distractor_dirs["adc"], ("DERIVED", "PRIMARY", "DIFFUSION", "ADC"), "DIFFUSION", None)
    one(distractor_dirs["sub"], ("DERIVED", "PRIMARY", "VOLUME", "SUBTRACTION"), "T1", None)
    one(distractor_dirs["mip"], ("DERIVED", "PRIMARY", "VOLUME", "MAXIMUM"), "T1", None)

    dwi = read(dirs["DWI"])
    high = [ds for ds in dwi if str(ds.SOPInstanceUID) in phase_uids["DWI"]]
    low = [ds for ds in dwi if str(ds.SOPInstanceUID) not in phase_uids["DWI"]]
    kind = ("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE")
    ds = enhanced_mr_image(
        [EnhancedVolume(low, kind), EnhancedVolume(high, kind)], str(dwi[0].SeriesInstanceUID),
        int(dwi[0].SeriesNumber), str(dwi[0].SeriesDescription), "DIFFUSION", b_values=[50.0, 800.0],
    )  # fmt: skip
    save(ds, dirs["DWI"], [None, "DWI"])

    dixon = {phase: read(dirs[phase]) for phase in ("In Phase", "Out Phase")}
    ds = enhanced_mr_image(
        [
            EnhancedVolume(dixon["In Phase"], ("ORIGINAL", "PRIMARY", "VOLUME", "IN_PHASE")),
            EnhancedVolume(dixon["Out Phase"], ("ORIGINAL", "PRIMARY", "VOLUME", "OUT_PHASE")),
        ],
        str(dixon["In Phase"][0].SeriesInstanceUID), int(dixon["In Phase"][0].SeriesNumber), "t1_dixon_tra", "T1",
    )  # fmt: skip
    save(ds, dirs["In Phase"], ["In Phase", "Out Phase"])

    phases = ("C-pre", "C+A", "C+V", "C+Delay")
    agent = {"C-pre": "PRE_CONTRAST", "C+A": "ARTERIAL", "C+V": "PORTAL_VENOUS", "C+Delay": "DELAYED"}
    dynamic = [
        EnhancedVolume(read(dirs[p]), ("ORIGINAL", "PRIMARY", "DYNAMIC", "NONE"), agent[p], t)
        for t, p in enumerate(phases, start=1)
    ]
    first = dynamic[0].datasets[0]
    ds = enhanced_mr_image(dynamic, str(first.SeriesInstanceUID), int(first.SeriesNumber), "t1_dynamic_tra", "T1")
    save(ds, dirs["C-pre"], list(phases))

    for kind in ("loc",):
        shutil.copytree(source / distractor_dirs[kind], target / distractor_dirs[kind])
    shutil.copytree(source / Path(truth.seg_path).parent, target / Path(truth.seg_path).parent)
    return written
