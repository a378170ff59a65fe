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
"""Import a checkpoint trained by the authors' code into the bundle's ``models/model.pt``.

Command line (from the bundle folder)::

    python -m scripts.import_reference best_model.pth --output models/model.pt --depth 10 --widen_factor 1.0

The checkpoint's names are mapped with :func:`~.reference_checkpoint.load_reference_state_dict`, which lists
every missing, unexpected or mis-shaped parameter; the bundle's state dict is written to a temporary file and
renamed, then read back into :class:`~.network.LCADBInference` to check it loads.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .constants import DEFAULT_PATCH_SIZE, DEFAULT_ROI_SIZE
from .network import LCADBInference
from .reference_checkpoint import load_reference_state_dict

__all__ = ["import_reference_checkpoint", "main"]

logger = logging.getLogger(__name__)


def import_reference_checkpoint(
    checkpoint: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False, **network_kwargs
) -> Path:
    """Convert a reference checkpoint into a bundle checkpoint (the network ``state_dict``, as ``models/model.pt``).

    Args:
        checkpoint: the authors' checkpoint (``{'model': state_dict, ...}`` or a bare state dict).
        output: bundle checkpoint to write, e.g. ``<bundle>/models/model.pt``.
        overwrite: replace an existing ``output``, defaults to False.
        network_kwargs: :class:`~.network.LCADB` arguments the checkpoint was trained with (``depth``,
            ``widen_factor``, ``roi_size``, ``patch_size``); the bundle configs must use the same values.

    Returns:
        the path written.

    Raises:
        FileExistsError: when ``output`` exists and ``overwrite`` is False.
        FileNotFoundError, ValueError: from :func:`~.reference_checkpoint.load_reference_state_dict`.
    """
    output = Path(os.fspath(output))
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass overwrite=True (--overwrite) to replace it.")
    network = load_reference_state_dict(checkpoint, **network_kwargs)
    state_dict = network.state_dict()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        torch.save(state_dict, tmp)
        check = LCADBInference(**network_kwargs)
        check.load_state_dict(torch.load(tmp, map_location="cpu", weights_only=True), strict=True)
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("imported %s -> %s (%d tensors)", checkpoint, output, len(state_dict))
    return output


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.import_reference",
        description="Import a checkpoint trained by the LCA-DB authors' code into the bundle's models/ folder.",
    )
    parser.add_argument("checkpoint", type=Path, help="the authors' checkpoint (.pth)")
    parser.add_argument("--output", type=Path, default=Path("models/model.pt"), help="default: models/model.pt")
    parser.add_argument("--depth", type=int, default=10, help="ResNet depth of the checkpoint; default 10")
    parser.add_argument("--widen_factor", type=float, default=1.0, help="width multiplier; default 1.0")
    parser.add_argument("--roi_size", type=int, nargs=3, default=list(DEFAULT_ROI_SIZE), metavar=("H", "W", "D"))
    parser.add_argument("--patch_size", type=int, default=DEFAULT_PATCH_SIZE)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = import_reference_checkpoint(
        args.checkpoint,
        args.output,
        overwrite=args.overwrite,
        depth=args.depth,
        widen_factor=args.widen_factor,
        roi_size=tuple(args.roi_size),
        patch_size=args.patch_size,
    )
    logger.info("done: evaluate it with --ckpt_path %s (and the same network_def arguments)", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
