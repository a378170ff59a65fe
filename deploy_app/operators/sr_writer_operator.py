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
"""The TID 1500 Comprehensive 3D SR of a study's lesion classifications and the attention SEG, built with highdicom.

Content (two measurement groups, TID 1501, per lesion)::

    Imaging Measurement Report (TID 1500), observer = device (algorithm name, DeviceUID from the weights hash)
      Procedure reported: Multiparametric MRI
      Measurement Group                                   -- the lesion
        Tracking Identifier "Cornerstone3DTools@^0.1.0:RectangleROI:<lesion id>", Tracking Unique Identifier
        Finding: Lesion; Algorithm Identification (TID 4019); Finding Site: Liver
        NUM "Probability of <class>" in % (UCUM), one per class, the predicted class first, then descending;
            the first one INFERRED FROM an Image Region: POLYLINE (closed), the lesion's box on the C+A image
            through the lesion centre
        Qualitative evaluation Diagnosis = <SNOMED CT code of the predicted class>
      Measurement Group                                   -- the model's explanation, not part of the lesion
        Tracking Identifier "Cornerstone3DTools@^0.1.0:RectangleROI:<lesion id> attention"
        Finding: Network attention map (local code); Algorithm Identification
        NUM "Peak network attention" INFERRED FROM a POLYLINE: the most-attended patch

The whole attention map of every lesion is a fractional SEG (:mod:`deploy_app.attention_seg`), written beside the SR,
sent with it, and listed in the SR's evidence; a viewer overlays it on the C+A series.

Why this shape (what readers do with it; OHIF 3.13.2's cornerstone-dicom-sr extension and its dcmjs adapters):

- Web viewers label a group's region with its NUM items, then its finding site, and show at most five labels
  ("Probability of liver cell carcinoma: 87.31 %" first). They draw the group's first SCOORD and, to track the
  measurement ("track measurements"), look for its region inside the group's first NUM (INFERRED FROM), as the
  measurement SRs they write themselves (TID 1501 groups of NUMs inferred from SCOORDs). TID 1410/1411 put the
  region at the group level and forbid one under a NUM (highdicom enforces it), so every group is TID 1501.
- A group without any region makes OHIF's SR viewport fail ("Cannot read properties of undefined (reading
  'ReferencedSOPSequence')"), so the attention group carries the most-attended patch as its region; it is its own
  group, clearly named, never a region of the lesion.
- OHIF tracks a group only when its tracking identifier starts with a cornerstone tool's
  ("Cornerstone3DTools@^0.1.0:RectangleROI", a rectangle being what both boxes are), and logs an error for any
  group it cannot track; the lesion id follows the prefix, :func:`lesion_id_of` takes it back.
- Every CONTAINER is SEPARATE: a CONTINUOUS container is a running text, and ``dsr2html`` renders it as bare
  values ("0.0743 1 0.3549 1 ... Polyline").

A lesion taken from a SEG is traceable by its tracking identifier (the segment label) and the SEG is part of the
evidence. Every UID written is derived from the study and the weights (:mod:`deploy_app.uids`): the same study with
the same model gives the same SOP Instance UIDs, so a PACS replaces the earlier result instead of adding a series.
The document is complete, preliminary and never verified; the series says "NOT FOR CLINICAL USE".
"""

from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from monai.deploy.core import Fragment, Operator, OperatorSpec
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from ..attention_seg import build_attention_seg
from ..domain import MANUFACTURER, LesionResult, StudyResult
from ..lesion_codes import (
    ATTENTION_TYPE,
    DIAGNOSIS,
    LESION_CODES,
    LOCAL_SCHEME_DESIGNATOR,
    LOCAL_SCHEME_NAME,
    PEAK_ATTENTION,
    PERCENT,
    probability_code,
)
from ..multiframe import frame_numbers
from ..uids import derived_uid, device_uid

__all__ = [
    "ATTENTION_FILE_PREFIX",
    "VIEWER_TOOL_PREFIX",
    "attention_identifier",
    "lesion_id_of",
    "tracking_identifier",
    "ClassificationSRWriterOperator",
    "MANUFACTURER",
    "SERIES_DESCRIPTION",
    "build_outputs",
    "build_sr",
    "device_uid",
    "separate_containers",
    "write_dicom",
    "write_sr",
]

SERIES_DESCRIPTION = "LCA-DB lesion classification - NOT FOR CLINICAL USE"
#: Start of each lesion group's tracking identifier, the lesion id follows (see the module docstring).
VIEWER_TOOL_PREFIX = "Cornerstone3DTools@^0.1.0:RectangleROI:"
#: File name prefix of the attention SEG in the output folder (the SR is ``<SOPInstanceUID>.dcm``).
ATTENTION_FILE_PREFIX = "attention-"
_CONTRIBUTION = "AI liver lesion classification (LCA-DB), research use only, not for clinical use"


def _polygon(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    # SCOORD pixel coordinates (column, row), (0, 0) being the top-left corner of the top-left pixel
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)


def _uid(study: StudyResult, role: str) -> str:
    return derived_uid(study.content_identity, role)


def tracking_identifier(lesion_id: str) -> str:
    """Tracking identifier of a lesion's group (see the module docstring)."""
    return f"{VIEWER_TOOL_PREFIX}{lesion_id}"


def attention_identifier(lesion_id: str) -> str:
    """Tracking identifier of a lesion's attention group."""
    return f"{VIEWER_TOOL_PREFIX}{lesion_id} attention"


def lesion_id_of(identifier: str) -> str:
    """The lesion id in a lesion group's tracking identifier."""
    return identifier.removeprefix(VIEWER_TOOL_PREFIX)


def _source(result: LesionResult, study: StudyResult) -> hd.sr.SourceImageForRegion:
    """The C+A image through the lesion's centre, where its regions are drawn."""
    _, _, z0, _, _, z1 = result.lesion.box
    image = study.volume.reference_slices[(z0 + z1 - 1) // 2]
    return hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=image.SOPClassUID,
        referenced_sop_instance_uid=image.SOPInstanceUID,
        referenced_frame_numbers=frame_numbers(image),
    )


def _lesion_group(result: LesionResult, study: StudyResult, algorithm: hd.sr.AlgorithmIdentification):
    lesion = result.lesion
    x0, y0, _, x1, y1, _ = lesion.box
    source = _source(result, study)
    region = hd.sr.CoordinatesForMeasurement(
        graphic_type="POLYLINE", graphic_data=_polygon(x0, y0, x1, y1), source_image=source
    )
    order = sorted(range(len(study.class_names)), key=lambda c: -float(result.probabilities[c]))
    measurements = [
        hd.sr.Measurement(
            name=probability_code(study.class_names[c]),
            value=round(100.0 * float(result.probabilities[c]), 2),
            unit=PERCENT,
            # the region of a tracked measurement, where viewers look for it (see the module docstring)
            referenced_coordinates=[region] if rank == 0 else None,
        )
        for rank, c in enumerate(order)
    ]
    predicted = study.class_names[result.class_index]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_uid(study, f"tracking {lesion.lesion_id}"), identifier=tracking_identifier(lesion.lesion_id)
        ),
        finding_type=codes.SCT.Lesion,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Liver)],
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=DIAGNOSIS, value=LESION_CODES[predicted])],
    )


def _attention_group(result: LesionResult, study: StudyResult, algorithm: hd.sr.AlgorithmIdentification):
    lesion_id = result.lesion.lesion_id
    px0, py0, _, px1, py1, _ = result.patch_box
    patch = hd.sr.CoordinatesForMeasurement(
        graphic_type="POLYLINE", graphic_data=_polygon(px0, py0, px1, py1), source_image=_source(result, study)
    )
    peak = hd.sr.Measurement(
        name=PEAK_ATTENTION, value=round(100.0 * float(np.max(result.attention)), 2), unit=PERCENT,
        referenced_coordinates=[patch],
    )  # fmt: skip
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_uid(study, f"attention-group {lesion_id}"), identifier=attention_identifier(lesion_id)
        ),
        finding_type=ATTENTION_TYPE,
        algorithm_id=algorithm,
        measurements=[peak],
    )


def separate_containers(item: Dataset) -> None:
    """Set ContinuityOfContent SEPARATE on ``item`` and every CONTAINER below it (see the module docstring)."""
    if item.get("ValueType") == "CONTAINER":
        item.ContinuityOfContent = "SEPARATE"
    for child in item.get("ContentSequence", []):
        separate_containers(child)


def _series_number(study: StudyResult, offset: int) -> int:
    numbers = [int(ds.SeriesNumber) for ds in study.volume.study_datasets if ds.get("SeriesNumber") is not None]
    return max(numbers, default=0) + offset


def build_sr(study: StudyResult, attention_seg: Dataset) -> hd.sr.Comprehensive3DSR:
    """The SR document of one study (see the module docstring), referencing ``attention_seg``."""
    algorithm = hd.sr.AlgorithmIdentification(
        name=study.model_name, version=study.model_version, family=codes.cid7162.ArtificialIntelligence
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(study.weights_sha256),
            name=study.model_name,
            manufacturer_name=MANUFACTURER,
            model_name=study.model_name,
        ),
    )
    groups = [_lesion_group(result, study, algorithm) for result in study.lesions]
    groups += [_attention_group(result, study, algorithm) for result in study.lesions]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.cid100.MultiparametricMRI,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    separate_containers(report[0])
    equipment = hd.ContributingEquipment(  # IHE AI Results: the algorithm as processing equipment
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=study.model_name,
        software_versions=study.model_version,
        contribution_datetime=datetime.datetime.now(),
        contribution_description=_CONTRIBUTION,
    )
    evidence: list[Dataset] = list(study.volume.source_datasets)
    segs = {r.lesion.segmentation.SOPInstanceUID: r.lesion.segmentation for r in study.lesions if r.lesion.segmentation}
    evidence.extend(segs.values())
    reports = {
        r.lesion.source_report.SOPInstanceUID: r.lesion.source_report for r in study.lesions if r.lesion.source_report
    }
    evidence.extend(reports.values())
    evidence.append(attention_seg)
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=_uid(study, "sr-series"),
        series_number=_series_number(study, 1),
        sop_instance_uid=_uid(study, "sr-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=study.model_name,
        software_versions=study.model_version,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=SERIES_DESCRIPTION,
        contributing_equipment=[equipment],
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=LOCAL_SCHEME_DESIGNATOR, name=LOCAL_SCHEME_NAME, responsible_organization=MANUFACTURER
            )
        ],
    )


def build_outputs(study: StudyResult) -> tuple[hd.sr.Comprehensive3DSR, hd.seg.Segmentation]:
    """The SR and the attention SEG it references."""
    seg = build_attention_seg(study, series_number=_series_number(study, 2))
    return build_sr(study, seg), seg


def write_dicom(ds: Dataset, output_folder: Path, prefix: str = "") -> Path:
    """Write ``ds`` as ``<prefix><SOPInstanceUID>.dcm``, through a hidden temporary file renamed when complete."""
    output_folder = Path(output_folder)
    output_folder.mkdir(parents=True, exist_ok=True)
    final = output_folder / f"{prefix}{ds.SOPInstanceUID}.dcm"
    partial = output_folder / f".{final.name}.partial"
    try:
        ds.save_as(partial, enforce_file_format=True)
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    return final


def write_sr(sr: Dataset, output_folder: Path) -> Path:
    """Write the SR as ``<SOPInstanceUID>.dcm`` (see :func:`write_dicom`)."""
    return write_dicom(sr, output_folder)


class ClassificationSRWriterOperator(Operator):
    """Writes the study's classification result as a TID 1500 Comprehensive 3D SR.

    Named input:
        result: the :class:`deploy_app.domain.StudyResult` of the inference operator.

    Named output:
        output_paths: paths of the written files, the attention SEG first, then the SR that references it
            (receiver optional).

    File output:
        ``<output_folder>/<SOPInstanceUID>.dcm`` (the SR) and ``<output_folder>/attention-<SOPInstanceUID>.dcm``
        (the attention SEG), each written to a hidden temporary file and renamed when complete.
    """

    def __init__(self, fragment: Fragment, *args, output_folder: Path, **kwargs):
        self.output_folder = Path(output_folder)
        self.input_name_result = "result"
        self.output_name_paths = "output_paths"
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        from monai.deploy.core import ConditionType

        spec.input(self.input_name_result)
        spec.output(self.output_name_paths).condition(ConditionType.NONE)

    def compute(self, op_input, op_output, context):
        result = op_input.receive(self.input_name_result)
        if not isinstance(result, StudyResult) or not result.lesions:
            raise ValueError(
                f"{self.input_name_result} must be a StudyResult with lesions, got {type(result).__name__}."
            )
        sr, seg = build_outputs(result)
        seg_path = write_dicom(seg, self.output_folder, ATTENTION_FILE_PREFIX)
        path = write_sr(sr, self.output_folder)
        self._logger.info("Wrote SR %s (%d lesions) and attention SEG %s.", path, len(result.lesions), seg_path.name)
        op_output.emit([seg_path, path], self.output_name_paths)
