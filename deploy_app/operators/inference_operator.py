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
"""LCA-DB inference on each lesion ROI with the model exported by the bundle, on CUDA when present.

Lesions go through the network ``batch_size`` at a time (``lcadb.inference_batch_size`` in ``app.yaml``), so peak
memory depends on the chunk, not on the number of lesions. On CUDA the network runs under bfloat16 autocast
(``lcadb.cuda_autocast``); ``benchmarks/gpu_inference.py`` checks that class and probabilities stay within 1e-3 of
fp32 there. The work itself is in :mod:`deploy_app.inference`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec

from ..bundle_access import LoadedModel, load_model
from ..domain import LesionROI, PhaseVolume, StudyResult
from ..inference import DEFAULT_BATCH_SIZE, classify_lesions, most_attended_patch, preprocess_rois, run_network

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "LCADBInferenceOperator",
    "classify_lesions",
    "most_attended_patch",
    "preprocess_rois",
    "run_network",
]


class LCADBInferenceOperator(Operator):
    """Classifies each lesion ROI with the TorchScript exported by the bundle.

    The preprocessing is the bundle's ``image_preprocessing`` (embedded ``inference.json``); the network
    runs on CUDA when available (bfloat16 autocast unless ``autocast`` is false), else on the CPU, ``batch_size``
    lesions at a time.

    Named inputs:
        lesion_rois: list of :class:`deploy_app.domain.LesionROI` from the ROI operator.
        phase_volume: the study's :class:`deploy_app.domain.PhaseVolume` (geometry for the SR).

    Named output:
        result: a :class:`deploy_app.domain.StudyResult`, in memory.
    """

    def __init__(
        self,
        fragment: Fragment,
        *args,
        model_path: Path,
        device: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        autocast: bool = True,
        **kwargs,
    ):
        if int(batch_size) < 1:
            raise ValueError(f"lcadb.inference_batch_size must be at least 1, got {batch_size}.")
        self.model_path = Path(model_path)
        self.device = device
        self.batch_size = int(batch_size)
        self.autocast = bool(autocast)
        self.input_name_rois = "lesion_rois"
        self.input_name_volume = "phase_volume"
        self.output_name_result = "result"
        self._model: LoadedModel | None = None
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input(self.input_name_rois)
        spec.input(self.input_name_volume)
        spec.output(self.output_name_result)

    @property
    def model(self) -> LoadedModel:
        """The exported model, loaded on first use."""
        if self._model is None:
            self._model = load_model(self.model_path, self.device)
        return self._model

    def compute(self, op_input, op_output, context):
        rois = op_input.receive(self.input_name_rois)
        volume = op_input.receive(self.input_name_volume)
        if not rois or not all(isinstance(r, LesionROI) for r in rois):
            raise ValueError(f"{self.input_name_rois} must be a non-empty list of LesionROI.")
        if not isinstance(volume, PhaseVolume):
            raise ValueError(f"{self.input_name_volume} must be a PhaseVolume, got {type(volume).__name__}.")
        op_output.emit(self.predict(rois, volume), self.output_name_result)

    def predict(self, rois: list[LesionROI], volume: PhaseVolume) -> StudyResult:
        """Classify the lesions of one study."""
        model = self.model
        lesions = classify_lesions(model, rois, batch_size=self.batch_size, autocast=self.autocast)
        for result in lesions:
            self._logger.info(
                "Lesion %s: %s (p=%.3f).",
                result.lesion.lesion_id,
                model.class_names[result.class_index],
                result.probabilities[result.class_index],
            )
        return StudyResult(
            lesions=lesions,
            volume=volume,
            class_names=model.class_names,
            model_name=model.name,
            model_version=model.version,
            weights_sha256=model.weights_sha256,
            device=str(model.device),
        )
