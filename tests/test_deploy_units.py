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
"""Fast tests of the deploy app's parts: codes, phase rules, app.yaml, geometry, resampling, model identity."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from deploy_fixtures import APP_DIR, deploy_model  # noqa: F401 - fixture
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from scripts.constants import LESION_CLASSES, PHASES

from deploy_app import __version__
from deploy_app.errors import ModelPackageError, StudyInputError
from deploy_app.lesion_codes import DIAGNOSIS, LESION_CODES, class_for_code, probability_code, validate_codes

# Vendor protocol names the shipped rules must sort into phases (besides the generator's styles).
VENDOR_NAMES = {
    "siemens": ["t2_haste_tra_mbh", "ep2d_diff_b50_800_tra", "t1_vibe_dixon_tra_in", "t1_vibe_dixon_tra_opp",
                "t1_vibe_fs_tra_pre", "t1_vibe_fs_tra_arterial", "t1_vibe_fs_tra_delayed 3min",
                "t1_vibe_fs_tra_portal venous"],
    "ge": ["Ax T2 SSFSE", "Ax DWI b=800", "Ax DUAL ECHO IN PHASE", "Ax DUAL ECHO OUT PHASE", "Ax LAVA PRE",
           "Ax LAVA ART", "Ax LAVA DELAY", "Ax LAVA PV"],
    "philips": ["T2W_SPAIR", "DWI_b0_800", "T1_FFE_IP", "T1_FFE_OP", "THRIVE_pre", "THRIVE_arterial",
                "THRIVE_delayed", "THRIVE_venous"],
    "lld-mmri": list(PHASES),
}  # fmt: skip
# Series of a real study that must not be taken for any phase.
DISTRACTORS = ["ep2d_diff_b50_800_tra_ADC", "Ax DWI ADC", "localizer", "t1_vibe_fs_tra_arterial_SUB"]


# ---------------------------------------------------------------------------------------------- codes
def test_every_class_has_a_valid_snomed_code():
    validate_codes(LESION_CLASSES)
    assert set(LESION_CODES) == set(LESION_CLASSES)
    assert all(code.scheme_designator == "SCT" and code.value.isdigit() for code in LESION_CODES.values())
    assert len({code.value for code in LESION_CODES.values()}) == len(LESION_CLASSES)
    assert DIAGNOSIS.value == "439401001"
    for name, code in LESION_CODES.items():
        assert class_for_code(code.value, "SCT") == name
        probability = probability_code(name)
        assert class_for_code(probability.value, probability.scheme_designator) == name
        assert len(probability.meaning) <= 64


def test_class_without_code_is_named():
    with pytest.raises(ValueError, match="hepatic_adenoma"):
        validate_codes((*LESION_CLASSES, "hepatic_adenoma"))


# ---------------------------------------------------------------------------------------- phase rules
def _rule_matches(rules: dict, description: str, modality: str = "MR") -> list[str]:
    """Phases whose rule matches, with the SDK selector's semantics (case-insensitive search)."""
    out = []
    for selection in rules["selections"]:
        conditions = selection["conditions"]
        ok = re.search(conditions["Modality"], modality, re.IGNORECASE)
        ok = ok and (
            description.casefold() == conditions["SeriesDescription"].casefold()
            or re.search(conditions["SeriesDescription"], description, re.IGNORECASE)
        )
        if ok:
            out.append(selection["name"])
    return out


def _vendor_names() -> dict[str, list[str]]:
    names = dict(VENDOR_NAMES)
    from scripts.synthetic_dicom import SERIES_DESCRIPTIONS

    for style, descriptions in SERIES_DESCRIPTIONS.items():
        names[f"generator-{style}"] = [descriptions[p] for p in PHASES]
    return names


@pytest.mark.parametrize("style", sorted(_vendor_names()))
def test_phase_rules_select_each_vendor_naming(style):
    from deploy_app.operators.phase_selector_operator import DEFAULT_RULES_FILE, load_phase_rules

    rules = load_phase_rules(DEFAULT_RULES_FILE, PHASES)
    for phase, description in zip(PHASES, _vendor_names()[style], strict=True):
        assert _rule_matches(rules, description) == [phase], f"{style}: {description!r}"
    for description in DISTRACTORS:
        assert _rule_matches(rules, description) == [], description
    assert _rule_matches(rules, _vendor_names()[style][0], modality="CT") == []


def test_phase_rules_file_names_each_phase_once(tmp_path):
    """Name rules are evidence: a phase may have no rule, but not two, and every rule must name a phase."""
    from deploy_app.operators.phase_selector_operator import DEFAULT_RULES_FILE, load_phase_rules

    rules = json.loads(DEFAULT_RULES_FILE.read_text())
    rules["selections"] = [s for s in rules["selections"] if s["name"] != "C+Delay"]
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(rules))
    assert len(load_phase_rules(path, PHASES)["selections"]) == 7
    rules["selections"] += [rules["selections"][0], {"name": "T1 map", "conditions": {}}]
    path.write_text(json.dumps(rules))
    with pytest.raises(StudyInputError, match=r"'T2WI' has 2 rules.*unknown selection names \['T1 map'\]"):
        load_phase_rules(path, PHASES)


# ------------------------------------------------------------------------------------- packaging files
def test_app_yaml_is_a_valid_map_configuration():
    from holoscan_cli.packager.config_reader import ApplicationConfiguration

    from deploy_app.operators.pacs_sender_operator import destinations_from_config

    config = ApplicationConfiguration()
    config.read(APP_DIR / "app.yaml")  # the packager's own reader and checks
    assert "not for clinical use" in config.title()
    yaml = config._config
    assert yaml["application"]["version"] == __version__
    # the CPU MAP's resources: no GPU (python -m deploy_app.map gives the CUDA variant its own, tests/test_map_units.py)
    assert set(yaml["resources"]) >= {"cpu", "memory"} and yaml["resources"].get("gpu", 0) == 0
    assert yaml["application"]["input-formats"] == ["file"]
    assert (APP_DIR / yaml["lcadb"]["phase_rules"]).is_file()
    assert destinations_from_config(yaml["pacs"]) == []  # nothing is sent unless configured
    for name in ("__main__.py", "app.py", "requirements.txt", "README.md"):
        assert (APP_DIR / name).is_file(), name


def test_pacs_configuration_errors_name_the_key():
    from deploy_app.operators.pacs_sender_operator import (
        CStoreDestination,
        StowRsDestination,
        destinations_from_config,
    )

    with pytest.raises(ValueError, match="called_ae_title"):
        destinations_from_config({"cstore": {"enabled": True, "host": "127.0.0.1", "port": 104}})
    with pytest.raises(ValueError, match="url"):
        destinations_from_config({"stowrs": {"enabled": True}})
    both = destinations_from_config(
        {
            "cstore": {"enabled": True, "host": "h", "port": 11112, "called_ae_title": "PACS"},
            "stowrs": {"enabled": True, "url": "http://h/dicom-web/"},
        }
    )
    assert both == [CStoreDestination("h", 11112, "PACS"), StowRsDestination("http://h/dicom-web")]


# ------------------------------------------------------------------------------------------- geometry
def _series(phase_value, shape, spacing, row, col, origin, frame_uid, study_uid, description, number, order=None):
    """Single-frame MR datasets whose pixel values are ``phase_value(world position)``, in slice order ``order``."""
    row, col = np.asarray(row, float), np.asarray(col, float)
    normal = np.cross(row, col)
    cols, rows, slices = shape
    series_uid, out = generate_uid(), []
    for k in order if order is not None else range(slices):
        ipp = np.asarray(origin, float) + normal * spacing[2] * k
        jj, ii = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")  # [rows, cols]
        world = ipp + ii[..., None] * row * spacing[0] + jj[..., None] * col * spacing[1]
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality, ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = "MR", description, number, k + 1
        ds.ImageOrientationPatient = [*row, *col]
        ds.ImagePositionPatient = [float(v) for v in ipp]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # [between rows, between columns]
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 0.5, -100
        values = (phase_value(world) + 100) / 0.5
        ds.PixelData = np.round(values).astype(np.uint16).tobytes()
        out.append(ds)
    return out


def test_series_volume_orders_slices_and_builds_the_affine():
    from deploy_app.operators.phase_volume_operator import series_volume

    f = lambda w: 10 + w[..., 0] + 2 * w[..., 1] + 3 * w[..., 2]  # noqa: E731
    row, col = [1, 0, 0], [0, np.cos(0.3), -np.sin(0.3)]  # oblique
    datasets = _series(f, (6, 5, 4), (1.5, 2.0, 4.0), row, col, (-3, 4, 7), "1.2.3", "1.2", "t2", 1, order=[2, 0, 3, 1])
    volume, affine, ordered = series_volume(datasets, "phase 'T2WI'")
    assert volume.shape == (6, 5, 4)
    assert [ds.InstanceNumber for ds in ordered] == [1, 2, 3, 4]
    index = np.stack(np.meshgrid(*[np.arange(s) for s in volume.shape], indexing="ij"), -1).reshape(-1, 3)
    world = (affine @ np.c_[index, np.ones(len(index))].T)[:3].T
    np.testing.assert_allclose(volume.reshape(-1), f(world), atol=0.51)  # 16-bit quantisation of 0.5
    np.testing.assert_allclose(affine[:3, 0], np.asarray(row) * 1.5)  # columns step along the row direction
    np.testing.assert_allclose(affine[:3, 1], np.asarray(col) * 2.0)


def test_series_volume_rejects_broken_geometry():
    from deploy_app.operators.phase_volume_operator import series_volume

    f = lambda w: w[..., 0] * 0 + 1  # noqa: E731
    datasets = _series(f, (4, 4, 4), (1, 1, 2), [1, 0, 0], [0, 1, 0], (0, 0, 0), "1.2.3", "1.2", "dwi", 2)
    datasets[2].ImagePositionPatient = [0, 0, 4.9]
    with pytest.raises(StudyInputError, match="phase 'DWI': slices are not evenly spaced"):
        series_volume(datasets, "phase 'DWI'")
    del datasets[1].PixelSpacing
    with pytest.raises(StudyInputError, match="phase 'DWI'.*no PixelSpacing"):
        series_volume(datasets, "phase 'DWI'")


def _selected(series_by_phase):
    from monai.deploy.core.domain.dicom_series import DICOMSeries
    from monai.deploy.core.domain.dicom_series_selection import SelectedSeries, StudySelectedSeries
    from monai.deploy.core.domain.dicom_study import DICOMStudy

    study = DICOMStudy(next(iter(series_by_phase.values()))[0].StudyInstanceUID)
    selection = StudySelectedSeries(study)
    for phase, datasets in series_by_phase.items():
        series = DICOMSeries(datasets[0].SeriesInstanceUID)
        for ds in datasets:
            series.add_sop_instance(ds)
        study.add_series(series)
        selection.add_selected_series(SelectedSeries(phase, series, None))
    return selection


def test_phases_with_mixed_geometry_land_on_the_reference_grid():
    """Each phase samples its own linear intensity field on its own grid (axial, oblique, coronal, coarse, shifted);
    trilinear resampling reproduces a linear field exactly, so every phase must match its field at the C+A voxels."""
    from deploy_app.operators.phase_volume_operator import assemble_phases

    frame, study = generate_uid(), generate_uid()
    grids = {  # shape (cols, rows, slices), spacing, row dir, col dir, origin
        # every grid covers the C+A voxel centres x -2..11.5, y -3..13.5, z 0..10
        "T2WI": ((12, 10, 14), (2.0, 2.0, 2.0), [0, 1, 0], [0, 0, -1], (14, -4, 12)),  # sagittal, slices along -x
        "DWI": ((8, 8, 6), (4.0, 4.0, 6.0), [1, 0, 0], [0, 1, 0], (-6, -6, -6)),
        "In Phase": ((16, 16, 8), (2.0, 2.0, 3.0), [1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)], (-6, -8, -6)),
        "Out Phase": ((16, 16, 8), (2.0, 2.0, 3.0), [1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)], (-6, -8, -6)),
        "C-pre": ((14, 14, 10), (2.5, 2.5, 2.5), [1, 0, 0], [0, 1, 0], (-6, -6, -6)),
        "C+A": ((10, 12, 6), (1.5, 1.5, 2.0), [1, 0, 0], [0, 1, 0], (-2, -3, 0)),
        "C+Delay": ((14, 14, 10), (2.5, 2.5, 2.5), [0, 1, 0], [1, 0, 0], (-6, -6, 16)),  # swapped axes, slices along -z
        "C+V": ((14, 14, 10), (2.5, 2.5, 2.5), [-1, 0, 0], [0, 1, 0], (20, -6, 16)),  # flipped x, slices along -z
    }
    coefficients = {p: np.array([1.0 + n, -0.5 * n, 0.25 * n + 0.1]) for n, p in enumerate(PHASES)}
    series = {}
    for number, phase in enumerate(PHASES, start=1):
        f = lambda w, c=coefficients[phase]: 500 + w @ c  # noqa: E731
        shape, spacing, row, col, origin = grids[phase]
        series[phase] = _series(f, shape, spacing, row, col, origin, frame, study, phase, number)
    volume = assemble_phases(_selected(series), PHASES)
    assert volume.image.shape == (8, 10, 12, 6) and volume.reference_phase == "C+A"
    index = np.stack(np.meshgrid(*[np.arange(s) for s in volume.spatial_shape], indexing="ij"), -1).reshape(-1, 3)
    world = (volume.affine @ np.c_[index, np.ones(len(index))].T)[:3].T
    for c, phase in enumerate(PHASES):
        np.testing.assert_allclose(
            volume.image[c].reshape(-1), 500 + world @ coefficients[phase], atol=0.6, err_msg=phase
        )
    assert len(volume.source_datasets) == sum(len(v) for v in series.values())


def test_phases_in_different_frames_of_reference_are_refused():
    from deploy_app.operators.phase_volume_operator import assemble_phases

    f = lambda w: w[..., 0] * 0 + 1  # noqa: E731
    study = generate_uid()
    series = {
        p: _series(
            f, (4, 4, 3), (1, 1, 1), [1, 0, 0], [0, 1, 0], (0, 0, 0), "1.2.3" if p != "DWI" else "9.9", study, p, n
        )
        for n, p in enumerate(PHASES)
    }
    with pytest.raises(StudyInputError, match=r"phases \['DWI'\] are in a different Frame of Reference"):
        assemble_phases(_selected(series), PHASES)


# ----------------------------------------------------------------------------------- model and results
def test_model_identity_and_lookup(deploy_model, tmp_path):  # noqa: F811 - fixture
    from deploy_app.bundle_access import find_model_file, load_model, weights_sha256
    from deploy_app.operators.sr_writer_operator import device_uid

    model = load_model(deploy_model, "cpu")
    assert model.class_names == LESION_CLASSES
    uid = device_uid(model.weights_sha256)
    assert uid.startswith("2.25.") and len(uid) <= 64 and uid == device_uid(weights_sha256(model.network))
    with torch.no_grad():
        next(model.network.parameters()).add_(1e-3)
    assert device_uid(weights_sha256(model.network)) != uid  # the DeviceUID follows the weights

    nested = tmp_path / "models" / "lcadb"
    nested.mkdir(parents=True)
    (nested / "model.ts").write_bytes(deploy_model.read_bytes())
    assert find_model_file(tmp_path / "models") == nested / "model.ts"
    (tmp_path / "models" / "other.ts").write_bytes(deploy_model.read_bytes())
    with pytest.raises(ModelPackageError, match="holds 2 TorchScript files"):
        find_model_file(tmp_path / "models")
    (tmp_path / "notes.ts").write_text("not a model")
    with pytest.raises(ModelPackageError, match="not a TorchScript archive"):
        find_model_file(tmp_path / "notes.ts")


def test_most_attended_patch_maps_back_to_the_reference_grid():
    from deploy_app.domain import LesionROI
    from deploy_app.operators.inference_operator import most_attended_patch

    roi = LesionROI("L1", (26, 36, 5, 34, 52, 7), np.zeros((8, 40, 48, 6)), (10, 20, 3), "test")
    attention = np.array([[0.1, 0.2], [0.6, 0.1]])  # patch row 1 (x), column 0 (y) of a 2 x 2 grid
    box = most_attended_patch(attention, roi, (64, 64, 8))
    np.testing.assert_allclose(box, (10 + 20, 20 + 0, 3, 10 + 40, 20 + 24, 9))
