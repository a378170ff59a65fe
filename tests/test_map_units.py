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
"""What ``python -m deploy_app.map`` decides before Docker is involved: the packager's inputs (its release manifest,
the pinned SDK, each variant's resources as holoscan-cli reads them) and the messages when something is missing.
The build and run themselves: tests/test_map.py."""

from __future__ import annotations

import importlib.metadata
import re

import pytest
import yaml
from deploy_fixtures import APP_DIR

from deploy_app import map as map_command


def test_packager_accepts_the_written_manifest_and_the_pinned_sdk(tmp_path):
    """The packager's own checks: the manifest validates and lists the installed holoscan-cu13's version (the
    unpinned SDK resolved to 4.6.0, which holoscan-cli 4.2.0 refuses) with our base image."""
    from holoscan_cli.common.artifact_sources import ArtifactSources
    from holoscan_cli.common.sdk_utils import detect_holoscan_version, validate_holoscan_sdk_version

    sources = ArtifactSources(13)
    sources.load(str(map_command.write_release_manifest(tmp_path / "artifacts.json", "127.0.0.1:5000/base:tag")))
    installed = detect_holoscan_version()
    assert installed == map_command.HOLOSCAN_VERSION == importlib.metadata.version("holoscan-cli")
    validate_holoscan_sdk_version(sources, installed)
    assert set(sources.base_image(installed).values()) == {"127.0.0.1:5000/base:tag"}
    requirements = (APP_DIR / "requirements.txt").read_text()
    pins = dict(re.findall(r"^(holoscan[\w-]*)==([\d.]+)", requirements, re.M))
    assert pins == {"holoscan-cu13": installed, "holoscan-cli": installed}  # the MAP installs the same SDK


@pytest.mark.parametrize("variant", sorted(map_command.VARIANTS))
def test_variant_resources_as_the_packager_reads_them(variant, tmp_path):
    from holoscan_cli.packager.config_reader import ApplicationConfiguration

    config = map_command._variant_config(map_command.VARIANTS[variant], tmp_path / "app.yaml")
    reader = ApplicationConfiguration()
    reader.read(config)
    resources = reader._resource_object
    assert resources.get("gpu", 0) == (1 if variant == "cuda" else 0)
    assert resources["cpu"] == 2 and re.fullmatch(r"\d+(\.\d+)?Gi", resources["memory"])
    ours, original = yaml.safe_load(config.read_text()), yaml.safe_load((APP_DIR / "app.yaml").read_text())
    ours.pop("resources"), original.pop("resources")
    assert ours == original


def test_template_downloads_nothing_from_nvidia():
    template = (APP_DIR / "packaging" / "Dockerfile.jinja2").read_text()
    assert not re.findall(r"https?://", template)  # pip reaches PyPI; everything else comes from the base image


def test_build_names_what_is_missing(tmp_path, monkeypatch, caplog):
    """Without a docker CLI on PATH and with set-up off, the build stops before doing anything and says why."""
    monkeypatch.setenv("PATH", str(tmp_path))
    assert map_command.environment_problems() == ["no docker CLI (apt-get install docker.io)"]
    status = map_command.main(["build", "--variant", "cpu", "--no-setup", "--work-dir", str(tmp_path / "w")])
    assert status == 1 and "cannot build the MAP on this host: no docker CLI" in caplog.text
    assert not (tmp_path / "w").exists()


def test_run_refuses_a_missing_study(tmp_path, caplog):
    status = map_command.main(["run", "--image", "none:0", "-i", str(tmp_path / "nowhere"), "-o", str(tmp_path)])
    assert status == 1 and f"-i {tmp_path / 'nowhere'}: no such folder" in caplog.text
