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
"""Build and run the app's MONAI Application Package (MAP).

    python -m deploy_app.map build --variant cpu|cuda [--model PATH]     # last word printed: the image tag
    python -m deploy_app.map run --image TAG -i STUDY -o OUT [--config app.yaml]

``build`` packages the app with holoscan-cli's own packager (``monai-deploy package``) from a clean checkout on a
host that reaches nothing but the package registries: it writes the artefact manifest the packager would download
(:func:`write_release_manifest`) and hands it ``packaging/Dockerfile.jinja2`` in place of its stock
template (which downloads NVIDIA's CUDA keyring and needs Ubuntu 24.04), with a Debian base image made here by
``debootstrap`` and ``docker import`` and served by a registry on 127.0.0.1 (the packager pulls the base image).
``tools/map_env.sh`` installs and starts what that needs (dockerd, buildx, the registry); ``build`` runs it when
something is missing and it runs as root, else it names what is missing. ``--stock`` packages with the stock
template, base image and manifest instead (needs GitHub and nvcr.io).

``run`` runs a MAP as a program: the study mounted read-only, the output folder written as the caller's user, the
container's exit status returned. On a host with an NVIDIA GPU and a MAP that asks for one it uses
``monai-deploy run``; elsewhere ``docker run`` with the mounts, user and environment ``monai-deploy run`` would give.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BUILDER_CONTEXT",
    "HOLOSCAN_VERSION",
    "VARIANTS",
    "MapError",
    "Variant",
    "build_map",
    "environment_problems",
    "main",
    "run_map",
    "write_release_manifest",
]

logger = logging.getLogger("deploy_app.map")

APP_DIR = Path(__file__).resolve().parent
REPO_ROOT = APP_DIR.parent
BUNDLE_ROOT = REPO_ROOT / "bundle"
PACKAGING_DIR = APP_DIR / "packaging"
ENV_SCRIPT = REPO_ROOT / "tools" / "map_env.sh"

#: The holoscan-cli release whose packager builds the MAP (pyproject pins it and holoscan-cu13 to this version).
HOLOSCAN_VERSION = "4.2.0"
#: The buildx builder the packager asks for; a docker context of that name makes buildx use the daemon itself.
BUILDER_CONTEXT = "holoscan_app_builder"
DEBIAN_SUITE = "bookworm"
#: Python of the Debian suite's python3: the CPU PyTorch wheel must be built for it.
DEBIAN_PYTHON = {"bookworm": "3.11"}
ROOTFS_IMAGE = f"lcadb-map-rootfs:{DEBIAN_SUITE}"
BASE_REPOSITORY = "lcadb-map-base"
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


class MapError(RuntimeError):
    """What stops a MAP build or run, in words that say what to do."""


@dataclass(frozen=True)
class Variant:
    """One MAP variant: its tag prefix, PyTorch build and the ``resources`` of its manifest."""

    name: str
    description: str
    cpu_torch: bool
    #: resources of the package manifest (pkg.json); None: those of deploy_app/app.yaml
    resources: dict | None = None


VARIANTS = {
    # resources: app.yaml's, measured with this MAP (deploy_app/README.md, "MAP", Measured)
    "cpu": Variant("cpu", "CPU PyTorch, no GPU reserved, the CPU export of the weights in fp32", cpu_torch=True),
    # gpuMemory and the CUDA runtime's host memory are not measured (no GPU was lent to this work): no gpuMemory is
    # asked for rather than a guess, and memory is the CPU MAP's measured peak with room for the CUDA runtime
    "cuda": Variant(
        "cuda",
        "PyTorch with CUDA from PyPI, one GPU reserved, the ckpt_export TorchScript",
        cpu_torch=False,
        resources={"cpu": 2, "gpu": 1, "memory": "4Gi"},
    ),
}


# ----------------------------------------------------------------------------------------------- helpers
def _run(command: Sequence[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    """Run ``command``; a failure raises :class:`MapError` naming ``what`` and the command's last output."""
    logger.debug("$ %s", " ".join(str(c) for c in command))
    try:
        result = subprocess.run([str(c) for c in command], text=True, capture_output=True, **kwargs)
    except FileNotFoundError as err:
        raise MapError(f"{what}: {command[0]} is not installed ({err}).") from err
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise MapError(f"{what} failed (exit status {result.returncode}):\n{tail}")
    return result


def _stream(command: Sequence[str], what: str, **kwargs) -> None:
    """Run ``command`` with its output shown on stderr as it comes (long steps); a failure raises
    :class:`MapError` naming ``what`` and repeating the command's last lines."""
    logger.debug("$ %s", " ".join(str(c) for c in command))
    try:
        process = subprocess.Popen(
            [str(c) for c in command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs
        )
    except FileNotFoundError as err:
        raise MapError(f"{what}: {command[0]} is not installed ({err}).") from err
    last: list[str] = []
    for line in process.stdout:
        sys.stderr.write(f"  | {line}")
        last = [*last[-14:], line.rstrip()]
    if process.wait() != 0:
        raise MapError(f"{what} failed (exit status {process.returncode}):\n" + "\n".join(last))


def _succeeds(command: Sequence[str]) -> bool:
    try:
        return subprocess.run(list(command), capture_output=True, timeout=30).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


def registry_address() -> str:
    """host:port of the registry that serves the base image (``LCADB_MAP_REGISTRY``, default 127.0.0.1:5000)."""
    return os.environ.get("LCADB_MAP_REGISTRY", "127.0.0.1:5000")


def _registry_has(reference: str) -> bool:
    """Whether the registry serves the image ``reference`` (host:port/repository:tag)."""
    host, _, rest = reference.partition("/")
    repository, _, tag = rest.rpartition(":")
    request = urllib.request.Request(
        f"http://{host}/v2/{repository}/manifests/{tag}",
        method="HEAD",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def environment_problems() -> list[str]:
    """What the offline build lacks on this host, each with what to do; empty when all is there."""
    problems = []
    if shutil.which("docker") is None:
        return ["no docker CLI (apt-get install docker.io)"]
    if not _succeeds(["docker", "info"]):
        problems.append("no Docker daemon answers (as root: bash tools/map_env.sh start)")
    if not _succeeds(["docker", "buildx", "version"]):
        problems.append("no docker buildx plugin (Debian 12 has none; as root: bash tools/map_env.sh install)")
    if not _succeeds(["docker", "context", "inspect", BUILDER_CONTEXT]):
        problems.append(f"no docker context {BUILDER_CONTEXT} (as root: bash tools/map_env.sh start)")
    if not _succeeds(["curl", "-fsS", "-o", "/dev/null", "--max-time", "3", f"http://{registry_address()}/v2/"]):
        problems.append(f"no registry answers on {registry_address()} (as root: bash tools/map_env.sh start)")
    return problems


def ensure_environment(setup: bool = True) -> None:
    """Check what the build needs and, as root with ``setup``, install and start it with ``tools/map_env.sh``.

    Raises:
        MapError: naming everything still missing.
    """
    problems = environment_problems()
    if problems and setup and os.geteuid() == 0:
        logger.info("Setting up: %s", "; ".join(problems))
        completed = subprocess.run(["bash", str(ENV_SCRIPT), "up"])
        if completed.returncode != 0:
            raise MapError(f"tools/map_env.sh up failed (exit status {completed.returncode}); see its messages above.")
        problems = environment_problems()
    if problems:
        raise MapError("cannot build the MAP on this host: " + "; ".join(problems) + ".")


# ------------------------------------------------------------------------------------------- base image
def _ensure_rootfs_image() -> None:
    """A minimal Debian image made by debootstrap and ``docker import`` (nothing pulled from a container registry)."""
    if _succeeds(["docker", "image", "inspect", ROOTFS_IMAGE]):
        return
    if shutil.which("debootstrap") is None:
        raise MapError("debootstrap is needed to make the base image (as root: bash tools/map_env.sh install).")
    mirror = os.environ.get("LCADB_MAP_DEBIAN_MIRROR", "http://deb.debian.org/debian")
    with tempfile.TemporaryDirectory(prefix="lcadb-map-rootfs.", dir="/var/tmp") as rootfs:
        logger.info("Making %s with debootstrap (minbase, %s) ...", ROOTFS_IMAGE, mirror)
        _stream(["debootstrap", "--variant=minbase", DEBIAN_SUITE, rootfs, mirror], "debootstrap")
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in Path(rootfs, cache).glob("*"):
                if item.is_file():
                    item.unlink()
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        try:
            _run(["docker", "import", "-", ROOTFS_IMAGE], "docker import of the debootstrap tree", stdin=tar.stdout)
        finally:
            tar.stdout.close()
            tar.wait()


def _download_cpu_torch(wheels: Path) -> None:
    """The CPU build of this environment's PyTorch version for the base image's Python, by the host's pip (its
    configured indexes, find-links and cache first, then PyTorch's CPU index)."""
    from importlib.metadata import version

    public = version("torch").split("+")[0]
    command = [sys.executable, "-m", "pip", "download", f"torch=={public}+cpu", "--no-deps", "-d", str(wheels)]
    command += ["--only-binary=:all:", "--python-version", DEBIAN_PYTHON[DEBIAN_SUITE], "--platform"]
    command += ["manylinux_2_28_x86_64", "--implementation", "cp", "--retries", "1", "--timeout", "30"]
    try:
        _run(command, "pip download of the CPU PyTorch wheel")
    except MapError:
        logger.info("No torch==%s+cpu wheel through pip's own configuration; trying %s", public, PYTORCH_CPU_INDEX)
        _run([*command, "--extra-index-url", PYTORCH_CPU_INDEX], f"pip download of torch=={public}+cpu")


def _host_certificate_authorities(target: Path) -> int:
    """Copy the build host's local CAs (Debian's /usr/local/share/ca-certificates) for pip inside the build."""
    target.mkdir(parents=True)
    count = 0
    source = Path("/usr/local/share/ca-certificates")
    for certificate in sorted(source.rglob("*.crt")) if source.is_dir() else []:
        shutil.copy(certificate, target / f"host-{count}-{certificate.name}")
        count += 1
    return count


def ensure_base_image(variant: Variant) -> str:
    """The base image of ``variant`` in the local registry, made when absent; returns its reference."""
    from importlib.metadata import version

    suffix = f"torch{version('torch').split('+')[0]}-cpu" if variant.cpu_torch else "plain"
    reference = f"{registry_address()}/{BASE_REPOSITORY}:{DEBIAN_SUITE}-py{DEBIAN_PYTHON[DEBIAN_SUITE]}-{suffix}"
    if _registry_has(reference):
        logger.info("Base image %s is in the registry.", reference)
        return reference
    _ensure_rootfs_image()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lcadb-map-base.") as context:
        context = Path(context)
        shutil.copy(PACKAGING_DIR / "base.Dockerfile", context / "Dockerfile")
        authorities = _host_certificate_authorities(context / "ca-certificates")
        (context / "wheels").mkdir()
        if variant.cpu_torch:
            _download_cpu_torch(context / "wheels")
        logger.info("Building base image %s (%d host CA file(s)) ...", reference, authorities)
        build = ["docker", "build", "--progress", "plain", "--build-arg", f"ROOTFS={ROOTFS_IMAGE}", "-t", reference]
        _stream([*build, context], f"docker build of the base image {reference}")
    _stream(["docker", "push", reference], f"docker push of {reference} to the local registry")
    logger.info("Base image %s built and pushed in %.0f s.", reference, time.perf_counter() - start)
    return reference


# ------------------------------------------------------------------------------------------------ model
def _roi_size() -> list[int]:
    config = json.loads((BUNDLE_ROOT / "configs" / "inference.json").read_text())
    return [int(s) for s in config["roi_size"]]


def export_default_model(variant: Variant, out_dir: Path) -> Path:
    """The shipped weights (bundle/models/model.pt) exported for ``variant``: the CPU export in fp32 (one graph
    for every x86 CPU) for ``cpu``, the ``ckpt_export`` TorchScript for ``cuda``; returns the file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    common = ["--ckpt_file", "models/model.pt", "--meta_file", "configs/metadata.json"]
    common += ["--config_file", "configs/inference.json"]
    if variant.cpu_torch:
        target = out_dir / "model_cpu.ts"
        command = [sys.executable, "-m", "scripts.export_cpu", "--filepath", str(target), *common]
        command += ["--save_attention", "true", "--precision", "fp32"]
    else:
        target = out_dir / "model.ts"
        command = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(target)]
        command += [*common, "--bundle_root", ".", "--use_trace", "True", "--save_attention", "True"]
        command += ["--input_shape", json.dumps([1, 8, *_roi_size()])]
    logger.info("Exporting the shipped weights for the %s MAP: %s", variant.name, target)
    _stream(command, f"export of bundle/models/model.pt for the {variant.name} MAP", cwd=BUNDLE_ROOT)
    return target


# ------------------------------------------------------------------------------------------------ build
#: The synthetic study the MAP carries in its input folder (``--input-data``): a run without a study mounted
#: classifies it, the check of a MAP moved to another site (deploy_app/README.md, "MAP").
SMOKE_STUDY_OPTIONS = ("--num-lesions", "1", "--matrix", "96", "96", "--slices", "16", "--seed", "0")


def make_smoke_study(target: Path) -> Path:
    """The generator's synthetic study of :data:`SMOKE_STUDY_OPTIONS` in ``target`` (no patient's data)."""
    command = [sys.executable, "-m", "scripts.synthetic", "dicom", str(target), *SMOKE_STUDY_OPTIONS]
    _run(command, "generating the smoke study", cwd=BUNDLE_ROOT)
    return target


def _variant_config(variant: Variant, target: Path) -> Path:
    """deploy_app/app.yaml with the variant's ``resources`` block (comments and other blocks kept)."""
    text = (APP_DIR / "app.yaml").read_text()
    if variant.resources is not None:
        block = "resources:\n" + "".join(f"  {key}: {value}\n" for key, value in variant.resources.items())
        text, count = re.subn(r"^resources:\n(?:[ \t]+.*\n|\n)*", block + "\n", text, count=1, flags=re.MULTILINE)
        if count != 1:
            raise MapError("deploy_app/app.yaml has no top-level resources block to replace.")
    target.write_text(text)
    return target


def _application_version() -> str:
    import yaml

    return str(yaml.safe_load((APP_DIR / "app.yaml").read_text())["application"]["version"])


def write_release_manifest(path: Path, base_image: str) -> Path:
    """Write the artefact manifest of :data:`HOLOSCAN_VERSION` that the packager reads with ``--source``.

    The packager downloads its release's manifest from GitHub unless it is given one. This one takes the schema of
    the manifest that the installed holoscan-cli carries (``holoscan_cli/package-source.json``, an older release's)
    and states what this build uses: the pinned SDK version and ``base_image`` as the base and build image of every
    platform configuration (a Python application is built on its base image; no health probe is downloaded).

    Args:
        path: the JSON file to write.
        base_image: the base image ``--base-image`` names.

    Returns:
        ``path``.
    """
    import holoscan_cli

    carried = json.loads((Path(holoscan_cli.__file__).parent / "package-source.json").read_text())
    schema = carried[max(carried, key=lambda v: tuple(int(p) for p in v.split(".")))]
    holoscan = schema["holoscan"]
    release = {
        "holoscan": {
            "debian-version": f"{HOLOSCAN_VERSION}.1-1",
            "wheel-version": HOLOSCAN_VERSION,
            "base-images": dict.fromkeys(holoscan["base-images"], base_image),
            "build-images": {
                config: dict.fromkeys(platforms, base_image) for config, platforms in holoscan["build-images"].items()
            },
        },
        "health-probes": schema["health-probes"],
    }
    path.write_text(json.dumps({HOLOSCAN_VERSION: release}, indent=2))
    return path


def build_map(
    variant: Variant,
    work_dir: Path,
    models: Path | None = None,
    tag: str | None = None,
    stock: bool = False,
    setup: bool = True,
) -> str:
    """Build the MAP of ``variant`` with ``monai-deploy package``; returns the image tag.

    Args:
        variant: one of :data:`VARIANTS`.
        work_dir: folder for what the packager is given (config, lib, models); replaced.
        models: a TorchScript file or a folder of them, as ``python -m deploy_app -m`` takes; defaults to the
            shipped weights exported by :func:`export_default_model`.
        tag: image name given to the packager (it appends platform and version), defaults to
            ``lcadb-liver-lesion-<variant>``.
        stock: the packager's stock template, base image and downloaded manifest (needs internet access).
        setup: install and start what the offline build lacks (as root, ``tools/map_env.sh up``).

    Returns:
        the tag of the built image.

    Raises:
        MapError: when something the build needs is missing, or a step fails.
    """
    if models is not None and not Path(models).exists():
        raise MapError(f"--model {models}: no such file or folder.")
    if not stock:
        ensure_environment(setup)
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    models = Path(models) if models is not None else export_default_model(variant, work_dir / "models")
    lib = work_dir / "lib"
    shutil.copytree(BUNDLE_ROOT / "scripts", lib / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    config = _variant_config(variant, work_dir / "app.yaml")
    tag = tag or f"lcadb-liver-lesion-{variant.name}"
    arguments = [str(APP_DIR), "--config", str(config), "--models", str(models), "--add", str(lib)]
    arguments += ["--input-data", str(make_smoke_study(work_dir / "smoke-study"))]
    arguments += ["--platform", "x86_64", "--tag", f"{tag}:{_application_version()}", "--sdk", "monai-deploy"]
    # the daemon's own builder (docker driver) cannot export a build cache
    arguments += ["--no-cache", "--build-cache", str(work_dir / "build-cache")]
    if not stock:
        base = ensure_base_image(variant)
        manifest = write_release_manifest(work_dir / "artifacts.json", base)
        arguments += ["--source", str(manifest), "--base-image", base]
    command = [sys.executable, "-m", "deploy_app.map", "package"]
    command += ([] if stock else ["--template-dir", str(PACKAGING_DIR)]) + ["--", *arguments]
    logger.info("Packaging: monai-deploy package %s", " ".join(arguments))
    environment = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    )
    if not stock:  # buildx builds with a docker-driver builder only from within its own context
        environment["DOCKER_CONTEXT"] = BUILDER_CONTEXT
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
    built = None
    for line in process.stdout:
        sys.stderr.write(line)
        match = re.match(r"\s*Docker Tag:\s+(\S+)", line)
        if match and match.group(1) != "N/A":
            built = match.group(1)
    if process.wait() != 0 or built is None:
        raise MapError(f"monai-deploy package failed (exit status {process.returncode}); its output is above.")
    return built


def package(template_dir: Path | None, arguments: Sequence[str]) -> int:
    """``monai-deploy package`` (holoscan-cli's own command) with the Dockerfile template of ``template_dir``
    found before the stock one; returns its exit status."""
    from holoscan_cli.__main__ import main as holoscan_main

    if template_dir is not None:
        import jinja2
        from holoscan_cli.packager import container_builder

        # the packager loads its template by name from its own folder and has no option for another one
        container_builder.FileSystemLoader = lambda stock: jinja2.FileSystemLoader([str(template_dir), str(stock)])
    sys.argv = ["monai-deploy", "package", *arguments]
    try:
        status = holoscan_main()
    except SystemExit as end:
        status = end.code
    return int(status or 0)


# -------------------------------------------------------------------------------------------------- run
def _image_environment(image: str) -> dict[str, str]:
    result = _run(["docker", "image", "inspect", "--format", "{{json .Config.Env}}", image], f"docker image {image}")
    return dict(item.split("=", 1) for item in json.loads(result.stdout) if "=" in item)


def _requested_gpus(image: str) -> int:
    result = subprocess.run(["docker", "run", "--rm", image, "show", "pkg"], capture_output=True, text=True)
    match = re.search(r"\{.*\}", result.stdout, flags=re.DOTALL)
    try:
        resources = json.loads(match.group(0)).get("resources", {}) if match else {}
    except json.JSONDecodeError:
        resources = {}
    return int(resources.get("gpu", 0) or 0)


def _poll_peak_memory(cid_file: Path, stop: threading.Event, peak: list[int]) -> None:
    """Largest memory use of the container's cgroup seen while it runs (cgroup v1 max_usage, v2 memory.peak)."""
    while not stop.wait(0.2):
        cid = cid_file.read_text().strip() if cid_file.exists() else ""
        if not cid:
            continue
        for candidate in (
            f"/sys/fs/cgroup/memory/docker/{cid}/memory.max_usage_in_bytes",
            f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/memory.peak",
            f"/sys/fs/cgroup/docker/{cid}/memory.peak",
        ):
            try:
                peak[0] = max(peak[0], int(Path(candidate).read_text()))
                break
            except (OSError, ValueError):
                continue


def run_map(
    image: str,
    study: Path,
    output: Path,
    config: Path | None = None,
    runner: str = "auto",
    network: str | None = None,
) -> int:
    """Run the MAP ``image`` on ``study``, writing into ``output``; returns the container's exit status.

    Args:
        image: the MAP's image tag.
        study: the DICOM study folder (mounted read-only); None: the smoke study the MAP carries.
        output: the output folder (created; the container runs as the caller's uid and gid, so what it writes
            belongs to the caller).
        config: a settings file replacing the MAP's app.yaml (PACS destinations, ``lcadb`` settings).
        runner: ``monai-deploy`` (``monai-deploy run``: needs the NVIDIA container runtime and nvidia-smi),
            ``docker`` (``docker run``), or ``auto``: ``monai-deploy`` when the MAP asks for a GPU and the host
            has one, else ``docker``.
        network: docker network of the container (``docker`` runner); defaults to none without ``config`` (the
            app needs no network unless it sends to a PACS), else Docker's default.

    Raises:
        MapError: when the study or config is missing, or the image cannot be inspected.
    """
    study, output = (Path(study).resolve() if study is not None else None), Path(output).resolve()
    if study is not None and not study.is_dir():
        raise MapError(f"-i {study}: no such folder.")
    if config is not None and not Path(config).is_file():
        raise MapError(f"--config {config}: no such file.")
    output.mkdir(parents=True, exist_ok=True)
    if runner not in ("auto", "docker", "monai-deploy"):
        raise MapError(f"runner must be auto, docker or monai-deploy, got {runner!r}.")
    if runner == "auto":
        gpu_host = _succeeds(["nvidia-smi"])
        runner = "monai-deploy" if gpu_host and _requested_gpus(image) > 0 else "docker"
    if runner == "monai-deploy":
        command = [shutil.which("monai-deploy") or "monai-deploy", "run", image, "-o", str(output)]
        command += ["-i", str(study)] if study is not None else []
        command += ["--uid", str(os.getuid()), "--gid", str(os.getgid())]
        command += ["--config", str(Path(config).resolve())] if config is not None else []
        logger.info("$ %s", " ".join(command))
        return subprocess.run(command).returncode

    environment = _image_environment(image)
    input_path = environment.get("HOLOSCAN_INPUT_PATH", "/var/holoscan/input")
    output_path = environment.get("HOLOSCAN_OUTPUT_PATH", "/var/holoscan/output")
    config_path = environment.get("HOLOSCAN_CONFIG_PATH", "/var/holoscan/app.yaml")
    network = network or ("none" if config is None else None)
    with tempfile.TemporaryDirectory(prefix="lcadb-map-run.") as scratch:
        cid_file = Path(scratch) / "cid"
        command = ["docker", "run", "--rm", "--cidfile", str(cid_file), "--user", f"{os.getuid()}:{os.getgid()}"]
        # holoscan warns below a 32 MB stack and can crash with less; HOME: a uid without an account has "/"
        command += ["--ulimit", "stack=33554432", "--shm-size", "1g", "-e", "HOME=/tmp"]
        command += ["-v", f"{study}:{input_path}:ro"] if study is not None else []
        command += ["-v", f"{output}:{output_path}"]
        command += ["-v", f"{Path(config).resolve()}:{config_path}:ro"] if config is not None else []
        command += ["--network", network] if network else []
        command.append(image)
        logger.info("$ %s", " ".join(command))
        stop, peak = threading.Event(), [0]
        poller = threading.Thread(target=_poll_peak_memory, args=(cid_file, stop, peak), daemon=True)
        poller.start()
        start = time.perf_counter()
        status = subprocess.run(command).returncode
        stop.set()
        poller.join()
    memory = f", peak memory {peak[0] / 2**20:.0f} MiB" if peak[0] else ""
    logger.info("MAP exited with status %d after %.1f s%s.", status, time.perf_counter() - start, memory)
    return status


# ---------------------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m deploy_app.map build|run|package``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["package"]:  # internal: the packager with the repository's template
        parser = argparse.ArgumentParser(prog="python -m deploy_app.map package")
        parser.add_argument("--template-dir", type=Path)
        parser.add_argument("arguments", nargs=argparse.REMAINDER)
        args = parser.parse_args(argv[1:])
        arguments = args.arguments[1:] if args.arguments[:1] == ["--"] else args.arguments
        return package(args.template_dir, arguments)

    parser = argparse.ArgumentParser(prog="python -m deploy_app.map", description=__doc__.split("\n\n")[1])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build the MAP image (prints its tag last)")
    build.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    build.add_argument("--model", type=Path, help="TorchScript file or folder (as -m of the app); default: exported")
    build.add_argument("--tag", help="image name (the packager appends platform and version)")
    build.add_argument("--work-dir", type=Path, help="default: build/map/<variant>")
    build.add_argument("--stock", action="store_true", help="stock template and base image (needs internet)")
    build.add_argument("--no-setup", action="store_true", help="only check the host; install and start nothing")
    run = commands.add_parser("run", help="run a MAP on a study; exits with the app's status")
    run.add_argument("--image", required=True)
    run.add_argument("-i", "--input", type=Path, help="DICOM study folder (default: the MAP's smoke study)")
    run.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    run.add_argument("--config", type=Path, help="settings file replacing the MAP's app.yaml")
    run.add_argument("--runner", choices=("auto", "docker", "monai-deploy"), default="auto")
    run.add_argument("--network", help="docker network (default: none, or Docker's default with --config)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "build":
            variant = VARIANTS[args.variant]
            start = time.perf_counter()
            work_dir = args.work_dir or REPO_ROOT / "build" / "map" / variant.name
            tag = build_map(variant, work_dir, args.model, args.tag, args.stock, not args.no_setup)
            print(f"Built the {variant.name} MAP ({variant.description}) in {time.perf_counter() - start:.0f} s: {tag}")
            return 0
        return run_map(args.image, args.input, args.output, args.config, args.runner, args.network)
    except MapError as err:
        logger.error("%s", err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
