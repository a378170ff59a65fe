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
"""The TID 1500 Comprehensive 3D SR of a study's lesion classifications, with the attention SEG, the summary page
(Secondary Capture) and the key-object selection, built with highdicom.

Content::

    Imaging Measurement Report (TID 1500), observer = device (algorithm name, DeviceUID from the weights hash)
      Procedure reported: Multiparametric MRI
      Qualitative Evaluations
        Impression: "3 lesions classified by the LCA-DB network: Lesion 1 liver cell carcinoma 89.6 % (24 mm); ..."
        Disclaimer: "Research use only, not for clinical use: ..."
      Imaging Measurements
        Measurement Group (TID 1501), one per lesion
          Tracking Identifier "Cornerstone3DTools@^0.1.0:RectangleROI:<lesion id>", Tracking Unique Identifier
          Comment: "<lesion id>: <class> <probability> % [(low margin)]"
          Diagnosis = <SNOMED CT code of the predicted class>
          [Classification margin = Low: next class within 10 percentage points]
          NUM "Probability of <class>" in % (UCUM), one per class, the predicted class first, then descending; the
              first one INFERRED FROM an Image Region: POLYLINE (closed), the lesion's box on the C+A image through
              the lesion centre
          NUM Long axis, Short axis (mm): the sides of that box
          Region location: "series 5 't1_vibe_art' (C+A), image 7 (slice 7 of 16); box columns ..."
          Network attention: the segment of the attention SEG and the most-attended patch, in words
          Finding: Lesion; Finding Site: Liver; Algorithm Identification (TID 4019)

Why this shape: what OHIF 3.13.2 (the npm package's prebuilt viewer the tests drive) and its adapters do with it.
Files of OHIF/Viewers ``extensions/cornerstone-dicom-sr/src/``, cornerstonejs/cornerstone3D
``packages/adapters/src/adapters/Cornerstone3D/`` and dcmjs-org/dcmjs ``src/utilities/``:

- The SR viewport (``getSopClassHandlerModule.ts``, ``_processNonGeometricallyDefinedMeasurement``) labels a
  TID 1501 group's region with its Comment texts first, then "<NUM concept meaning>: <value> <unit>" of each NUM,
  and draws at most five labels; it draws the region it finds under the NUMs.
- "Track measurements" (``utils/hydrateStructuredReport.ts`` -> ``MeasurementReport.generateToolState``) finds the
  tool by the tracking identifier (``BaseAdapter3D.isValidCornerstoneTrackingIdentifier``: it must start with
  "Cornerstone3DTools@^0.1.0:RectangleROI", a rectangle being what the box is), takes the region from the group's
  *first* NUM (``getSetupMeasurementData``: a group with any NUM but no region inside the first one is dropped with
  "Unable to generate tool state"), and the measurement's label from the group's Comment
  (``getCornerstoneLabelFromDefaultState``, ``utils/getLabelFromDCMJSImportedToolData.js``): the Comment is what
  keeps the class and its probability on the tracked measurement (``LabelData.ts`` writes the label there when OHIF
  saves an SR). dcmjs's own writer puts the region under the first NUM only, too (``TID300/Polyline.js``).
- So every group is TID 1501, not TID 1410: a TID 1410 group has its region at group level and NUMs without one
  (TID 1419), which the tracking above drops; highdicom's ``get_image_measurement_groups()`` finds these groups
  and ``get_measurements()[0].referenced_coordinates`` the region.
- The network attention is not a measurement group any more (as its own tracked rectangle it looked like a second
  lesion with an area): it is the attention SEG, an overlay, named in the lesion group's text.
- Order for readers that render in document order (``dsr2html``): each group lists the Comment, the diagnosis,
  then the probabilities, and the report's Qualitative Evaluations (TID 1500 row 12: impression and disclaimer)
  come before its Imaging Measurements (row 6), which departs from the template's row order; every reader tested
  (OHIF, highdicom, dcmjs, dcmtk) finds items by concept name, not by position.
- Every CONTAINER is SEPARATE: a CONTINUOUS container is a running text, and ``dsr2html`` renders it as bare
  values ("0.0743 1 0.3549 1 ... Polyline").
- Comprehensive 3D SR, the SOP class this product documents (every coordinate here is a 2-D SCOORD, which it
  allows); a PACS that refuses it gets the summary page and the key objects instead (:mod:`.pacs_sender_operator`).

A lesion taken from a SEG is traceable by its tracking identifier (the segment label) and the SEG is part of the
evidence. Every UID written is derived from the study and the weights (:mod:`deploy_app.uids`): the same study with
the same model gives the same SOP Instance UIDs, so a PACS replaces the earlier result instead of adding a series.
The document is complete, preliminary and never verified; the series says "NOT FOR CLINICAL USE" and the content
holds the disclaimer.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from monai.deploy.core import Fragment, Operator, OperatorSpec
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from ..attention_seg import ATTENTION_LEVEL, build_attention_seg, segment_label
from ..attention_seg import SERIES_DESCRIPTION as ATTENTION_SERIES_DESCRIPTION
from ..domain import MANUFACTURER, LesionResult, StudyResult
from ..findings import DISCLAIMER_TEXT, LesionFindings, check_one_per_lesion, impression, lesion_findings
from ..lesion_codes import (
    ATTENTION_REGION,
    CLASSIFICATION_MARGIN,
    COMMENT,
    DIAGNOSIS,
    DISCLAIMER,
    IMPRESSION,
    LESION_CODES,
    LOW_MARGIN,
    PERCENT,
    QUALITATIVE_EVALUATIONS,
    REGION_LOCATION,
    local_coding_scheme,
    probability_code,
)
from ..multiframe import frame_numbers
from ..summary import build_key_objects, build_summary_page
from ..uids import derived_uid, device_uid

__all__ = [
    "ATTENTION_FILE_PREFIX",
    "KEY_OBJECTS_FILE_PREFIX",
    "SUMMARY_FILE_PREFIX",
    "VIEWER_TOOL_PREFIX",
    "ClassificationSRWriterOperator",
    "MANUFACTURER",
    "SERIES_DESCRIPTION",
    "StudyOutputs",
    "build_outputs",
    "build_sr",
    "device_uid",
    "lesion_id_of",
    "separate_containers",
    "tracking_identifier",
    "write_dicom",
    "write_outputs",
]

SERIES_DESCRIPTION = "LCA-DB lesion classification - NOT FOR CLINICAL USE"
#: Start of each lesion group's tracking identifier, the lesion id follows (see the module docstring).
VIEWER_TOOL_PREFIX = "Cornerstone3DTools@^0.1.0:RectangleROI:"
#: File name prefixes in the output folder (the SR is ``<SOPInstanceUID>.dcm``).
ATTENTION_FILE_PREFIX = "attention-"
SUMMARY_FILE_PREFIX = "summary-"
KEY_OBJECTS_FILE_PREFIX = "key-images-"
_CONTRIBUTION = "AI liver lesion classification (LCA-DB), research use only, not for clinical use"


def _polygon(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    # SCOORD pixel coordinates (column, row), (0, 0) being the top-left corner of the top-left pixel
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)


def _uid(study: StudyResult, role: str) -> str:
    return derived_uid(study.content_identity, role)


def tracking_identifier(lesion_id: str) -> str:
    """Tracking identifier of a lesion's group (see the module docstring)."""
    return f"{VIEWER_TOOL_PREFIX}{lesion_id}"


def lesion_id_of(identifier: str) -> str:
    """The lesion id in a lesion group's tracking identifier."""
    return identifier.removeprefix(VIEWER_TOOL_PREFIX)


def _text(name: Code, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _attention_words(result: LesionResult, item: LesionFindings) -> str:
    px0, py0, _, px1, py1, _ = result.patch_box
    share = 100.0 * float(np.max(result.attention)) / max(float(np.sum(result.attention)), 1e-12)
    return (
        f"segment '{segment_label(item.lesion_id)}' of the '{ATTENTION_SERIES_DESCRIPTION}' SEG (patches at or above "
        f"{ATTENTION_LEVEL:.0%} of the peak); most-attended patch columns {int(px0)}-{int(np.ceil(px1)) - 1}, rows "
        f"{int(py0)}-{int(np.ceil(py1)) - 1} on the key image, {share:.1f} % of the attention"
    )


# position of each kind of item in a lesion group, by concept code, for readers that render in document order: the
# tracking context, the label, the diagnosis and its flag, the probabilities (NUM in %), the size (NUM in mm), the words
_GROUP_ORDER = {
    COMMENT.value: 1,
    DIAGNOSIS.value: 2,
    CLASSIFICATION_MARGIN.value: 3,
    REGION_LOCATION.value: 6,
    ATTENTION_REGION.value: 7,
}


def _group_position(item: Dataset) -> int:
    if item.RelationshipType == "HAS OBS CONTEXT":
        return 0  # tracking identifier and UID
    concept = item.ConceptNameCodeSequence[0].CodeValue
    if item.ValueType == "NUM":
        return 4 if str(item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue) == "%" else 5
    return _GROUP_ORDER.get(concept, 8)  # then finding, finding site, algorithm


def _lesion_group(
    result: LesionResult, item: LesionFindings, study: StudyResult, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    x0, y0, _, x1, y1, _ = result.lesion.box
    source = hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=item.key_image.SOPClassUID,
        referenced_sop_instance_uid=item.key_image.SOPInstanceUID,
        referenced_frame_numbers=frame_numbers(item.key_image),
    )
    region = hd.sr.CoordinatesForMeasurement(
        graphic_type="POLYLINE", graphic_data=_polygon(x0, y0, x1, y1), source_image=source
    )
    measurements = [
        hd.sr.Measurement(
            name=probability_code(name),
            value=percent,
            unit=PERCENT,
            # the region of a tracked measurement, where viewers look for it (see the module docstring)
            referenced_coordinates=[region] if rank == 0 else None,
        )
        for rank, (name, percent) in enumerate(item.ranking)
    ]
    measurements += [
        hd.sr.Measurement(name=codes.SCT.LongAxis, value=item.long_axis_mm, unit=codes.UCUM.Millimeter),
        hd.sr.Measurement(name=codes.SCT.ShortAxis, value=item.short_axis_mm, unit=codes.UCUM.Millimeter),
    ]
    evaluations = [hd.sr.QualitativeEvaluation(name=DIAGNOSIS, value=LESION_CODES[item.predicted])]
    if item.low_margin:
        evaluations.append(hd.sr.QualitativeEvaluation(name=CLASSIFICATION_MARGIN, value=LOW_MARGIN))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_uid(study, f"tracking {item.lesion_id}"), identifier=tracking_identifier(item.lesion_id)
        ),
        finding_type=codes.SCT.Lesion,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Liver)],
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )
    content = group[0].ContentSequence
    content.append(_text(COMMENT, item.label))  # the viewer's label (see the module docstring)
    content.append(_text(REGION_LOCATION, item.location))
    content.append(_text(ATTENTION_REGION, _attention_words(result, item)))
    ordered = sorted(content, key=_group_position)  # stable: the probabilities keep their ranking
    del content[:]
    content.extend(ordered)
    return group


def separate_containers(item: Dataset) -> None:
    """Set ContinuityOfContent SEPARATE on ``item`` and every CONTAINER below it (see the module docstring)."""
    if item.get("ValueType") == "CONTAINER":
        item.ContinuityOfContent = "SEPARATE"
    for child in item.get("ContentSequence", []):
        separate_containers(child)


def _series_number(study: StudyResult, offset: int) -> int:
    numbers = [int(ds.SeriesNumber) for ds in study.volume.study_datasets if ds.get("SeriesNumber") is not None]
    return max(numbers, default=0) + offset


def _report_evaluations(findings: list[LesionFindings]) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [_text(IMPRESSION, impression(findings)), _text(DISCLAIMER, DISCLAIMER_TEXT)]
    )
    return container


def build_sr(
    study: StudyResult,
    findings: list[LesionFindings],
    attention_seg: Dataset,
    timestamp: datetime.datetime | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR document of one study (see the module docstring), referencing ``attention_seg``.

    Raises:
        ValueError: when ``findings`` does not hold one entry per lesion of ``study``.
    """
    check_one_per_lesion(findings, study)
    timestamp = timestamp or datetime.datetime.now()
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
    groups = [_lesion_group(r, item, study, algorithm) for r, item in zip(study.lesions, findings, strict=True)]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.cid100.MultiparametricMRI,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    root = report[0].ContentSequence
    # impression and disclaimer before the measurements, for readers that render in document order (docstring)
    root.insert(len(root) - 1, _report_evaluations(findings))
    separate_containers(report[0])
    equipment = hd.ContributingEquipment(  # IHE AI Results: the algorithm as processing equipment
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=study.model_name,
        software_versions=study.model_version,
        contribution_datetime=timestamp,
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
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=SERIES_DESCRIPTION,
        contributing_equipment=[equipment],
        coding_schemes=[local_coding_scheme()],
        **study.written_by(timestamp),
    )


@dataclass
class StudyOutputs:
    """Everything the app writes for one study.

    Attributes:
        sr: the TID 1500 SR.
        attention_seg: the binary SEG of the attended regions (in the SR's evidence).
        summary_page: the Secondary Capture summary page.
        key_objects: the Key Object Selection of the key images and the summary page.
    """

    sr: hd.sr.Comprehensive3DSR
    attention_seg: hd.seg.Segmentation
    summary_page: hd.sc.SCImage
    key_objects: hd.ko.KeyObjectSelectionDocument


def build_outputs(study: StudyResult) -> StudyOutputs:
    """The SR, the attention SEG it references, the summary page and the key object selection of one study."""
    timestamp = datetime.datetime.now().replace(microsecond=0)
    findings = [lesion_findings(result, study) for result in study.lesions]
    seg = build_attention_seg(study, series_number=_series_number(study, 2), timestamp=timestamp)
    sr = build_sr(study, findings, seg, timestamp)
    page = build_summary_page(study, findings, _series_number(study, 3), timestamp)
    key_objects = build_key_objects(study, findings, page, _series_number(study, 4), timestamp)
    return StudyOutputs(sr=sr, attention_seg=seg, summary_page=page, key_objects=key_objects)


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


def write_outputs(outputs: StudyOutputs, output_folder: Path) -> list[Path]:
    """Write every output of a study (see :func:`write_dicom`): the attention SEG, the SR, the summary page and the
    key object selection, in that order (the order they are sent in)."""
    return [
        write_dicom(outputs.attention_seg, output_folder, ATTENTION_FILE_PREFIX),
        write_dicom(outputs.sr, output_folder),
        write_dicom(outputs.summary_page, output_folder, SUMMARY_FILE_PREFIX),
        write_dicom(outputs.key_objects, output_folder, KEY_OBJECTS_FILE_PREFIX),
    ]


class ClassificationSRWriterOperator(Operator):
    """Writes the study's classification result: the TID 1500 SR, the attention SEG, the summary page and the key
    object selection.

    Named input:
        result: the :class:`deploy_app.domain.StudyResult` of the inference operator.

    Named output:
        output_paths: paths of the written files: the attention SEG, the SR that references it, the summary page and
            the key object selection (receiver optional).

    File output:
        ``<output_folder>/<SOPInstanceUID>.dcm`` (the SR), ``attention-<SOPInstanceUID>.dcm`` (the attention SEG),
        ``summary-<SOPInstanceUID>.dcm`` (the Secondary Capture summary page) and ``key-images-<SOPInstanceUID>.dcm``
        (the Key Object Selection), each written to a hidden temporary file and renamed when complete.
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
        paths = write_outputs(build_outputs(result), self.output_folder)
        self._logger.info(
            "Wrote SR %s (%d lesions), attention SEG, summary page and key object selection: %s.",
            paths[1], len(result.lesions), ", ".join(p.name for p in paths),
        )  # fmt: skip
        op_output.emit(paths, self.output_name_paths)
