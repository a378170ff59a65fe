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
"""Phase selection: which image set of the study is each MRI phase, from DICOM attributes first, names second
(:mod:`deploy_app.phase_identification`), with the site's name rules and SeriesInstanceUID map as overrides."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec
from monai.deploy.core.domain.dicom_series import DICOMSeries
from monai.deploy.core.domain.dicom_series_selection import SelectedSeries, StudySelectedSeries
from monai.deploy.core.domain.dicom_study import DICOMStudy

from ..errors import StudyInputError
from ..phase_identification import ImageSet, PhaseIdentification, identify_phases

__all__ = [
    "DEFAULT_RULES_FILE",
    "ImageSetSeries",
    "PhaseSelectorOperator",
    "load_phase_rules",
    "load_series_phases",
    "select_phases",
]

#: The name rules shipped with the app; users edit them (or give their own) to match their scanners' naming.
DEFAULT_RULES_FILE = Path(__file__).resolve().parents[1] / "phase_rules.json"


def load_phase_rules(path: Path, phases: tuple[str, ...]) -> dict:
    """Read a rules file and check that each selection names a phase and each phase has at most one selection.

    Raises:
        StudyInputError: when the file is missing or not JSON, or names unknown phases or a phase twice.
    """
    path = Path(path)
    try:
        rules = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StudyInputError(f"cannot read the phase rules file {path}: {err}") from err
    names = [str(selection.get("name", "")) for selection in rules.get("selections", [])]
    problems = [f"{p!r} has {names.count(p)} rules" for p in phases if names.count(p) > 1]
    unknown = sorted(set(names) - set(phases))
    if problems or unknown:
        raise StudyInputError(
            f"phase rules file {path} must have at most one selection per phase {list(phases)}: "
            + "; ".join(problems + [f"unknown selection names {unknown}"] * bool(unknown))
            + "."
        )
    return rules


def load_series_phases(value: Mapping[str, str] | str | Path | None, phases: tuple[str, ...]) -> dict[str, str]:
    """The site's explicit SeriesInstanceUID -> phase map: a mapping, or a JSON file holding one.

    Raises:
        StudyInputError: when the file cannot be read or a value is not one of ``phases``.
    """
    if not value:
        return {}
    if isinstance(value, (str, Path)):
        try:
            value = json.loads(Path(value).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise StudyInputError(f"cannot read the series -> phase map {value}: {err}") from err
    if not isinstance(value, Mapping):
        raise StudyInputError(
            f"the series -> phase map must map SeriesInstanceUID to phase, got {type(value).__name__}."
        )
    unknown = {uid: phase for uid, phase in value.items() if phase not in phases}
    if unknown:
        raise StudyInputError(f"the series -> phase map names unknown phases {unknown}; phases are {list(phases)}.")
    return {str(uid): str(phase) for uid, phase in value.items()}


class ImageSetSeries(DICOMSeries):
    """A ``DICOMSeries`` holding one image set (a whole series or one volume of it) chosen for a phase.

    Attributes:
        image_set: the :class:`deploy_app.phase_identification.ImageSet` (label, evidence).
        phase: the phase it serves.
    """

    def __init__(self, image_set: ImageSet, phase: str) -> None:
        super().__init__(image_set.series_instance_uid)
        source = image_set.series
        for keyword in ("SeriesDate", "SeriesTime", "Modality", "SeriesDescription", "SeriesNumber"):
            value = getattr(source, keyword, None)
            if value is not None:
                setattr(self, keyword, value)
        for ds in image_set.datasets:
            self.add_sop_instance(ds)
        self.image_set = image_set
        self.phase = phase


def select_phases(
    study: DICOMStudy, phases: tuple[str, ...], rules: dict | None, series_phases: Mapping[str, str] | None
) -> tuple[StudySelectedSeries, PhaseIdentification]:
    """Identify the phases of ``study`` and build the selection (phases in network channel order).

    Raises:
        StudyInputError: listing every problem of :func:`deploy_app.phase_identification.identify_phases`.
    """
    all_series = study.get_all_series()
    modalities = sorted({str(s.Modality) for s in all_series})
    if "MR" not in modalities:
        raise StudyInputError(
            f"study {study.StudyInstanceUID} has no MR series (modalities found: {modalities}); "
            "LCA-DB needs the 8 MRI phases."
        )
    identification = identify_phases(all_series, phases, rules, series_phases)
    if identification.problems:
        raise StudyInputError(
            f"{len(identification.problems)} problem(s) identifying the phases of study {study.StudyInstanceUID}: "
            + "; ".join(identification.problems)
            + ". Run `python -m deploy_app phases -i <study>` for the evidence."
        )
    selection = StudySelectedSeries(study)
    for phase in phases:
        selection.add_selected_series(SelectedSeries(phase, ImageSetSeries(identification.chosen[phase], phase), None))
    return selection, identification


class PhaseSelectorOperator(Operator):
    """Selects, for each of the 8 phases, the image set that is that phase (see :mod:`deploy_app.phase_identification`).

    Named input:
        dicom_study_list: the list of one ``DICOMStudy`` from the loader.

    Named output:
        study_selected_series_list: one ``StudySelectedSeries`` whose ``selected_series`` are in phase (network
            channel) order, each ``selection_name`` being the phase and each ``series`` an :class:`ImageSetSeries`.

    Raises (in ``compute``):
        StudyInputError: listing every phase that cannot be decided (none, a tie, a missing or duplicated slice).
    """

    def __init__(
        self,
        fragment: Fragment,
        *args,
        rules_file: Path | None = DEFAULT_RULES_FILE,
        phases: tuple[str, ...],
        series_phases: Mapping[str, str] | str | Path | None = None,
        **kwargs,
    ) -> None:
        self.phases = tuple(phases)
        self.rules_file = Path(rules_file) if rules_file else None
        self.rules = load_phase_rules(self.rules_file, self.phases) if self.rules_file else None
        self.series_phases = load_series_phases(series_phases, self.phases)
        self.input_name_study_list = "dicom_study_list"
        self.output_name_selected_series = "study_selected_series_list"
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input(self.input_name_study_list)
        spec.output(self.output_name_selected_series)

    def compute(self, op_input, op_output, context):
        studies = op_input.receive(self.input_name_study_list)
        if not studies or not isinstance(studies[0], DICOMStudy):
            raise StudyInputError("no DICOM study was loaded.")
        selection, identification = select_phases(studies[0], self.phases, self.rules, self.series_phases)
        for line in identification.report():
            self._logger.debug(line)
        for phase in self.phases:
            image_set = identification.chosen[phase]
            self._logger.info(
                "Phase %-9s <- %s, SeriesInstanceUID %s (score %g)",
                phase,
                image_set.label,
                image_set.series_instance_uid,
                image_set.score(phase),
            )
        unused = [s for s in identification.image_sets if identification.phase_of(s) is None]
        if unused:
            self._logger.info(
                "Not used: %s", "; ".join(f"{s.label} ({s.excluded or 'no phase left for it'})" for s in unused)
            )
        op_output.emit([selection], self.output_name_selected_series)
