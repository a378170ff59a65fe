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
"""Lesions marked by a reader in a web viewer: a TID 1500 measurement SR in the study is the lesion source.

The reader's SR is built with highdicom the way OHIF writes one through dcmjs (dcmjs-org/dcmjs
``src/utilities/TID300/TID300Measurement.js``: a TID 1501 group of tracking identifier, finding site and NUMs;
``Ellipse.js``: the ELLIPSE SCOORD INFERRED FROM the Area NUM, SELECTED FROM the image), plus a highdicom-style
TID 1410 group (the closed POLYLINE at the group level) and a POINT with a diameter NUM in mm.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from deploy_fixtures import (  # noqa: F401 - fixtures
    attention_files,
    deploy_model,
    generated_study,
    run_app,
    sr_files,
)

pytestmark = pytest.mark.slow

OHIF_ELLIPSE = "Cornerstone3DTools@^0.1.0:EllipticalROI"  # the tracking identifier OHIF's SRs carry per tool


def _reader_sr(folder: Path, truth) -> pydicom.Dataset:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    images = sorted(
        (pydicom.dcmread(p, stop_before_pixels=True) for p in (folder / truth.series_dirs["C+A"]).glob("*.dcm")),
        key=lambda ds: int(ds.InstanceNumber),
    )
    by_uid = {ds.SOPInstanceUID: ds for ds in images}
    groups = []
    for n, lesion in enumerate(truth.lesions):
        x0, y0, z0, x1, y1, z1 = lesion.box_voxels
        image = images[(z0 + z1 - 1) // 2]  # truth z = instance order of the C+A series
        source = hd.sr.SourceImageForRegion(image.SOPClassUID, image.SOPInstanceUID)
        xc, yc = (x0 + x1) / 2, (y0 + y1) / 2
        tracking = hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=[OHIF_ELLIPSE, "freehand", "probe"][n])
        sites = [hd.sr.FindingSite(codes.SCT.Liver)]
        if n == 0:  # OHIF: TID 1501, the ellipse under the Area NUM
            ellipse = np.array([[x0, yc], [x1, yc], [xc, y0], [xc, y1]], dtype=np.float32)
            area = hd.sr.Measurement(
                name=codes.SCT.Area, value=123.4, unit=codes.UCUM.SquareMillimeter,
                referenced_coordinates=[hd.sr.CoordinatesForMeasurement("ELLIPSE", ellipse, source)],
            )  # fmt: skip
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(tracking, finding_sites=sites, measurements=[area])
            )
        elif n == 1:  # highdicom: TID 1410, a closed polyline at the group level
            outline = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)
            groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking, referenced_region=hd.sr.ImageRegion("POLYLINE", outline, source), finding_sites=sites
                )
            )
        else:  # a point with its size
            spacing = float(image.PixelSpacing[1])
            diameter = hd.sr.Measurement(
                name=codes.SCT.Diameter, value=(x1 - x0) * spacing, unit=codes.UCUM.Millimeter,
                referenced_coordinates=[hd.sr.CoordinatesForMeasurement("POINT", np.array([[xc, yc]]), source)],
            )  # fmt: skip
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(tracking, finding_sites=sites, measurements=[diameter])
            )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_person_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Person,
                observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name="Reader^Test"),
            )
        ),
        procedure_reported=codes.cid100.MultiparametricMRI,
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=list(by_uid.values()), content=report, series_instance_uid=hd.UID(), series_number=900,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="Test web viewer", is_complete=True,
    )  # fmt: skip


def test_lesions_from_a_readers_measurement_sr(deploy_model, dciodvfy, tmp_path, monkeypatch):  # noqa: F811
    from test_deploy_app import check_sr

    folder, truth = generated_study(tmp_path, "reader-sr", seed=41, naming_style="ge", num_lesions=3)
    study = tmp_path / "study"
    shutil.copytree(folder, study, ignore=shutil.ignore_patterns("series_100"))  # no SEG: the reader's SR instead
    reader = _reader_sr(study, truth)
    (study / "series_900").mkdir()
    reader.save_as(study / "series_900" / "SR.dcm", enforce_file_format=True)
    out = tmp_path / "out"
    assert run_app(["-i", str(study), "-o", str(out), "-m", str(deploy_model)], monkeypatch=monkeypatch) == 0
    (sr_path,) = sr_files(out)
    predicted = check_sr(sr_path, truth, deploy_model, study, dciodvfy, boxes_from_truth=False)
    assert list(predicted) == [OHIF_ELLIPSE, "freehand", "probe"]

    import highdicom as hd
    from pydicom.sr.codedict import codes

    from deploy_app.operators.sr_writer_operator import lesion_id_of

    sr = hd.sr.srread(sr_path)
    lesions = [g for g in sr.content.get_image_measurement_groups() if g.finding_type == codes.SCT.Lesion]
    for group, lesion in zip(lesions, truth.lesions, strict=True):
        (region,) = group.get_measurements()[0].referenced_coordinates
        (x0, y0), (x1, y1) = region.value[0], region.value[2]
        np.testing.assert_allclose([x0, y0, x1, y1], np.asarray(lesion.box_voxels)[[0, 1, 3, 4]], atol=1.5)

    # run again on the study as the PACS would give it back, holding everything this run wrote (SR, attention SEG,
    # summary page, key objects): none is a lesion source or a phase, so the same three lesions come out
    (attention,) = attention_files(out)
    shutil.copy(sr_path, study / "series_900" / "previous-result.dcm")
    shutil.copy(attention, study / "series_900" / "previous-attention.dcm")
    for prefix in ("summary-", "key-images-"):
        shutil.copy(next(out.glob(f"{prefix}*.dcm")), study / "series_900" / f"previous-{prefix}.dcm")
    again = tmp_path / "again"
    assert run_app(["-i", str(study), "-o", str(again), "-m", str(deploy_model)], monkeypatch=monkeypatch) == 0
    (second,) = sr_files(again)
    groups = hd.sr.srread(second).content.get_image_measurement_groups()
    assert [lesion_id_of(g.tracking_identifier) for g in groups if g.finding_type == codes.SCT.Lesion] == list(
        predicted
    )


def test_point_without_size_is_refused(tmp_path):
    """A POINT alone says nothing of the lesion's size: the error names the SR and the group."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from deploy_app.errors import StudyInputError
    from deploy_app.reader_sr import reader_boxes

    folder, truth = generated_study(tmp_path, "reader-sr-point", seed=42, naming_style="siemens", num_lesions=1)
    image = pydicom.dcmread(next((folder / truth.series_dirs["C+A"]).glob("*.dcm")), stop_before_pixels=True)
    source = hd.sr.SourceImageForRegion(image.SOPClassUID, image.SOPInstanceUID)
    point = hd.sr.Measurement(
        name=codes.SCT.Area, value=1.0, unit=codes.UCUM.SquareMillimeter,
        referenced_coordinates=[hd.sr.CoordinatesForMeasurement("POINT", np.array([[10.0, 10.0]]), source)],
    )  # fmt: skip
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="probe"), measurements=[point]
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(),
        procedure_reported=codes.cid100.MultiparametricMRI,
        imaging_measurements=[group],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[image], content=report, series_instance_uid=hd.UID(), series_number=900,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="Test web viewer",
    )  # fmt: skip
    with pytest.raises(StudyInputError, match=r"group 1 \('probe'\): a POINT needs a size"):
        reader_boxes([sr], [image])
