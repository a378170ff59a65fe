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
"""LCA-DB liver lesion classification: an 8-phase MRI study in, a TID 1500 SR, an attention SEG, a summary page and
key objects out (to PACS)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application

from .bundle_access import ensure_bundle_scripts
from .operators import (
    ClassificationSRWriterOperator,
    LCADBInferenceOperator,
    LesionROIOperator,
    PACSSenderOperator,
    PhaseSelectorOperator,
    PhaseVolumeOperator,
    StudyLoaderOperator,
)
from .operators.inference_operator import DEFAULT_BATCH_SIZE
from .operators.pacs_sender_operator import (
    destinations_from_config,
    retry_policy_from_config,
    summary_mode_from_config,
)
from .operators.phase_selector_operator import DEFAULT_RULES_FILE
from .preflight import check_model_package, check_output_folder, timed_stage

__all__ = ["APP_DIR", "LCADBDeployApp", "config_path"]

APP_DIR = Path(__file__).resolve().parent


def config_path() -> Path:
    """The app configuration: ``HOLOSCAN_CONFIG_PATH`` (set inside a MAP), else ``app.yaml`` next to this file."""
    return Path(os.environ.get("HOLOSCAN_CONFIG_PATH") or APP_DIR / "app.yaml")


class LCADBDeployApp(Application):
    """Classifies the focal liver lesions of an 8-phase liver MRI study with the LCA-DB bundle's model.

    Inputs come from ``-i/-o/-m`` or ``HOLOSCAN_INPUT_PATH``/``HOLOSCAN_OUTPUT_PATH``/``HOLOSCAN_MODEL_PATH``;
    the ``lcadb`` and ``pacs`` blocks of the configuration (:func:`config_path`) set the phase rules file and
    the PACS destinations; ``lcadb.phase_series`` optionally maps SeriesInstanceUIDs to phases (a site override).
    """

    def __init__(self, *args, **kwargs):
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        super().__init__(*args, **kwargs)
        self.config(str(config_path()))

    def run(self, *args, **kwargs):
        self._logger.info(f"Begin {self.run.__name__}")
        super().run(*args, **kwargs)
        self._logger.info(f"End {self.run.__name__}")

    def compose(self):
        """Creates the operators and connects them."""
        self._logger.info(f"Begin {self.compose.__name__}")
        app_context = Application.init_app_context(self.argv)
        input_path = Path(app_context.input_path)
        output_path = Path(app_context.output_path)
        model_path = Path(app_context.model_path)
        # fail fast: model, output folder and PACS configuration are checked before the study is read
        check_model_package(model_path)
        check_output_folder(output_path)
        destinations = destinations_from_config(self.kwargs("pacs"))
        retry_policy = retry_policy_from_config(self.kwargs("pacs"))
        summary_mode = summary_mode_from_config(self.kwargs("pacs"))
        ensure_bundle_scripts()
        from scripts.constants import PHASES

        settings = self.kwargs("lcadb") or {}
        rules = settings.get("phase_rules") or DEFAULT_RULES_FILE
        rules_file = Path(rules) if Path(rules).is_absolute() else APP_DIR / rules
        # site override: SeriesInstanceUID -> phase, inline or a JSON file (relative paths from the app folder)
        series_phases = settings.get("phase_series") or None
        if isinstance(series_phases, str) and not Path(series_phases).is_absolute():
            series_phases = APP_DIR / series_phases

        study_loader_op = timed_stage(StudyLoaderOperator)(
            self, CountCondition(self, 1), input_folder=input_path, name="study_loader_op"
        )
        phase_selector_op = timed_stage(PhaseSelectorOperator)(
            self, rules_file=rules_file, phases=PHASES, series_phases=series_phases, name="phase_selector_op"
        )
        phase_volume_op = timed_stage(PhaseVolumeOperator)(self, phases=PHASES, name="phase_volume_op")
        lesion_roi_op = timed_stage(LesionROIOperator)(self, input_folder=input_path, name="lesion_roi_op")
        inference_op = timed_stage(LCADBInferenceOperator)(
            self,
            model_path=model_path,
            batch_size=settings.get("inference_batch_size", DEFAULT_BATCH_SIZE),
            autocast=settings.get("cuda_autocast", True),
            name="inference_op",
        )
        sr_writer_op = timed_stage(ClassificationSRWriterOperator)(self, output_folder=output_path, name="sr_writer_op")

        self.add_flow(study_loader_op, phase_selector_op, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(
            phase_selector_op, phase_volume_op, {("study_selected_series_list", "study_selected_series_list")}
        )
        self.add_flow(phase_volume_op, lesion_roi_op, {("phase_volume", "phase_volume")})
        # The inference operator takes the ROIs and, for the SR geometry, the phase volume itself.
        self.add_flow(lesion_roi_op, inference_op, {("lesion_rois", "lesion_rois")})
        self.add_flow(phase_volume_op, inference_op, {("phase_volume", "phase_volume")})
        self.add_flow(inference_op, sr_writer_op, {("result", "result")})

        if destinations:
            pacs_sender_op = timed_stage(PACSSenderOperator)(
                self,
                destinations=destinations,
                retry_policy=retry_policy,
                summary_mode=summary_mode,
                name="pacs_sender_op",
            )
            self.add_flow(sr_writer_op, pacs_sender_op, {("output_paths", "output_paths")})
        self._logger.info(f"End {self.compose.__name__}")
