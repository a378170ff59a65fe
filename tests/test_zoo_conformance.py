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
"""The MONAI model zoo's CI checks, done with MONAI's own API, and a zoo-style unit test of the bundle.

Mirrors Project-MONAI/model-zoo (snapshot dfae206):
- ``ci/verify_bundle.py`` ``verify_bundle_directory`` (necessary and preferred files), ``verify_version_changes``
  (version in changelog), ``verify_metadata_format`` (``monai.bundle.verify_metadata`` with the schema file
  given locally), ``verify_bundle_properties`` (``create_workflow(...).check_properties()`` on inference.json),
  ``verify_data_shape`` (``verify_net_in_out`` on ``network_def``) and ``verify_torchscript`` (``ckpt_export``
  of ``models/model.pt``, which uses ``torch.jit.script``);
- ``.pre-commit-config.yaml`` ``check-added-large-files --maxkb=1024``;
- ``ci/unit_tests/test_endoscopic_inbody_classification.py`` + ``ci/unit_tests/utils.py`` ``check_workflow``:
  train, evaluate and infer as ``ConfigWorkflow`` s with ``bundle_root`` and data overrides, properties checked.
The zoo's real metadata schema (meta_schema_20240725.json) is a release download, not reachable here; the
bundle's offline schema (``bundle/schema/metadata_schema.json``) stands in for it, as in ``test_bundle_units``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow, ckpt_export, verify_metadata, verify_net_in_out
from test_bundle_workflows import TINY

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE = REPO_ROOT / "bundle"
CONFIGS = BUNDLE / "configs"
META = str(CONFIGS / "metadata.json")
LOGGING = str(CONFIGS / "logging.conf")


def _python(code: str, cwd: Path, env_extra: dict | None = None) -> dict:
    """Run ``code`` in a fresh interpreter in ``cwd`` (so nothing of this test session's sys.path helps it)."""
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def shipped_weights() -> Path:
    """``bundle/models/model.pt``, checked to be the checkpoint ``metadata.json`` describes."""
    import hashlib

    path = BUNDLE / "models" / "model.pt"
    assert path.is_file(), "the zoo requires models/model.pt; produce it with `python -m scripts.ship_weights`"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != json.loads((CONFIGS / "metadata.json").read_text())["weights_sha256"]:
        pytest.fail(
            f"{path} is not the shipped checkpoint metadata.json describes (sha256 {digest}): a training run wrote "
            "over it? Restore it with `git checkout bundle/models/model.pt`, or rerun `python -m scripts.ship_weights`."
        )
    return path


def test_bundle_directory_version_and_file_sizes(shipped_weights):
    """verify_bundle.py ``verify_bundle_directory`` and ``verify_version_changes``; pre-commit's 1 MB file limit."""
    for name in ("configs/metadata.json", "LICENSE", "models/model.pt", "configs/inference.json"):
        assert (BUNDLE / name).is_file(), f"the zoo requires {name}"
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    tracked = subprocess.run(
        ["git", "ls-files", "bundle"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "bundle/models/model.pt" in tracked, "the shipped weights must be committed"
    too_large = [f for f in tracked if (REPO_ROOT / f).stat().st_size > 1024 * 1024]
    assert not too_large, f"over the zoo's check-added-large-files limit (1024 KB): {too_large}"


def test_metadata_format_and_no_paper_numbers(shipped_weights):
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    verify_metadata(meta_file=META, filepath=str(BUNDLE / "schema" / "metadata_schema.json"))
    assert meta["eval_metrics"], "the shipped weights' own metrics belong in eval_metrics"
    assert all(k.startswith("synthetic_test_") for k in meta["eval_metrics"]), "only numbers measured on these weights"


def test_properties_and_load_from_any_directory_without_sys_path(shipped_weights, tmp_path):
    """verify_bundle.py ``verify_bundle_properties`` and ``monai.bundle.load`` from outside the bundle folder,
    in a fresh interpreter that never puts the bundle on sys.path; nothing may be generated or read."""
    cache = tmp_path / "cache"
    cache.mkdir()
    result = _python(
        f"""
        import json, os
        import monai.bundle
        from monai.bundle import ConfigWorkflow, create_workflow
        out = {{}}
        for wt, cfg in [("infer", "inference.json"), ("train", "train.json")]:
            w = ConfigWorkflow(workflow_type=wt, config_file="{CONFIGS}/" + cfg, meta_file="{META}",
                               logging_file="{LOGGING}")
            w.initialize()
            out[wt + "_bundle_root"] = os.path.realpath(w.parser.get_parsed_content("bundle_root"))
        w = create_workflow(workflow_type="infer", config_file="{CONFIGS}/inference.json", meta_file="{META}",
                            logging_file="{LOGGING}")
        out["missing"] = w.check_properties()
        net = monai.bundle.load("{BUNDLE.name}", bundle_dir="{BUNDLE.parent}", workflow_type="inference",
                                model_file="models/model.pt", device="cpu")
        out["network"] = type(net).__name__
        out["cache"] = os.listdir("{cache}")
        print(json.dumps(out))
        """,
        cwd=tmp_path,
        env_extra={"LCADB_CACHE": str(cache)},
    )
    assert result["infer_bundle_root"] == result["train_bundle_root"] == str(BUNDLE.resolve())
    assert result["missing"] == []
    assert result["network"] == "LCADBInference"
    assert result["cache"] == [], "checking properties must not generate the default dataset"


def test_data_shape_and_torchscript_export_of_the_shipped_weights(shipped_weights, tmp_path):
    """verify_bundle.py ``verify_data_shape`` and ``verify_torchscript`` (``ckpt_export`` scripts the network)."""
    common = {"meta_file": META, "config_file": str(CONFIGS / "inference.json"), "bundle_root": str(BUNDLE)}
    verify_net_in_out(net_id="network_def", **common)
    ts_path = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts_path), ckpt_file=str(shipped_weights), **common)
    scripted = torch.jit.load(str(ts_path))
    assert not isinstance(scripted, torch.jit.TopLevelTracedModule), "the zoo exports with torch.jit.script"
    from monai.bundle import load

    eager = load(BUNDLE.name, bundle_dir=str(BUNDLE.parent), workflow_type="inference", device="cpu").eval()
    x = torch.randn(2, 8, 32, 32, 8)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager(x), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_zoo_style_train_evaluate_infer_export(tmp_path):
    """ci/unit_tests/test_endoscopic_inbody_classification.py, for this bundle: train 1 epoch, evaluate, infer
    (each a ``ConfigWorkflow`` run through ``check_workflow`` with properties checked), then export."""
    from scripts.synthetic import generate_dataset

    dataset_dir = generate_dataset(tmp_path / "data" / "lcadb", 3, seed=0, progress=False).parent
    override = {**TINY, "bundle_root": str(tmp_path / "bundle"), "dataset_dir": str(dataset_dir)}

    def check_workflow(workflow: ConfigWorkflow) -> None:  # ci/unit_tests/utils.py, check_properties=True
        workflow.initialize()
        assert workflow.check_properties() == []
        workflow.run()
        workflow.finalize()

    files = {"meta_file": META, "logging_file": LOGGING}
    check_workflow(
        ConfigWorkflow(
            workflow_type="train", config_file=str(CONFIGS / "train.json"), max_epochs=1, **files, **override
        )
    )
    ckpt = tmp_path / "bundle" / "models" / "model.pt"
    assert ckpt.is_file()
    check_workflow(
        ConfigWorkflow(
            workflow_type="train",
            config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")],
            **files,
            **override,
        )
    )
    assert json.loads((tmp_path / "bundle" / "eval" / "metrics.json").read_text())["accuracy"] >= 0
    check_workflow(
        ConfigWorkflow(workflow_type="infer", config_file=str(CONFIGS / "inference.json"), **files, **override)
    )
    ts_path = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(ts_path),
        ckpt_file=str(ckpt),
        meta_file=META,
        config_file=str(CONFIGS / "inference.json"),
        bundle_root=str(tmp_path / "bundle"),
        **{k: v for k, v in TINY.items() if k != "num_threads"},
    )
    assert torch.jit.load(str(ts_path))(torch.randn(1, 8, 32, 32, 8)).shape == (1, 7)


def test_checkpoint_of_another_size_names_the_config_to_merge(tmp_path):
    """The shipped inference.json with a paper-size checkpoint (train.json's defaults): a ValueError naming
    paper_size.json. A checkpoint of the light CPU preset (the main job's) loads as it is: same network."""
    from monai.bundle import ConfigParser

    def checkpoint(config_files: list[str], name: str) -> Path:
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / f) for f in config_files])
        path = tmp_path / name
        torch.save(parser.get_parsed_content("network_def").state_dict(), path)
        return path

    def load_into_inference_network(ckpt: Path) -> None:
        workflow = ConfigWorkflow(
            workflow_type="infer",
            config_file=str(CONFIGS / "inference.json"),
            meta_file=META,
            logging_file=LOGGING,
            bundle_root=str(tmp_path),
            ckpt_path=str(ckpt),
            input_path=str(tmp_path / "no_cases"),
        )
        workflow.initialize()
        workflow.parser.get_parsed_content("handlers#0")(workflow.evaluator)  # what the evaluator calls first

    load_into_inference_network(checkpoint(["train.json", "cpu_light.json"], "light.pt"))
    with pytest.raises(ValueError, match=r"paper\.pt does not fit.*fits configs/paper_size\.json .*: merge"):
        load_into_inference_network(checkpoint(["train.json"], "paper.pt"))


def test_inference_command_from_another_directory(shipped_weights, tmp_path):
    """The card's inference command with absolute config paths, run from an unrelated directory: the shipped
    weights are found through the located ``bundle_root`` and ``scripts`` imports without ``PYTHONPATH``."""
    import os

    from scripts.synthetic import generate_dataset

    dataset_dir = generate_dataset(tmp_path / "data" / "lcadb", 3, seed=1, progress=False).parent
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "inference.json")]
    command += ["--meta_file", META, "--logging_file", LOGGING, "--input_path", str(dataset_dir)]
    command += ["--output_dir", str(tmp_path / "out"), "--num_workers", "0"]
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = (tmp_path / "out" / "predictions.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 7, rows  # header + the 7 synthetic test cases
    assert not list(work.iterdir()), "nothing may be written to the working directory"
