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
"""The TID 1500 Comprehensive 3D SR of a study's lesion classifications, built with highdicom.

Content (one measurement group, TID 1411, per lesion)::

    Imaging Measurement Report (TID 1500), observer = device (algorithm name, DeviceUID from the weights hash)
      Procedure reported: Multiparametric MRI
      Measurement Group
        Tracking Identifier "<lesion id>", Tracking Unique Identifier <UID>
        Finding: Lesion; Finding Site: Liver; Algorithm Identification (TID 4019)
        Image Region POLYLINE (closed) 1: the lesion's box on the C+A image through the lesion centre
        Image Region POLYLINE (closed) 2: the most-attended 32x32 patch of the network, on the same image
        Qualitative evaluation Diagnosis = <SNOMED CT code of the predicted class>
        NUM "Probability of <class>" (1 per class, UCUM "1" no units)

TID 1411 allows one kind of region per group (image regions, a volume surface or a segment), so both
regions are planar image regions, in this order; a lesion taken from a SEG is traceable by its tracking
identifier (the segment label) and the SEG is part of the evidence. The document is complete, preliminary
and never verified; the series says "NOT FOR CLINICAL USE".
"""

from __future__ import annotations

import datetime
import logging
import os
import uuid
from pathlib import Path

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from monai.deploy.core import Fragment, Operator, OperatorSpec
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from ..domain import LesionResult, StudyResult
from ..lesion_codes import (
    DIAGNOSIS,
    LESION_CODES,
    LOCAL_SCHEME_DESIGNATOR,
    LOCAL_SCHEME_NAME,
    NO_UNITS,
    probability_code,
)

__all__ = [
    "ClassificationSRWriterOperator",
    "MANUFACTURER",
    "SERIES_DESCRIPTION",
    "build_sr",
    "device_uid",
    "write_sr",
]

MANUFACTURER = "LCA-DB MONAI plugin contributors"
SERIES_DESCRIPTION = "LCA-DB lesion classification - NOT FOR CLINICAL USE"
_DEVICE_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:lcadb-monai:deploy-app:device-uid")
_CONTRIBUTION = "AI liver lesion classification (LCA-DB), research use only, not for clinical use"


def device_uid(weights_sha256: str) -> str:
    """DeviceUID of the algorithm: the ``2.25.`` form (PS3.5 B.2) of a name-based UUID of the weights' hash, so it
    is the same for the same weights and changes with them. (pydicom's ``generate_uid(prefix=None)`` is random.)"""
    return f"2.25.{uuid.uuid5(_DEVICE_UID_NAMESPACE, weights_sha256).int}"


def _polygon(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    # SCOORD pixel coordinates (column, row), (0, 0) being the top-left corner of the top-left pixel
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)


def _group(result: LesionResult, study: StudyResult, algorithm: hd.sr.AlgorithmIdentification):
    lesion = result.lesion
    x0, y0, z0, x1, y1, z1 = lesion.box
    image = study.volume.reference_slices[(z0 + z1 - 1) // 2]
    source = hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=image.SOPClassUID, referenced_sop_instance_uid=image.SOPInstanceUID
    )
    px0, py0, _, px1, py1, _ = result.patch_box
    regions = [
        hd.sr.ImageRegion(graphic_type="POLYLINE", graphic_data=_polygon(x0, y0, x1, y1), source_image=source),
        hd.sr.ImageRegion(graphic_type="POLYLINE", graphic_data=_polygon(px0, py0, px1, py1), source_image=source),
    ]
    predicted = study.class_names[result.class_index]
    measurements = [
        hd.sr.Measurement(
            name=probability_code(name), value=float(result.probabilities[c]), unit=NO_UNITS, algorithm_id=algorithm
        )
        for c, name in enumerate(study.class_names)
    ]
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=lesion.lesion_id),
        referenced_regions=regions,
        finding_type=codes.SCT.Lesion,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Liver)],
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=DIAGNOSIS, value=LESION_CODES[predicted])],
    )


def build_sr(study: StudyResult) -> hd.sr.Comprehensive3DSR:
    """The SR document of one study (see the module docstring)."""
    uid = device_uid(study.weights_sha256)
    algorithm = hd.sr.AlgorithmIdentification(
        name=study.model_name, version=study.model_version, family=codes.cid7162.ArtificialIntelligence
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uid, name=study.model_name, manufacturer_name=MANUFACTURER, model_name=study.model_name
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.cid100.MultiparametricMRI,
        imaging_measurements=[_group(result, study, algorithm) for result in study.lesions],
        title=codes.cid7021.ImagingMeasurementReport,
    )
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
    series_numbers = [int(ds.SeriesNumber) for ds in study.volume.study_datasets if ds.get("SeriesNumber") is not None]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=hd.UID(),
        series_number=max(series_numbers, default=0) + 1,
        sop_instance_uid=hd.UID(),
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
    return sr


def write_sr(sr: Dataset, output_folder: Path) -> Path:
    """Write the SR as ``<SOPInstanceUID>.dcm``, through a hidden temporary file renamed when complete."""
    output_folder = Path(output_folder)
    output_folder.mkdir(parents=True, exist_ok=True)
    final = output_folder / f"{sr.SOPInstanceUID}.dcm"
    partial = output_folder / f".{final.name}.partial"
    try:
        sr.save_as(partial, enforce_file_format=True)
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    return final


class ClassificationSRWriterOperator(Operator):
    """Writes the study's classification result as a TID 1500 Comprehensive 3D SR.

    Named input:
        result: the :class:`deploy_app.domain.StudyResult` of the inference operator.

    Named output:
        sr_path: path of the written file (receiver optional).

    File output:
        ``<output_folder>/<SOPInstanceUID>.dcm``, written to a hidden temporary file and renamed when complete.
    """

    def __init__(self, fragment: Fragment, *args, output_folder: Path, **kwargs):
        self.output_folder = Path(output_folder)
        self.input_name_result = "result"
        self.output_name_path = "sr_path"
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        from monai.deploy.core import ConditionType

        spec.input(self.input_name_result)
        spec.output(self.output_name_path).condition(ConditionType.NONE)

    def compute(self, op_input, op_output, context):
        result = op_input.receive(self.input_name_result)
        if not isinstance(result, StudyResult) or not result.lesions:
            raise ValueError(
                f"{self.input_name_result} must be a StudyResult with lesions, got {type(result).__name__}."
            )
        path = write_sr(build_sr(result), self.output_folder)
        self._logger.info("Wrote SR %s (%d lesions).", path, len(result.lesions))
        op_output.emit(path, self.output_name_path)
