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
"""Everything the app takes from the bundle: its ``scripts`` package, and the TorchScript that
``python -m monai.bundle ckpt_export`` writes with the bundle metadata and ``inference.json`` embedded (or the
bundle's CPU-optimised export, ``python -m scripts.export_cpu``, which embeds the same and its weights' SHA-256).

Several models: the bundle's fold ensemble exported as one TorchScript (``configs/ensemble_inference.json``) loads
like any export; a model folder holding several exports of the same bundle (one per cross-validation fold, e.g.
``fold0.ts`` ... ``fold4.ts``) is run as their ensemble: every lesion goes through each member and the class
probabilities and attention maps are averaged, as the bundle's ``EnsembleEvaluator`` config does.

Nothing of the bundle is copied here: class names, model name and version come from the embedded
``metadata.json``; the preprocessing is the ``image_preprocessing`` id of the embedded ``inference.json``,
parsed with :class:`monai.bundle.ConfigParser`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ModelPackageError

__all__ = [
    "LoadedModel",
    "MeanEnsemble",
    "PREPROCESSING_ID",
    "ensure_bundle_scripts",
    "find_model_file",
    "find_model_files",
    "load_model",
    "weights_sha256",
]

logger = logging.getLogger(__name__)

#: Id of the preprocessing Compose in the bundle's inference.json (contracts.md).
PREPROCESSING_ID = "image_preprocessing"
#: Name of the embedded inference config (ckpt_export stores each config file under its stem + ".json").
INFERENCE_CONFIG = "inference.json"
#: Written by the bundle's CPU export (``python -m scripts.export_cpu``): the SHA-256 of the weights it froze.
CPU_EXPORT_INFO = "cpu_export.json"
_MODEL_SUFFIXES = (".ts", ".pt", ".pth", ".zip")


def ensure_bundle_scripts() -> None:
    """Make the bundle's ``scripts`` package importable, as the bundle configs refer to ``scripts.<module>``.

    Looked for in this order: an importable ``scripts`` package that is the LCA-DB one (in a MAP packaged with
    ``--add <folder holding scripts/>`` it is in ``/opt/holoscan/lib``, on PYTHONPATH), the ``bundle/`` folder of
    this repository, and the installed ``lcadb`` distribution (``pip install .`` of this repository).

    Raises:
        ModelPackageError: when none of them is available.
    """
    if _is_lcadb_scripts(sys.modules.get("scripts")):
        return
    try:
        if _is_lcadb_scripts(importlib.import_module("scripts")):
            return
    except ImportError:
        pass
    sys.modules.pop("scripts", None)
    bundle_dir = Path(__file__).resolve().parents[1] / "bundle"
    if (bundle_dir / "scripts" / "__init__.py").is_file():
        sys.path.insert(0, str(bundle_dir))
        importlib.import_module("scripts")
        return
    try:
        sys.modules["scripts"] = importlib.import_module("lcadb")
    except ImportError as err:
        raise ModelPackageError(
            "cannot import the LCA-DB bundle's 'scripts' package: package the MAP with "
            "'--add <folder holding scripts/>', run from the repository, or 'pip install' it (package 'lcadb')."
        ) from err


def _is_lcadb_scripts(module: Any) -> bool:
    if module is None:
        return False
    try:
        constants = importlib.import_module(f"{module.__name__}.constants")
    except ImportError:
        return False
    return hasattr(constants, "LESION_CLASSES") and hasattr(constants, "PHASES")


def find_model_files(path: Path) -> list[Path]:
    """The TorchScript files given by ``path``: the file itself, or every TorchScript file under a folder (searched
    recursively, as ``monai-deploy package --models`` nests them in ``models/<name>/``), sorted by path.

    Raises:
        ModelPackageError: when the path does not exist, is not a TorchScript archive, or the folder holds none.
    """
    from monai.deploy.core.models import TorchScriptModel

    path = Path(path)
    if path.is_file():
        if not TorchScriptModel.accept(str(path))[0]:
            raise ModelPackageError(f"model file {path} is not a TorchScript archive (torch.jit.save / ckpt_export).")
        return [path]
    if not path.is_dir():
        raise ModelPackageError(f"model path {path} does not exist.")
    candidates = sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in _MODEL_SUFFIXES and TorchScriptModel.accept(str(p))[0]
    )
    if not candidates:
        raise ModelPackageError(f"model folder {path} holds no TorchScript file ({', '.join(_MODEL_SUFFIXES)}).")
    return candidates


def find_model_file(path: Path) -> Path:
    """The TorchScript file given by ``path``: the file itself, or the only TorchScript file under a folder.

    Raises:
        ModelPackageError: when the path does not exist, or the folder holds no or several TorchScript files.
    """
    candidates = find_model_files(path)
    if len(candidates) == 1:
        return candidates[0]
    raise ModelPackageError(
        f"model folder {path} holds {len(candidates)} TorchScript files, give one with -m: "
        f"{[str(p) for p in candidates]}."
    )


def weights_sha256(network: torch.nn.Module) -> str:
    """The bundle's digest of the network's weights (``scripts.export_cpu.weights_sha256``), the SR's DeviceUID seed."""
    ensure_bundle_scripts()
    from scripts.export_cpu import weights_sha256 as bundle_weights_sha256

    return bundle_weights_sha256(network)


def _embedded_weights_sha256(file: Path, text: str) -> str:
    """The weights' SHA-256 that the CPU export embeds (a frozen graph has no ``state_dict``); "" when absent."""
    if not text:
        return ""
    try:
        digest = json.loads(text)["weights_sha256"]
    except (ValueError, KeyError, TypeError) as err:
        raise ModelPackageError(f"{file}: the embedded {CPU_EXPORT_INFO} has no 'weights_sha256'.") from err
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ModelPackageError(f"{file}: the embedded weights_sha256 {digest!r} is not a SHA-256 hex digest.")
    return digest


class MeanEnsemble(torch.nn.Module):
    """Exports of one bundle run as one network: every output (probabilities, attention maps) averaged over the members.

    Args:
        members: the loaded TorchScript networks, each returning ``(probabilities, attention_ia, attention_pa)``.
    """

    def __init__(self, members: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member.")
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = [member(x) for member in self.members]
        if isinstance(outputs[0], torch.Tensor):
            return torch.stack(outputs).mean(0)
        return tuple(torch.stack([o[i] for o in outputs]).mean(0) for i in range(len(outputs[0])))


@dataclass
class LoadedModel:
    """The exported LCA-DB model with what the bundle says about it.

    Attributes:
        path: the TorchScript file (for an ensemble of several files: the folder holding them).
        network: the TorchScript module, in eval mode, on ``device``; returns (probabilities, attention_ia,
            attention_pa) as ``LCADBInference(return_attention=True)``. For several files, a :class:`MeanEnsemble`.
        device: where the network runs.
        name: ``name`` of the bundle metadata.
        version: ``version`` of the bundle metadata.
        class_names: ``network_data_format.outputs.pred.channel_def`` of the bundle metadata, by channel.
        preprocessing: the ``image_preprocessing`` transform of the embedded inference config.
        weights_sha256: see :func:`weights_sha256`; for the bundle's CPU export (a frozen graph, no ``state_dict``)
            the digest it embeds, computed the same way on the weights before freezing; for several files, the
            SHA-256 of the members' digests in file order.
        metadata: the whole embedded metadata.
        members: the TorchScript files of the model (one, or the members of an ensemble).
        preprocessing_config: the embedded inference config's ids that decide the network input (members of an
            ensemble must agree on them).
    """

    path: Path
    network: torch.nn.Module
    device: torch.device
    name: str
    version: str
    class_names: tuple[str, ...]
    preprocessing: Callable[[dict], dict]
    weights_sha256: str
    metadata: dict
    members: tuple[Path, ...] = ()
    preprocessing_config: str = ""

    def preprocess(self, roi: np.ndarray) -> torch.Tensor:
        """Network input ``[8, H, W, D]`` of one lesion ROI ``[8, X, Y, Z]`` (phases in network order)."""
        out = self.preprocessing({"image": roi})["image"]
        return torch.as_tensor(out, dtype=torch.float32).as_subclass(torch.Tensor)


def load_model(path: Path, device: torch.device | str | None = None) -> LoadedModel:
    """Load the TorchScript exported by the bundle (``ckpt_export`` with its metadata and inference config), or the
    ensemble of several such exports of the same bundle in one folder.

    Args:
        path: TorchScript file, or a folder holding one or several (an ensemble: same bundle name, version, classes
            and preprocessing; probabilities and attention maps averaged).
        device: where to run the network; default CUDA when available, else CPU.

    Raises:
        ModelPackageError: naming the file and what is missing from it, or the members that do not belong together.
    """
    files = find_model_files(Path(path))
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    models = [_load_one(file, device) for file in files]
    if len(models) == 1:
        model = models[0]
    else:
        first = models[0]
        for other in models[1:]:
            for what in ("name", "version", "class_names", "preprocessing_config"):
                if getattr(other, what) != getattr(first, what):
                    raise ModelPackageError(
                        f"model folder {path} holds TorchScript files of different bundles ({what} of {other.path} "
                        f"differs from {first.path}); give one with -m, or keep only the members of one ensemble."
                    )
        digest = hashlib.sha256("".join(m.weights_sha256 for m in models).encode()).hexdigest()
        model = LoadedModel(
            path=Path(path),
            network=MeanEnsemble([m.network for m in models]).eval(),
            device=device,
            name=first.name,
            version=first.version,
            class_names=first.class_names,
            preprocessing=first.preprocessing,
            weights_sha256=digest,
            metadata=first.metadata,
            members=tuple(files),
            preprocessing_config=first.preprocessing_config,
        )
    logger.info(
        "Loaded %s %s from %s on %s (%d classes, %d member(s), weights sha256 %s).",
        model.name, model.version, model.path, device, len(model.class_names), len(model.members),
        model.weights_sha256[:16],
    )  # fmt: skip
    return model


def _load_one(file: Path, device: torch.device) -> LoadedModel:
    """One TorchScript export of the bundle, checked."""
    ensure_bundle_scripts()
    from monai.bundle import ConfigParser
    from monai.data import load_net_with_metadata

    try:
        network, metadata, extra = load_net_with_metadata(
            str(file), map_location=device, more_extra_files=(INFERENCE_CONFIG, CPU_EXPORT_INFO)
        )
    except RuntimeError as err:
        raise ModelPackageError(f"cannot load TorchScript model {file}: {err}") from err
    network.eval()

    try:
        channel_def = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    except (KeyError, TypeError) as err:
        raise ModelPackageError(
            f"{file} has no 'network_data_format.outputs.pred.channel_def' in its embedded metadata: export it with "
            "'python -m monai.bundle ckpt_export ... --meta_file configs/metadata.json'."
        ) from err
    class_names = tuple(str(channel_def[k]) for k in sorted(channel_def, key=int))
    for key in ("name", "version"):
        if not metadata.get(key):
            raise ModelPackageError(f"{file}: the embedded bundle metadata has no {key!r}.")

    config_text = extra.get(INFERENCE_CONFIG, "")
    if not config_text:
        raise ModelPackageError(
            f"{file} has no embedded {INFERENCE_CONFIG}: export it with "
            "'python -m monai.bundle ckpt_export ... --config_file configs/inference.json'."
        )
    config = json.loads(config_text)
    parser = ConfigParser(config)
    if PREPROCESSING_ID not in parser:
        raise ModelPackageError(f"the inference config embedded in {file} has no {PREPROCESSING_ID!r} id.")
    preprocessing = parser.get_parsed_content(PREPROCESSING_ID)

    digest = _embedded_weights_sha256(file, extra.get(CPU_EXPORT_INFO, ""))
    if not digest:
        if not network.state_dict():
            raise ModelPackageError(
                f"{file} is a frozen TorchScript without the SHA-256 of its weights: export it with "
                "'python -m scripts.export_cpu' of the bundle."
            )
        digest = weights_sha256(network)

    from .lesion_codes import validate_codes

    validate_codes(class_names)
    return LoadedModel(
        path=file,
        network=network,
        device=device,
        name=str(metadata["name"]),
        version=str(metadata["version"]),
        class_names=class_names,
        preprocessing=preprocessing,
        weights_sha256=digest,
        metadata=metadata,
        members=(file,),
        preprocessing_config=_preprocessing_config(config),
    )


def _preprocessing_config(config: dict) -> str:
    """The parts of an inference config that decide the network input, as one comparable string."""
    keys = ("phases", "roi_size", "roi_margin", "liver_ratio", "lesion_margin", "lesion_box_channel")
    return json.dumps({k: config.get(k) for k in keys}, sort_keys=True)
