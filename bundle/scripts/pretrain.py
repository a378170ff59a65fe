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
"""Self-supervised pretraining of LCA-DB's two encoders on unlabelled lesion crops.

The recipe of MONAI's self-supervised tutorial (Project-MONAI/tutorials ``self_supervised_pretraining``, after
Chen et al. 2020, SimCLR): two views of every crop, each with its own random coarse dropout and coarse shuffle
(``RandCoarseDropoutd``, ``RandCoarseShuffled``, as the tutorial), flip, rotation and per-phase intensity change;
both views go through IA-Net and PA-Net, whose instance features are averaged per branch, concatenated and
projected by a small MLP; MONAI's ``ContrastiveLoss`` pulls the two views of a crop together and pushes the other
crops of the batch away. The labels are never read. The network's weights (its classifiers untouched) are saved as a
plain state dict, which the training workflow starts from with ``--resume_from <file>``.

Run from the bundle folder::

    python -m scripts.pretrain --dataset_dir DIR --output models/pretrained.pt [--exclude_dataset_dir LABELLED]

The crops are prepared exactly as for training (``train#deterministic_transforms`` of the given configs); pass the
same configs and recipe ids (``--override``) as the training that will start from the weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = ["ContrastiveHead", "encoder_features", "main", "pretrain"]

logger = logging.getLogger(__name__)


def encoder_features(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[B, 2F]``: the mean instance feature of IA-Net and of PA-Net of an :class:`~scripts.network.LCADB`."""
    return torch.cat([network.image_branch(x).mean(1), network.patch_branch(x).mean(1)], dim=1)


class ContrastiveHead(nn.Module):
    """The projection MLP of SimCLR: ``Linear - ReLU - Linear``.

    Args:
        in_features: encoder feature size (2F for LCA-DB).
        hidden: hidden width, defaults to 128.
        out_features: projection size, defaults to 64.
    """

    def __init__(self, in_features: int, hidden: int = 128, out_features: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def _views(num_phases: int) -> list:
    """The random transforms giving one view (the tutorial's dropout and shuffle, plus the bundle's augmentation)."""
    from monai.transforms import RandCoarseDropoutd, RandCoarseShuffled, RandFlipd, RandRotated

    from .lesion_transforms import RandPhaseIntensityd

    return [
        RandRotated(keys="image", range_x=math.pi / 18, prob=0.3, mode="bilinear", padding_mode="border"),
        RandFlipd(keys="image", prob=0.5),
        RandPhaseIntensityd(keys="image", scale=0.2, shift=0.2, prob=0.8, num_phases=num_phases),
        RandCoarseDropoutd(
            keys="image", prob=1.0, holes=4, max_holes=8, spatial_size=(4, 4, 2), max_spatial_size=(8, 8, 4)
        ),
        RandCoarseShuffled(
            keys="image", prob=0.5, holes=4, max_holes=8, spatial_size=(4, 4, 2), max_spatial_size=(8, 8, 4)
        ),
    ]


class _TwoViews:
    """``{"image": view 1, "image_2": view 2}`` of a cached sample, each view drawn independently."""

    def __init__(self, transforms: list, seed: int) -> None:
        from monai.transforms import Compose

        self.first = Compose(transforms).set_random_state(seed)
        self.second = Compose(_copy_transforms(transforms)).set_random_state(seed + 1)

    def __call__(self, data: dict) -> dict:
        image = data["image"]
        return {"image": self.first({"image": image})["image"], "image_2": self.second({"image": image})["image"]}


def _copy_transforms(transforms: list) -> list:
    import copy

    return [copy.deepcopy(t) for t in transforms]


def pretrain(
    config_file: Sequence[str],
    dataset_dir: str,
    output: str | os.PathLike,
    exclude_dataset_dir: str | None = None,
    epochs: int = 10,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    temperature: float = 0.1,
    seed: int = 0,
    override: dict | None = None,
) -> dict:
    """Contrastive pretraining of the configured network on every ``training`` and ``validation`` crop of
    ``dataset_dir`` (labels unused) except the cases of ``exclude_dataset_dir``; writes the network state dict to
    ``output`` (temporary file, then renamed).

    Returns:
        ``{"cases": n, "epochs": e, "loss": [per-epoch mean], "seconds": s}``.

    Raises:
        ValueError: when no crop is left to pretrain on, or an argument is out of range.
    """
    from monai.bundle import ConfigParser
    from monai.data import CacheDataset, DataLoader, Dataset
    from monai.losses import ContrastiveLoss
    from monai.utils import set_determinism
    from tqdm import tqdm

    from .training import load_datalist

    if epochs < 1 or batch_size < 2:
        raise ValueError(f"epochs must be >= 1 and batch_size >= 2, got {epochs} and {batch_size}.")
    parser = ConfigParser()
    parser.read_config(list(config_file))
    parser.update({"dataset_dir": dataset_dir, **(override or {})})
    bundle_root = os.path.abspath(os.path.dirname(os.path.dirname(os.path.abspath(config_file[0]))))
    if bundle_root not in sys.path:
        sys.path.insert(1, bundle_root)
    set_determinism(seed=seed)
    phases = parser.get_parsed_content("phases")
    with open(os.path.join(dataset_dir, "datalist.json"), encoding="utf-8") as f:
        datalist = json.load(f)
    sections = [s for s in ("training", "validation") if datalist.get(s)]
    cases = [c for s in sections for c in load_datalist(dataset_dir, s, phases=phases)]
    if exclude_dataset_dir:
        with open(os.path.join(exclude_dataset_dir, "datalist.json"), encoding="utf-8") as f:
            excluded = {
                item.get("case") for items in json.load(f).values() if isinstance(items, list) for item in items
            }
        cases = [c for c in cases if c["case"] not in excluded]
    if not cases:
        raise ValueError(f"no unlabelled crop left in {dataset_dir} to pretrain on.")
    cases = [{k: v for k, v in c.items() if k in phases or k == "case"} for c in cases]
    deterministic = parser.get_parsed_content("train#deterministic_transforms")
    cached = CacheDataset(cases, deterministic, cache_rate=1.0, num_workers=0)
    views = Dataset(cached, transform=_TwoViews(_views(len(phases)), seed))
    loader = DataLoader(views, batch_size=batch_size, shuffle=True, num_workers=0, drop_last=True)
    network = parser.get_parsed_content("network")  # on the configured device and memory format
    device = parser.get_parsed_content("device")
    memory_format = (
        torch.channels_last_3d if parser.get_parsed_content("use_channels_last") else torch.contiguous_format
    )

    def encode(image: torch.Tensor) -> torch.Tensor:
        image = torch.as_tensor(image).as_subclass(torch.Tensor).to(device).contiguous(memory_format=memory_format)
        return encoder_features(network, image)

    features = encode(torch.zeros(2, *cached[0]["image"].shape)).shape[1]
    head = ContrastiveHead(features).to(device)
    optimizer = torch.optim.Adam([*network.parameters(), *head.parameters()], lr=learning_rate)
    loss_fn = ContrastiveLoss(temperature=temperature)
    history = []
    start = time.perf_counter()
    network.train()
    for epoch in range(epochs):
        total, steps = 0.0, 0
        for batch in tqdm(loader, desc=f"pretrain epoch {epoch + 1}/{epochs}", leave=False):
            first, second = head(encode(batch["image"])), head(encode(batch["image_2"]))
            loss = loss_fn(first, second)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, steps = total + float(loss), steps + 1
        history.append(round(total / max(steps, 1), 4))
        logger.info("pretrain epoch %d/%d: contrastive loss %.4f", epoch + 1, epochs, history[-1])
    output = Path(os.fspath(output))
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    torch.save({k: v.cpu() for k, v in network.state_dict().items()}, tmp)
    os.replace(tmp, output)
    set_determinism(seed=None)
    return {"cases": len(cases), "epochs": epochs, "loss": history, "seconds": round(time.perf_counter() - start, 1)}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m scripts.pretrain --dataset_dir DIR --output FILE [...]`` (run from the bundle folder)."""
    p = argparse.ArgumentParser(description="Self-supervised (contrastive) pretraining of LCA-DB on unlabelled crops.")
    p.add_argument("--config_file", nargs="+", default=["configs/train.json", "configs/cpu_light.json"])
    p.add_argument("--dataset_dir", required=True, help="dataset whose training/validation crops are used, unlabelled")
    p.add_argument("--exclude_dataset_dir", default=None, help="leave out the cases of this dataset (the labelled one)")
    p.add_argument("--output", required=True, help="network state dict to write (start training with --resume_from)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--override", default="{}", help="config ids as JSON (the recipe of the later training)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    result = pretrain(
        args.config_file,
        args.dataset_dir,
        args.output,
        args.exclude_dataset_dir,
        args.epochs,
        args.batch_size,
        args.learning_rate,
        args.temperature,
        args.seed,
        json.loads(args.override),
    )
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
