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
"""The app's inference on lesion ROIs, free of Holoscan: the inference operator runs it, and so does the GPU
check (``benchmarks/gpu_inference.py``) on a machine without the Deploy SDK.

Lesions go through the network ``batch_size`` at a time, so peak memory depends on the chunk, not on the number
of lesions. On CUDA the network runs under bfloat16 autocast unless told not to.
"""

from __future__ import annotations

import numpy as np
import torch

from .bundle_access import LoadedModel
from .domain import LesionResult, LesionROI
from .errors import ModelPackageError

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "classify_lesions",
    "most_attended_patch",
    "preprocess_rois",
    "run_network",
]

#: Lesions per forward pass: the paper-size network needs about 0.5 GB per lesion on the CPU (deploy_app/README.md).
DEFAULT_BATCH_SIZE = 4


def preprocess_rois(model: LoadedModel, rois: list[LesionROI]) -> torch.Tensor:
    """Network input ``[N, 8, H, W, D]`` of the lesion ROIs, by the bundle's ``image_preprocessing``."""
    return torch.stack([model.preprocess(roi.roi) for roi in rois])


def most_attended_patch(attention: np.ndarray, roi: LesionROI, input_shape: tuple[int, int, int]) -> tuple[float, ...]:
    """The patch with the largest attention, mapped from the network input back onto the reference grid.

    The network sees the ROI resized to ``input_shape`` (H, W, D) and cuts it into a ``attention.shape`` grid of
    in-plane patches spanning the whole depth; the resize is linear, so a patch maps back to a box of the ROI.

    Returns:
        ``(x0, y0, z0, x1, y1, z1)`` in reference-grid voxel-edge coordinates (floats).
    """
    gh, gw = attention.shape
    i, j = np.unravel_index(int(np.argmax(attention)), attention.shape)
    roi_shape = roi.roi.shape[1:]
    ph, pw = input_shape[0] / gh, input_shape[1] / gw
    sx, sy = roi_shape[0] / input_shape[0], roi_shape[1] / input_shape[1]
    ox, oy, oz = roi.roi_origin
    return (
        ox + i * ph * sx,
        oy + j * pw * sy,
        float(oz),
        ox + (i + 1) * ph * sx,
        oy + (j + 1) * pw * sy,
        float(oz + roi_shape[2]),
    )


def run_network(
    model: LoadedModel, batch: torch.Tensor, autocast: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One forward pass: ``(probabilities [N, classes], attention_ia, attention_pa)`` as float32 arrays.

    On CUDA with ``autocast`` the network runs under ``torch.autocast("cuda", dtype=torch.bfloat16)``.

    Raises:
        ModelPackageError: when the network does not return the attention maps (export it with
            ``--network_def#return_attention true``) or returns probabilities of another shape.
    """
    use_autocast = autocast and model.device.type == "cuda"
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
        output = model.network(batch.to(model.device))
    if not isinstance(output, (tuple, list)) or len(output) != 3:
        raise ModelPackageError(
            f"{model.path} returns {type(output).__name__}, not (probabilities, attention_ia, attention_pa): export "
            "the bundle with 'ckpt_export ... --network_def#return_attention true'."
        )
    probabilities, attention_ia, attention_pa = (t.float().cpu().numpy() for t in output)
    if probabilities.shape != (len(batch), len(model.class_names)):
        raise ModelPackageError(
            f"{model.path} returns probabilities of shape {probabilities.shape}, expected "
            f"{(len(batch), len(model.class_names))} ({len(model.class_names)} classes in its metadata)."
        )
    return probabilities, attention_ia, attention_pa


def classify_lesions(
    model: LoadedModel,
    rois: list[LesionROI],
    batch: torch.Tensor | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    autocast: bool = True,
) -> list[LesionResult]:
    """Run the network on every lesion ROI, ``batch_size`` lesions at a time.

    Args:
        model: the loaded bundle export.
        rois: lesion ROIs.
        batch: their preprocessed input (:func:`preprocess_rois`); by default each chunk is preprocessed when it
            is run, so only one chunk's input is in memory.
        batch_size: lesions per forward pass (at least 1).
        autocast: bfloat16 autocast on CUDA (:func:`run_network`).

    Raises:
        ModelPackageError: as :func:`run_network`.
        ValueError: for a ``batch_size`` below 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    results = []
    for start in range(0, len(rois), batch_size):
        chunk = rois[start : start + batch_size]
        inputs = batch[start : start + batch_size] if batch is not None else preprocess_rois(model, chunk)
        probabilities, attention_ia, attention_pa = run_network(model, inputs, autocast)
        attention = 0.5 * (attention_ia + attention_pa)
        input_shape = tuple(int(s) for s in inputs.shape[2:])
        del inputs
        results.extend(
            LesionResult(
                lesion=roi,
                probabilities=probabilities[n],
                class_index=int(np.argmax(probabilities[n])),
                attention=attention[n],
                patch_box=most_attended_patch(attention[n], roi, input_shape),  # type: ignore[arg-type]
            )
            for n, roi in enumerate(chunk)
        )
    return results
