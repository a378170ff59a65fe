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
"""Cross-validation folds and their ensemble, as the LLD-MMRI 2023 winners submitted (one model per official fold,
probabilities averaged).

- :func:`train_folds` (``python -m scripts.ensemble train``): the bundle's training workflow once per fold, each
  fold held out for validation and model selection, checkpoints in ``<ckpt_dir>/fold<k>/``.
- ``configs/ensemble.json`` (merged after ``evaluate.json``): MONAI's ``EnsembleEvaluator`` over the fold models
  (:func:`fold_networks`), softmax then ``MeanEnsembled``, scored and reported like one network.
- :class:`LCADBEnsemble`: the fold models as one network returning the mean probabilities (and mean attention
  maps), for ``inference.json`` and the TorchScript export the deploy app loads (``configs/ensemble_inference.json``);
  :func:`combine_checkpoints` (``python -m scripts.ensemble combine``) writes its checkpoint from the fold models.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .checkpoint import mismatch_message
from .network import LCADBInference
from .training import AtomicDiskSaver

__all__ = ["LCADBEnsemble", "combine_checkpoints", "fold_checkpoints", "fold_networks", "main", "train_folds"]

logger = logging.getLogger(__name__)


def fold_checkpoints(ckpt_dir: str | os.PathLike, num_folds: int = 5, name: str = "model.pt") -> list[str]:
    """``<ckpt_dir>/fold<k>/<name>`` for k in ``range(num_folds)``, each checked to exist.

    Raises:
        ValueError: when ``num_folds`` is below 1.
        FileNotFoundError: naming the fold checkpoints that are missing (train them with
            ``python -m scripts.ensemble train``).
    """
    if num_folds < 1:
        raise ValueError(f"num_folds must be >= 1, got {num_folds}.")
    paths = [os.path.join(os.fspath(ckpt_dir), f"fold{k}", name) for k in range(num_folds)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"fold checkpoints missing: {missing}; train the folds with `python -m scripts.ensemble train`."
        )
    return paths


def _load_state(path: str | os.PathLike, network: nn.Module) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) and "model" in state else state
    message = mismatch_message(path, network.state_dict(), state)
    if message:
        raise ValueError(message)
    return state


def fold_networks(
    network: nn.Module, checkpoints: Sequence[str | os.PathLike], map_location: str | torch.device | None = None
) -> list[nn.Module]:
    """One copy of ``network`` per checkpoint, each holding that checkpoint's weights, in eval mode.

    Args:
        network: the configured network (``@network``), copied for every checkpoint.
        checkpoints: network state dicts (``model.pt`` of each fold).
        map_location: device of the copies; defaults to where ``network`` is.

    Raises:
        ValueError: when there is no checkpoint, or one does not fit the network (naming the config that fits).
    """
    if not checkpoints:
        raise ValueError("checkpoints must name at least one fold model.")
    members = []
    for path in checkpoints:
        member = copy.deepcopy(network)
        member.load_state_dict(_load_state(path, member))
        if map_location is not None:
            member = member.to(map_location)
        members.append(member.eval())
    logger.info("ensemble of %d fold models: %s", len(members), [os.fspath(p) for p in checkpoints])
    return members


class LCADBEnsemble(nn.Module):
    """Several LCA-DB networks of one architecture (the fold models) as one: mean class probabilities and, with
    ``return_attention``, mean attention maps, the outputs of :class:`~.network.LCADBInference`.

    Args:
        num_members: number of networks, at least 1.
        return_attention: also return the mean IA-Net and PA-Net attention maps, defaults to False.
        kwargs: :class:`~.network.LCADB` arguments shared by all members.

    Raises:
        ValueError: when ``num_members`` is below 1.
    """

    def __init__(self, num_members: int = 5, return_attention: bool = False, **kwargs) -> None:
        super().__init__()
        if num_members < 1:
            raise ValueError(f"num_members must be >= 1, got {num_members}.")
        self.members = nn.ModuleList([LCADBInference(**kwargs) for _ in range(num_members)])
        self.return_attention = return_attention
        self.num_members = num_members
        self.grid_size = self.members[0].grid_size

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            x: ``[B, in_channels, H, W, D]``.

        Returns:
            mean probabilities ``[B, num_classes]``; with ``return_attention`` the tuple (probabilities,
            attention_ia, attention_pa), each map ``[B, H / patch_size, W / patch_size]``, averaged over members.
        """
        probabilities = torch.zeros(0)
        attention_ia = torch.zeros(0)
        attention_pa = torch.zeros(0)
        first = True
        for member in self.members:
            output = member.forward_all(x)
            p = torch.softmax(output.logits, dim=1)
            if first:
                probabilities, attention_ia, attention_pa = p, output.attention_ia, output.attention_pa
                first = False
            else:
                probabilities = probabilities + p
                attention_ia = attention_ia + output.attention_ia
                attention_pa = attention_pa + output.attention_pa
        probabilities = probabilities / self.num_members
        if not self.return_attention:
            return probabilities
        grid = [x.shape[0], self.grid_size[0], self.grid_size[1]]
        return (
            probabilities,
            (attention_ia / self.num_members).reshape(grid),
            (attention_pa / self.num_members).reshape(grid),
        )


def combine_checkpoints(
    checkpoints: Sequence[str | os.PathLike], output: str | os.PathLike, reference: nn.Module
) -> Path:
    """Write the :class:`LCADBEnsemble` state dict of fold models (``members.<k>.<name>``) to ``output`` (a temporary
    file, then renamed); tensors keep the fold checkpoints' dtype.

    Args:
        checkpoints: network state dicts of the fold models, in member order.
        output: the ensemble checkpoint to write.
        reference: a network of the fold models' configuration (e.g. ``network_def`` of the inference config), to
            check that each checkpoint fits.

    Raises:
        ValueError: when there is no checkpoint or one does not fit ``reference``.
    """
    if not checkpoints:
        raise ValueError("checkpoints must name at least one fold model.")
    state = {}
    for k, path in enumerate(checkpoints):
        for name, tensor in _load_state(path, reference).items():
            state[f"members.{k}.{name}"] = tensor
    output = Path(os.fspath(output))
    AtomicDiskSaver(output.parent, output.name)(state, output.name)
    return output


def train_folds(
    config_file: Sequence[str], meta_file: str, logging_file: str | None, num_folds: int = 5, **override
) -> list[str]:
    """Train the bundle's ``training`` workflow once per fold (fold k held out for validation and selection), each
    into ``<ckpt_dir>/fold<k>``.

    Args:
        config_file: config files merged in order, e.g. ``configs/train.json`` and ``configs/cpu_light.json``.
        meta_file: ``configs/metadata.json``.
        logging_file: ``configs/logging.conf`` or None.
        num_folds: folds of the datalist, default 5.
        override: config ids, e.g. ``dataset_dir``, ``seed``; ``ckpt_dir`` is the parent of the fold folders.

    Returns:
        the best checkpoint (``model.pt``) of every fold.
    """
    from monai.bundle import ConfigParser, ConfigWorkflow

    parser = ConfigParser()
    parser.read_config(list(config_file))
    parser.update(override)
    ckpt_dir = str(parser.get_parsed_content("ckpt_dir"))
    best = []
    for fold in range(num_folds):
        fold_dir = os.path.join(ckpt_dir, f"fold{fold}")
        logger.info("fold %d of %d: training into %s", fold, num_folds, fold_dir)
        workflow = ConfigWorkflow(
            workflow_type="train",
            config_file=list(config_file),
            meta_file=meta_file,
            logging_file=logging_file,
            **{**override, "fold": fold, "ckpt_dir": fold_dir},
        )
        workflow.initialize()
        workflow.run()
        workflow.finalize()
        best.append(os.path.join(fold_dir, "model.pt"))
    return best


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m scripts.ensemble train|combine ...`` (run from the bundle folder)."""
    import json

    parser = argparse.ArgumentParser(description="Cross-validation folds of the bundle and their ensemble.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one model per fold into <ckpt_dir>/fold<k>")
    train.add_argument("--config_file", nargs="+", default=["configs/train.json", "configs/cpu_light.json"])
    train.add_argument("--meta_file", default="configs/metadata.json")
    train.add_argument("--logging_file", default="configs/logging.conf")
    train.add_argument("--num_folds", type=int, default=5)
    train.add_argument("--override", default="{}", help='config ids as JSON, e.g. \'{"seed": 1, "max_epochs": 20}\'')
    combine = sub.add_parser("combine", help="write the LCADBEnsemble checkpoint of the fold models")
    combine.add_argument("--ckpt_dir", required=True, help="folder holding fold<k>/model.pt")
    combine.add_argument("--output", required=True)
    combine.add_argument("--num_folds", type=int, default=5)
    combine.add_argument(
        "--config_file",
        nargs="+",
        default=["configs/inference.json"],
        help="configs describing the fold models (add configs/cpu_light.json for light-preset folds)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.command == "train":
        paths = train_folds(
            args.config_file, args.meta_file, args.logging_file, args.num_folds, **json.loads(args.override)
        )
        print(json.dumps(paths, indent=1))
        return 0
    from monai.bundle import ConfigParser

    config = ConfigParser()
    config.read_config(list(args.config_file))
    if os.getcwd() not in sys.path:
        sys.path.insert(1, os.getcwd())
    reference = config.get_parsed_content("network_def")
    out = combine_checkpoints(fold_checkpoints(args.ckpt_dir, args.num_folds), args.output, reference)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
