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
"""Export a checkpoint to a CPU-optimised TorchScript, a drop-in for the one ``monai.bundle ckpt_export`` writes.

    cd bundle
    python -m scripts.export_cpu --filepath models/model_cpu.ts --ckpt_file models/model.pt \\
        --meta_file configs/metadata.json --config_file configs/inference.json --save_attention true

The network is traced and frozen (``torch.jit.freeze``: weights inlined, BatchNorm folded into the convolutions),
with the full-resolution IA-Net stem and stage 1 (:data:`scripts.acceleration.FULL_RESOLUTION_MODULES`) in bf16 with
fp32 accumulation, bf16 from the stem's input to stage 1's output, when the CPU has native bf16 kernels; in fp32
otherwise. ``torch.jit.optimize_for_inference`` is left out: its oneDNN graph cannot be saved. The optimisation is
done here, once, rather than when a deploy process loads the model: freezing costs about two forwards. The frozen
graph is checked against the eager network before anything is written.

How much bf16 the tolerance allows depends on the weights and on the CPU's bf16 kernels (AVX512-BF16 and AMX round
differently), so ``--precision auto`` (the default) adapts: when the frozen graph differs from the eager network by
more than ``atol``, the bf16 module whose return to fp32 brings the difference down most goes back to fp32, one at a
time, until the tolerance holds (all fp32 at worst). ``--precision bf16`` keeps every listed module in bf16 or fails;
``--precision fp32`` exports without bf16 (the same graph on every x86 CPU).

The file embeds what ``ckpt_export`` embeds (``metadata.json``, each config file under its stem) except that
``inference.json`` holds the config files merged in order with the overrides applied (what the network was built
from, and what the deploy app parses its preprocessing from), plus ``cpu_export.json``: the SHA-256 of the
original weights (:func:`weights_sha256`; a frozen module has no ``state_dict``), the bf16 submodules, the largest
difference to the eager network, the input shape and the torch version.

Extra ``--key value`` arguments override config ids, as in ``monai.bundle`` commands (``--save_attention true``,
``--network_def#widen_factor 0.125``, ``--_meta_#version 0.2.0``). The file is made for the CPU; on a GPU use the
``ckpt_export`` model.
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .acceleration import FULL_RESOLUTION_MODULES, cpu_supports_fast_bfloat16, freeze_for_cpu_export

__all__ = ["CPU_EXPORT_INFO", "INFERENCE_CONFIG", "PRECISIONS", "export_cpu_model", "main", "weights_sha256"]

logger = logging.getLogger(__name__)

#: Extra file of the export holding the original weights' SHA-256 and how the graph was made.
CPU_EXPORT_INFO = "cpu_export.json"
#: Extra file holding the merged inference config (the name ckpt_export gives configs/inference.json).
INFERENCE_CONFIG = "inference.json"
_META_ID = "_meta_"
#: ``auto``: as many of the bf16 modules as the tolerance allows; ``bf16``: all of them or fail; ``fp32``: none.
PRECISIONS = ("auto", "bf16", "fp32")
#: ROIs the frozen graph is checked on against the eager network.
_CHECK_BATCH = 4


def weights_sha256(network: torch.nn.Module) -> str:
    """SHA-256 of the network's parameters and buffers (names, dtypes, shapes and values).

    Independent of the file's other content and of the device. The deploy app derives the SR's Device Observer
    UID from it, so the UID changes exactly when the weights do.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.numpy().tobytes() if value.dtype != torch.bfloat16 else value.float().numpy().tobytes())
    return digest.hexdigest()


def _as_paths(files: str | os.PathLike | Sequence[str | os.PathLike], argument: str) -> list[Path]:
    paths = [Path(files)] if isinstance(files, (str, os.PathLike)) else [Path(f) for f in files]
    if not paths:
        raise ValueError(f'Argument "{argument}" needs at least one file.')
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f'{argument} "{path}" not found.')
    return paths


def _load_weights(network: torch.nn.Module, ckpt_file: Path, key_in_ckpt: str) -> None:
    try:
        checkpoint = torch.load(ckpt_file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f'cannot read checkpoint "{ckpt_file}": {err}') from err
    if key_in_ckpt:
        if not isinstance(checkpoint, Mapping) or key_in_ckpt not in checkpoint:
            raise ValueError(f'checkpoint "{ckpt_file}" has no key {key_in_ckpt!r}.')
        checkpoint = checkpoint[key_in_ckpt]
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f'checkpoint "{ckpt_file}" holds a {type(checkpoint).__name__}, not a state_dict.')
    try:
        network.load_state_dict(checkpoint)
    except RuntimeError as err:
        raise ValueError(
            f'checkpoint "{ckpt_file}" does not fit the network of the config (see "key_in_ckpt" for nested '
            f"checkpoints, and the network_def overrides it was trained with): {err}"
        ) from err


def _outputs(value: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (value,) if isinstance(value, torch.Tensor) else tuple(value)


def _max_difference(reference: tuple[torch.Tensor, ...], ours: tuple[torch.Tensor, ...], net_id: str) -> float:
    if len(reference) != len(ours) or any(r.shape != o.shape for r, o in zip(reference, ours)):
        raise RuntimeError(f"the frozen graph of {net_id!r} returns other shapes than the network.")
    return max(float((r.float() - o.float()).abs().max()) for r, o in zip(reference, ours))


def _is_run(subset: Sequence[str], modules: Sequence[str]) -> bool:
    """Whether ``subset`` is a contiguous run of ``modules`` (a chain of bf16 modules must not skip one)."""
    start = modules.index(subset[0]) if subset else 0
    return list(subset) == list(modules[start : start + len(subset)])


def _freeze_within_tolerance(
    network: torch.nn.Module,
    example: torch.Tensor,
    check: torch.Tensor,
    modules: Sequence[str],
    chain_bfloat16: bool,
    atol: float,
    adapt: bool,
    net_id: str,
) -> tuple[torch.jit.ScriptModule, tuple[str, ...], bool, float, list[dict[str, Any]]]:
    """Freeze ``network`` with ``modules`` in bf16; when ``adapt``, move modules back to fp32 greedily until the
    frozen graph is within ``atol`` of the eager network on ``check``.

    Returns:
        the frozen module, its bf16 modules, whether they are chained, its largest difference, and every
        tried set of bf16 modules with its difference (for the export's record).
    """
    with torch.inference_mode():
        reference = _outputs(network(check))

    def attempt(subset: tuple[str, ...]) -> tuple[torch.jit.ScriptModule, bool, float]:
        chained = chain_bfloat16 and len(subset) > 1 and _is_run(subset, modules)
        frozen = freeze_for_cpu_export(network, example, subset, chained)
        with torch.inference_mode():
            difference = _max_difference(reference, _outputs(frozen(check)), net_id)
        tried.append({"bfloat16_modules": list(subset), "max_abs_difference_to_fp32": difference})
        logger.info("bf16 modules %s: largest difference to the eager network %.3g.", list(subset), difference)
        return frozen, chained, difference

    tried: list[dict[str, Any]] = []
    current = tuple(modules)
    frozen, chained, difference = attempt(current)
    while adapt and difference > atol and current:
        candidates = [tuple(m for m in current if m != dropped) for dropped in current]
        best = min((attempt(subset) + (subset,) for subset in candidates), key=lambda result: result[2])
        frozen, chained, difference, current = best
    if not difference <= atol:
        advice = "export with --precision auto or fp32" if current else "the network differs even in fp32"
        raise RuntimeError(
            f"the frozen graph of {net_id!r} differs from the eager network by {difference:.3g} > {atol} "
            f"(bf16 modules {list(current)}): {advice}."
        )
    return frozen, current, chained, difference, tried


def export_cpu_model(
    config_files: str | os.PathLike | Sequence[str | os.PathLike],
    ckpt_file: str | os.PathLike,
    meta_file: str | os.PathLike | Sequence[str | os.PathLike],
    filepath: str | os.PathLike,
    overrides: Mapping[str, Any] | None = None,
    net_id: str = "network_def",
    key_in_ckpt: str = "",
    input_shape: Sequence[int] | None = None,
    bfloat16_modules: Sequence[str] = FULL_RESOLUTION_MODULES,
    chain_bfloat16: bool = True,
    atol: float = 1e-3,
    precision: str = "auto",
) -> Path:
    """Write the CPU-optimised TorchScript of a checkpoint (see the module docstring).

    Args:
        config_files: the inference config file(s), merged in this order (``configs/inference.json``, then e.g.
            ``configs/cpu_light.json``).
        ckpt_file: the network's ``state_dict`` (``models/model.pt``).
        meta_file: the bundle metadata file(s) (``configs/metadata.json``).
        filepath: the TorchScript to write (``.ts`` is added when it has no extension); written to a temporary
            name in the same folder and renamed when complete.
        overrides: config ids and their values, applied after merging (e.g. ``{"save_attention": True}``).
        net_id: id of the network in the config, defaults to ``network_def``.
        key_in_ckpt: key of the weights in a nested checkpoint, defaults to none.
        input_shape: shape of the tracing input, defaults to ``[1, in_channels, *roi_size]`` of the network.
        bfloat16_modules: submodules to run in bf16 when the CPU has native bf16 kernels, defaults to
            :data:`~scripts.acceleration.FULL_RESOLUTION_MODULES`.
        chain_bfloat16: whether ``bfloat16_modules`` feed one another in order, so that the activations between
            them stay in bf16 (:func:`~scripts.acceleration.freeze_for_cpu_export`), defaults to True.
        atol: largest difference to the eager fp32 network allowed on any output (probabilities, attention maps).
        precision: ``auto`` (default): the ``bfloat16_modules`` that keep the difference within ``atol``, found by
            moving one module at a time back to fp32; ``bf16``: all of them, or fail; ``fp32``: none.

    Returns:
        the path of the written file.

    Raises:
        FileNotFoundError: when a config, metadata or checkpoint file is missing.
        ValueError: when the checkpoint cannot be read or does not fit the network, ``net_id`` is not a module, or
            ``precision`` is not one of :data:`PRECISIONS`.
        RuntimeError: when the frozen graph differs from the eager network by more than ``atol`` (``precision``
            ``bf16``, or a network that differs even in fp32).
    """
    from monai.bundle import ConfigParser
    from monai.data import save_net_with_metadata

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}.")
    start = time.perf_counter()
    config_paths = _as_paths(config_files, "config_file")
    meta_paths = _as_paths(meta_file, "meta_file")
    (ckpt_path,) = _as_paths(ckpt_file, "ckpt_file")
    filepath = Path(filepath)
    if not filepath.suffix:
        filepath = filepath.with_suffix(".ts")  # as ckpt_export (monai.data.save_net_with_metadata) does

    parser = ConfigParser()
    parser.read_config(f=[str(p) for p in config_paths])
    parser.read_meta(f=[str(p) for p in meta_paths])
    for key, value in (overrides or {}).items():
        parser[key] = value
    if net_id not in parser:
        raise ValueError(f"no {net_id!r} in the config files {[str(p) for p in config_paths]}.")
    network = parser.get_parsed_content(net_id)
    if not isinstance(network, torch.nn.Module):
        raise ValueError(f"{net_id!r} of {[str(p) for p in config_paths]} is a {type(network).__name__}, not a module.")
    network = network.cpu().eval()
    _load_weights(network, ckpt_path, key_in_ckpt)
    digest = weights_sha256(network)

    if input_shape is None:
        if hasattr(network, "in_channels") and hasattr(network, "roi_size"):
            input_shape = (1, int(network.in_channels), *(int(s) for s in network.roi_size))
        else:
            from monai.bundle.scripts import _get_fake_input_shape

            input_shape = _get_fake_input_shape(parser=parser)
        if not input_shape:
            raise ValueError('cannot tell the input shape of the network: give "input_shape".')
    input_shape = tuple(int(s) for s in input_shape)
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(input_shape, generator=generator)  # as ckpt_export traces
    # z-scored ROIs, as image_preprocessing makes them; several, so that the tolerance is not met by one lucky draw
    check = torch.randn((_CHECK_BATCH, *input_shape[1:]), generator=generator)

    bfloat16 = cpu_supports_fast_bfloat16() and precision != "fp32"
    modules = tuple(bfloat16_modules) if bfloat16 else ()
    if precision != "fp32" and not cpu_supports_fast_bfloat16():
        logger.warning("This CPU has no native bf16 kernels (AVX512-BF16 or AMX): exporting the frozen graph in fp32.")
    logger.info("Tracing and freezing %s with input %s, bf16 modules %s.", net_id, list(input_shape), list(modules))
    frozen, modules, chained, difference, tried = _freeze_within_tolerance(
        network, example, check, modules, chain_bfloat16, atol, precision == "auto", net_id
    )
    if len(tried) > 1:
        logger.warning(
            "bf16 modules %s exceeded the tolerance %s on this CPU: exported with bf16 modules %s (difference %.3g).",
            list(bfloat16_modules), atol, list(modules), difference,
        )  # fmt: skip

    config = copy.deepcopy(parser.get())
    meta_values = config.pop(_META_ID, None)
    extra_files: dict[str, bytes] = {}
    for path in config_paths:  # as ckpt_export: each config file under its stem, as JSON
        extra_files[f"{path.stem}.json"] = json.dumps(ConfigParser.load_config_file(str(path))).encode()
    extra_files[INFERENCE_CONFIG] = json.dumps(config).encode()
    info = {
        "weights_sha256": digest,
        "precision": precision,
        "bfloat16_modules": list(modules),
        "chain_bfloat16": chained,
        "tried": tried,
        "frozen": True,
        "input_shape": list(input_shape),
        "max_abs_difference_to_fp32": difference,
        "torch_version": torch.__version__,
    }
    extra_files[CPU_EXPORT_INFO] = json.dumps(info).encode()

    filepath.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{filepath.name}.", suffix=".tmp", dir=filepath.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            save_net_with_metadata(
                frozen,
                stream,
                include_config_vals=False,
                append_timestamp=False,
                meta_values=meta_values,
                more_extra_files=extra_files,
            )
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp_name, 0o666 & ~umask)  # mkstemp makes it private; give it the mode a plain file would have
        os.replace(temp_name, filepath)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    logger.info(
        "Exported %s (weights sha256 %s, bf16 modules %s, max difference to fp32 %.2g) in %.1f s.",
        filepath, digest[:16], list(modules), difference, time.perf_counter() - start,
    )  # fmt: skip
    return filepath


def _parse_value(text: str) -> Any:
    """A command-line value: JSON (``true``, ``[1, 2]``), else a Python literal (``True``), else the string."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError):
            continue
    return text


def _overrides(tokens: Sequence[str]) -> dict[str, Any]:
    """``--key value`` / ``--key=value`` pairs of the command line as config overrides."""
    overrides: dict[str, Any] = {}
    tokens = list(tokens)
    while tokens:
        token = tokens.pop(0)
        if not token.startswith("--") or len(token) == 2:
            raise SystemExit(f"unexpected argument {token!r}: overrides are given as --<config id> <value>.")
        key, sep, value = token[2:].partition("=")
        if not sep:
            if not tokens or tokens[0].startswith("--"):
                raise SystemExit(f"no value given for --{key}.")
            value = tokens.pop(0)
        overrides[key] = _parse_value(value)
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m scripts.export_cpu`` (bundle/ as the working directory or on sys.path); returns the
    exit status (1: the error is logged and no file is written)."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.export_cpu [net_id]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--net_id", default=None, help="network id in the config (network_def); may come first")
    parser.add_argument("--filepath", default="models/model_cpu.ts", help="TorchScript to write")
    parser.add_argument("--ckpt_file", default="models/model.pt", help="the network's state_dict")
    parser.add_argument("--meta_file", nargs="+", default=["configs/metadata.json"], help="bundle metadata file(s)")
    parser.add_argument(
        "--config_file", nargs="+", default=["configs/inference.json"], help="inference config file(s), in merge order"
    )
    parser.add_argument("--key_in_ckpt", default="", help="key of the weights in a nested checkpoint")
    parser.add_argument("--input_shape", help='tracing input shape, e.g. "[1, 8, 128, 128, 16]" (from the network)')
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: the bf16 modules the 1e-3 tolerance allows on this CPU (default); bf16: all or fail; fp32: none",
    )
    parser.add_argument("--use_trace", default="True", help="accepted as ckpt_export's; the export always traces")
    argv = list(sys.argv[1:] if argv is None else argv)
    net_id = argv.pop(0) if argv and not argv[0].startswith("-") else "network_def"  # as ckpt_export's positional
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def files(values: list[str]) -> list[str]:  # ckpt_export style "['a.json','b.json']" too
        return [str(f) for v in values for f in (_parse_value(v) if v.lstrip().startswith("[") else [v])]

    if _parse_value(args.use_trace) is not True:
        parser.error("--use_trace must be True: the CPU export is made by tracing.")
    try:
        export_cpu_model(
            config_files=files(args.config_file),
            ckpt_file=args.ckpt_file,
            meta_file=files(args.meta_file),
            filepath=args.filepath,
            overrides=_overrides(rest),
            net_id=args.net_id or net_id,
            key_in_ckpt=args.key_in_ckpt,
            input_shape=_parse_value(args.input_shape) if args.input_shape else None,
            precision=args.precision,
        )
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        logger.error("CPU export failed, nothing written: %s", err)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
