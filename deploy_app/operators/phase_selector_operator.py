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
"""Phase selection: one named rule per MRI phase, in the SDK series selector's rule format."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from monai.deploy.core.domain.dicom_series_selection import SelectedSeries, StudySelectedSeries
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator

from ..errors import StudyInputError

__all__ = ["DEFAULT_RULES_FILE", "PhaseSelectorOperator", "load_phase_rules"]

#: The rules file shipped with the app; users edit it (or give their own) to match their scanners' naming.
DEFAULT_RULES_FILE = Path(__file__).resolve().parents[1] / "phase_rules.json"


def load_phase_rules(path: Path, phases: tuple[str, ...]) -> dict:
    """Read a rules file and check that it has exactly one selection named after each phase.

    Raises:
        StudyInputError: when the file is missing or not JSON, or a phase has no or several rules.
    """
    path = Path(path)
    try:
        rules = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StudyInputError(f"cannot read the phase rules file {path}: {err}") from err
    names = [str(selection.get("name", "")) for selection in rules.get("selections", [])]
    problems = [f"{p!r} has {names.count(p)} rules" for p in phases if names.count(p) != 1]
    unknown = sorted(set(names) - set(phases))
    if problems or unknown:
        raise StudyInputError(
            f"phase rules file {path} must have one selection per phase {list(phases)}: "
            + "; ".join(problems + [f"unknown selection names {unknown}"] * bool(unknown))
            + "."
        )
    return rules


class PhaseSelectorOperator(DICOMSeriesSelectorOperator):
    """Selects, for each of the 8 phases, the one series its named rule matches.

    The rules are the SDK selector's JSON (``{"selections": [{"name": <phase>, "conditions": {...}}]}``):
    conditions are AND-ed, strings are case-insensitive regular expressions searched in the attribute
    (``SeriesDescription``, ``Modality``, ``ImageType``, ...). Unlike the SDK selector, which takes the first
    match, a phase whose rule matches no series or several series, and a series matched by two phases, are
    errors: a wrong phase in a channel would give a confident, wrong classification.

    Named input:
        dicom_study_list: the list of one ``DICOMStudy`` from the loader.

    Named output:
        study_selected_series_list: one ``StudySelectedSeries`` whose ``selected_series`` are in phase
            (network channel) order, each ``selection_name`` being the phase.

    Raises (in ``compute``):
        StudyInputError: naming the phase (and the candidate series) that cannot be selected, or saying
            that the study has no MR series.
    """

    def __init__(
        self, fragment, *args, rules_file: Path = DEFAULT_RULES_FILE, phases: tuple[str, ...], **kwargs
    ) -> None:
        self.rules_file = Path(rules_file)
        self.phases = tuple(phases)
        rules = load_phase_rules(self.rules_file, self.phases)
        self._selector_logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        super().__init__(fragment, *args, rules=json.dumps(rules), all_matched=True, **kwargs)

    def filter(self, selection_rules, dicom_study_list, all_matched: bool = True, sort_by_sop_instance_count=False):
        """Select one series per phase (see the class docstring)."""
        if not dicom_study_list:
            raise StudyInputError("no DICOM study was loaded.")
        study = dicom_study_list[0]
        all_series = study.get_all_series()
        modalities = sorted({str(s.Modality) for s in all_series})
        if "MR" not in modalities:
            raise StudyInputError(
                f"study {study.StudyInstanceUID} has no MR series (modalities found: {modalities}); "
                "LCA-DB needs the 8 MRI phases."
            )
        rules = {s["name"]: s.get("conditions", {}) for s in selection_rules["selections"]}
        selected: dict[str, object] = {}
        for phase in self.phases:
            matches = self._select_series(rules[phase], study, all_matched=True)
            if not matches:
                described = [f"{s.SeriesNumber}: {s.SeriesDescription!r} ({s.Modality})" for s in all_series]
                raise StudyInputError(
                    f"phase {phase!r} not found: no series of study {study.StudyInstanceUID} matches its rule "
                    f"{rules[phase]} in {self.rules_file}. Series present: {described}."
                )
            if len(matches) > 1:
                described = [f"{s.SeriesNumber}: {s.SeriesDescription!r}" for s in matches]
                raise StudyInputError(
                    f"phase {phase!r} is ambiguous: its rule in {self.rules_file} matches {len(matches)} series "
                    f"{described}; make the rule stricter."
                )
            selected[phase] = matches[0]
        by_uid: dict[str, list[str]] = {}
        for phase, series in selected.items():
            by_uid.setdefault(series.SeriesInstanceUID, []).append(phase)
        shared = {uid: p for uid, p in by_uid.items() if len(p) > 1}
        if shared:
            raise StudyInputError(f"one series is selected for several phases {list(shared.values())}; fix the rules.")

        study_selected = StudySelectedSeries(study)
        for phase in self.phases:
            study_selected.add_selected_series(SelectedSeries(phase, selected[phase], None))
            self._selector_logger.info(
                "Phase %-9s <- series %s %r", phase, selected[phase].SeriesNumber, selected[phase].SeriesDescription
            )
        return [study_selected]
