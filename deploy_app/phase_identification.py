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
"""Which image set of a study is which of the 8 LCA-DB phases, decided from what the images are.

A study's series are first split into *image sets*: one volume each. A series holding several volumes (a
dynamic acquisition stored as one series with several temporal positions, a Dixon series with in-phase,
opposed-phase, water and fat images, a diffusion series with several b-values) becomes several image sets.

Every image set then collects weighted evidence for each phase, from DICOM attributes first:

- exclusions: not an MR image, ImageType LOCALIZER (or a GE 3-plane SeriesPlane, a Siemens ``AAHScout`` / ``fl2d1``
  localizer, several orientations in one set, fewer than :data:`MIN_SLICES` slices), calculated maps (ADC, eADC,
  FA, ...), SUBTRACTION, MIP/MPR/projections, Dixon water and fat images;
- DWI: ImageType DIFFUSION/TRACEW, a b-value (standard (0018,9087) and the Siemens, GE, Philips and United Imaging
  private tags, Siemens ``*ep_b<value>`` sequence names, Canon ``b=<value>`` image comments); the highest b wins;
- T2WI: T2 weighting (long TE and TR, not gradient echo, not diffusion), in the plane of the dynamic series;
- In/Out Phase: ImageType IN_PHASE/OPP_PHASE (and IP/OP, OUT_PHASE), else two echoes of one gradient-echo
  acquisition whose echo times are in phase and opposed at the field strength (fat-water shift 3.4 ppm);
- dynamic phases: the T1 gradient-echo sets that share an in-plane geometry, ordered by acquisition time, the
  pre-contrast one before the injection (ContrastBolusAgent / ContrastBolusStartTime), arterial, portal-venous and
  delayed by their delay after the injection (or, without an injection time, by their order);
- names: each selection of the site's rules file (SDK series-selector format) that matches adds its ``weight``
  (default :data:`NAME_WEIGHT`): names are one piece of evidence, a site can make its own rules decisive with a
  large weight;
- an explicit SeriesInstanceUID -> phase map (site override) adds :data:`OVERRIDE_WEIGHT`.

The phases are then assigned so that the total evidence is largest (each image set serves one phase at most), and
every problem (a phase with no evidence, a tie, a missing or duplicated slice in a chosen set) is collected, so
that a user sees all of them at once.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from .multiframe import frames_of

__all__ = [
    "DYNAMIC_PHASES",
    "FILE_PROBLEMS",
    "MIN_SCORE",
    "MIN_SLICES",
    "NAME_WEIGHT",
    "OVERRIDE_WEIGHT",
    "Evidence",
    "ImageSet",
    "PhaseIdentification",
    "b_value",
    "identify_phases",
    "image_sets_of_series",
    "slice_problems",
]

logger = logging.getLogger(__name__)

#: The contrast-enhanced T1 phases, in acquisition order.
DYNAMIC_PHASES: tuple[str, ...] = ("C-pre", "C+A", "C+V", "C+Delay")
#: An image set with fewer slices is a localizer or a single-slice image, never a phase.
MIN_SLICES = 5
#: Evidence added by a matching name rule (unless the rule sets its own ``weight``).
NAME_WEIGHT = 2.0
#: Least total evidence that decides a phase: a name alone, or sharing the dynamic series' geometry alone, is not
#: enough (a wrong image in a channel gives a confident, wrong classification; an error can be fixed by the site).
MIN_SCORE = 3.0
#: Evidence added by an explicit SeriesInstanceUID -> phase entry.
OVERRIDE_WEIGHT = 100.0
#: Attribute of a loaded ``DICOMSeries`` listing what is wrong with its files (damaged files left out, pixels no
#: installed decoder reads), in words: a problem when the series serves a phase (the study loader sets it).
FILE_PROBLEMS = "lcadb_file_problems"

_MR_STORAGE = {"1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.4"}
_GYROMAGNETIC_MHZ_PER_T = 42.577478
_FAT_WATER_PPM = 3.4
# dynamic windows: seconds after the injection (typical liver protocols: late arterial 30-40 s, portal venous
# 60-80 s, delayed/transitional 3-5 min); the centre is preferred, the range is accepted
_DELAY_WINDOWS = {"C+A": (35.0, 5.0, 60.0), "C+V": (75.0, 45.0, 150.0), "C+Delay": (180.0, 110.0, 900.0)}
_ASSUMED_ARTERIAL_DELAY_S = 35.0
# Contrast/Bolus Agent Phase (0018,9344) of the Enhanced MR Contrast/Bolus Usage macro (PS3.3 C.7.6.16.2.12)
_AGENT_PHASES = {
    "PRE_CONTRAST": "C-pre",
    "ARTERIAL": "C+A",
    "PORTAL_VENOUS": "C+V",
    "VENOUS": "C+V",
    "DELAYED": "C+Delay",
}

_MAP_TOKENS = {"ADC", "EADC", "FA", "EXP", "TRACE_ADC", "CALC_BVALUE", "T1_MAP", "T2_MAP", "FF", "R2STAR", "T2STAR_MAP"}
_SUBTRACTION_TOKENS = {"SUB", "SUBTRACT", "SUBTRACTION"}
_PROJECTION_TOKENS = {"MIP", "MNIP", "MAXIMUM", "MINIMUM", "PROJECTION IMAGE", "MPR", "REFORMATTED", "CPR", "COLLAPSE"}
_IN_TOKENS = {"IN_PHASE", "IP", "INPHASE", "IN-PHASE"}
_OPP_TOKENS = {"OPP_PHASE", "OUT_PHASE", "OP", "OPPOSED_PHASE", "OUTPHASE", "OUT-PHASE"}
_WATER_TOKENS = {"WATER", "W"}
_FAT_TOKENS = {"FAT", "F"}
_DIFFUSION_TOKENS = {"DIFFUSION", "TRACEW", "TRACE", "DWI"}

# private b-value elements: (group, private creator, element offset, how to read the value), per manufacturer;
# sources in deploy_app/README.md ("Vendor conventions")
_PRIVATE_B_VALUES = {
    "SIEMENS": (0x0019, ("SIEMENS MR HEADER",), 0x0C),
    "GE": (0x0043, ("GEMS_PARM_01",), 0x39),
    "PHILIPS": (0x2001, ("Philips Imaging DD 001",), 0x03),
    "UIH": (0x0065, ("Image Private Header",), 0x09),
}


@dataclass(frozen=True)
class Evidence:
    """One piece of evidence: ``weight`` for ``phase`` (negative against it), with the reason in words."""

    phase: str
    weight: float
    reason: str


@dataclass
class ImageSet:
    """One volume of a study: a whole series or a part of one (see the module docstring).

    Attributes:
        series: the SDK ``DICOMSeries`` it comes from.
        datasets: its instances.
        part: what sets it apart within its series ("" for a whole series), e.g. ``"temporal position 2"``.
        excluded: why it can serve no phase ("" when it can).
        notes: attribute facts shown with the evidence (echo time, b-value, acquisition time ...).
        evidence: everything collected for or against each phase.
    """

    series: object
    datasets: list[Dataset]
    part: str = ""
    excluded: str = ""
    notes: list[str] = field(default_factory=list)
    evidence: list[Evidence] = field(default_factory=list)

    @property
    def first(self) -> Dataset:
        return self.datasets[0]

    @property
    def series_instance_uid(self) -> str:
        return str(self.first.get("SeriesInstanceUID", ""))

    @property
    def label(self) -> str:
        number = self.first.get("SeriesNumber", "?")
        text = f"series {number} {str(self.first.get('SeriesDescription', ''))!r}"
        return f"{text} [{self.part}]" if self.part else text

    def score(self, phase: str) -> float:
        return float(sum(e.weight for e in self.evidence if e.phase == phase))

    def reasons(self, phase: str) -> list[str]:
        return [f"{e.reason} ({e.weight:+g})" for e in self.evidence if e.phase == phase]

    def add(self, phase: str, weight: float, reason: str) -> None:
        self.evidence.append(Evidence(phase, float(weight), reason))


@dataclass
class PhaseIdentification:
    """The outcome of :func:`identify_phases`.

    Attributes:
        phases: the phases asked for, in network channel order.
        image_sets: every image set of the study (excluded ones included), in series order.
        chosen: phase -> the image set serving it (only phases that could be decided).
        problems: every reason the study cannot be used, in words (empty when it can).
    """

    phases: tuple[str, ...]
    image_sets: list[ImageSet]
    chosen: dict[str, ImageSet]
    problems: list[str]

    def phase_of(self, image_set: ImageSet) -> str | None:
        return next((p for p, s in self.chosen.items() if s is image_set), None)

    def runner_up(self, phase: str) -> tuple[ImageSet, float] | None:
        """The best other image set for ``phase`` with positive evidence, and its score."""
        chosen = self.chosen.get(phase)
        others = [(s, s.score(phase)) for s in self.image_sets if s is not chosen and not s.excluded]
        others = [(s, v) for s, v in others if v > 0]
        return max(others, key=lambda item: item[1]) if others else None

    def report(self) -> list[str]:
        """Human-readable lines: one block per image set (phase, evidence, runner-up), then one line per phase."""
        lines = []
        for s in self.image_sets:
            phase = self.phase_of(s)
            head = f"{s.label} ({len(s.datasets)} images)"
            if s.excluded:
                lines.append(f"{head}: not a phase - {s.excluded}")
                continue
            ranked = sorted(((s.score(p), p) for p in self.phases), reverse=True)
            ranked = [(v, p) for v, p in ranked if v > 0]
            notes = f" [{'; '.join(s.notes)}]" if s.notes else ""
            if phase is None:
                lines.append(f"{head}: not used{notes}")
            else:
                lines.append(f"{head}: {phase} (score {s.score(phase):g}){notes}")
                lines.extend(f"    evidence: {r}" for r in s.reasons(phase))
            second = [(v, p) for v, p in ranked if p != phase]
            if second:
                v, p = second[0]
                lines.append(f"    runner-up phase: {p} (score {v:g}: {'; '.join(s.reasons(p))})")
        for phase in self.phases:
            chosen = self.chosen.get(phase)
            runner = self.runner_up(phase)
            other = f"; runner-up {runner[0].label} (score {runner[1]:g})" if runner else ""
            served = f"{chosen.label} (score {chosen.score(phase):g})" if chosen else "NOT FOUND"
            lines.append(f"phase {phase!r} <- {served}{other}")
        return lines


# ------------------------------------------------------------------------------------------- attributes
def _tokens(ds: Dataset) -> set[str]:
    values = ds.get("ImageType", [])
    values = [values] if isinstance(values, str) else list(values)
    return {str(v).strip().upper() for v in values if str(v).strip()}


def _first(value):
    """The first value of a possibly multi-valued element (pydicom MultiValue, list, backslash-joined bytes)."""
    if isinstance(value, bytes):
        value = value.decode("latin-1").strip("\0 ").split("\\")
    if isinstance(value, (list, tuple, MultiValue)):
        return value[0] if len(value) else None
    return value


def _float(ds: Dataset, keyword: str) -> float | None:
    value = _first(ds.get(keyword))
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _manufacturer_key(ds: Dataset) -> str:
    name = str(ds.get("Manufacturer", "")).upper()
    for key, prefix in (
        ("SIEMENS", "SI"),
        ("GE", "GE"),
        ("PHILIPS", "PH"),
        ("UIH", "UI"),
        ("CANON", "CA"),
        ("CANON", "TO"),
    ):
        if name.startswith(prefix):
            return key
    return ""


def _private_value(ds: Dataset, group: int, creators: Sequence[str], offset: int):
    for block in range(0x10, 0x100):
        creator = ds.get((group, block))
        if creator is not None and str(creator.value).strip() in creators:
            element = ds.get((group, (block << 8) | offset))
            return None if element is None else element.value
    return None


def b_value(ds: Dataset) -> float | None:
    """The diffusion b-value (s/mm2) of one instance, or None when it states none.

    Read, in order, from DiffusionBValue (0018,9087), the manufacturer's private element (Siemens (0019,xx0C),
    GE (0043,xx39) first value modulo 10^9, Philips (2001,xx03), United Imaging (0065,xx09)), a Siemens sequence
    name ``*ep_b<value>``, or a Canon ``b=<value>`` image comment.
    """
    value = _float(ds, "DiffusionBValue")
    if value is not None:
        return value
    vendor = _manufacturer_key(ds)
    if vendor in _PRIVATE_B_VALUES:
        group, creators, offset = _PRIVATE_B_VALUES[vendor]
        raw = _private_value(ds, group, creators, offset)
        if raw is not None:
            try:
                number = float(_first(raw))
            except (TypeError, ValueError):
                number = None
            if number is not None:
                return float(number % 1e9) if vendor == "GE" else number
    match = re.search(r"ep_b(\d+)", str(ds.get("SequenceName", "")))
    if match:
        return float(match.group(1))
    match = re.search(r"(?<![a-z])b\s*=\s*(\d+)", str(ds.get("ImageComments", "")), re.IGNORECASE)
    if match:
        return float(match.group(1))
    return None


def _acquisition_datetime(ds: Dataset) -> dt.datetime | None:
    text = str(ds.get("AcquisitionDateTime", "") or "")
    if not text:
        date = str(ds.get("AcquisitionDate", "") or ds.get("SeriesDate", "") or ds.get("StudyDate", "") or "")
        time = str(ds.get("AcquisitionTime", "") or ds.get("SeriesTime", "") or ds.get("ContentTime", "") or "")
        if not date or not time:
            return None
        text = date + time
    return _parse_datetime(text)


def _parse_datetime(text: str) -> dt.datetime | None:
    text = text.strip().split("+")[0].split("-")[0]
    main, _, fraction = text.partition(".")
    for fmt in ("%Y%m%d%H%M%S", "%Y%m%d%H%M", "%Y%m%d%H"):
        try:
            value = dt.datetime.strptime(main, fmt)
        except ValueError:
            continue
        return value + dt.timedelta(seconds=float(f"0.{fraction}") if fraction.isdigit() else 0.0)
    return None


def _injection_datetime(ds: Dataset) -> dt.datetime | None:
    time = str(ds.get("ContrastBolusStartTime", "") or "")
    date = str(ds.get("AcquisitionDate", "") or ds.get("SeriesDate", "") or ds.get("StudyDate", "") or "")
    return _parse_datetime(date + time) if time and date else None


def _field_strength(ds: Dataset) -> float | None:
    value = _float(ds, "MagneticFieldStrength")
    if value and value > 0:
        return value / 10000.0 if value > 100 else value  # some scanners write gauss
    frequency = _float(ds, "ImagingFrequency")
    return frequency / _GYROMAGNETIC_MHZ_PER_T if frequency else None


def _normal(ds: Dataset) -> np.ndarray | None:
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None
    iop = np.asarray(iop, dtype=float)
    return np.cross(iop[:3], iop[3:])


def _plane_key(ds: Dataset) -> tuple:
    iop = tuple(round(float(v), 2) for v in ds.get("ImageOrientationPatient", []) or [])
    spacing = tuple(round(float(v), 2) for v in ds.get("PixelSpacing", []) or [])
    return iop, int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0), spacing


def _position_key(ds: Dataset) -> tuple | None:
    ipp = ds.get("ImagePositionPatient")
    return None if ipp is None else tuple(round(float(v), 3) for v in ipp)


# ----------------------------------------------------------------------------------- splitting series
def _dixon_kind(tokens: set[str]) -> str:
    if tokens & _IN_TOKENS:
        return "in-phase"
    if tokens & _OPP_TOKENS:
        return "opposed-phase"
    if tokens & _WATER_TOKENS:
        return "water"
    if tokens & _FAT_TOKENS:
        return "fat"
    return ""


def image_sets_of_series(series, datasets: list[Dataset] | None = None) -> list[ImageSet]:
    """Split one series into image sets (one volume each).

    The images are the series' single-frame instances and the frames of its Enhanced / Legacy Converted Enhanced
    MR instances (:func:`deploy_app.multiframe.frames_of`). They are told apart by what varies within the series:
    the ImageType or FrameType (e.g. IN_PHASE / OPP_PHASE / WATER / FAT, TRACEW / ADC), the echo time, the b-value,
    the TemporalPositionIdentifier (TemporalPositionIndex) or TriggerTime, the stack (StackID); when images still
    share a slice position, by their acquisition time (a dynamic series without temporal identifiers).
    """
    if datasets is None:
        datasets = [frame for i in series.get_sop_instances() for frame in frames_of(i.get_native_sop_instance())]
    datasets = list(datasets)
    if not datasets:
        return []

    def describe(name: str, value) -> str:
        return {
            "image type": lambda v: "\\".join(v),
            "echo time": lambda v: f"TE {v:g} ms",
            "b-value": lambda v: f"b={v:g}",
            "temporal position": lambda v: f"temporal position {v:g}",
            "trigger time": lambda v: f"trigger time {v:g} ms",
            "stack": lambda v: f"stack {v}",
        }[name](value)

    keys = {
        "image type": lambda ds: tuple(str(v).upper() for v in ds.get("ImageType", []) or []),
        "echo time": lambda ds: round(_float(ds, "EchoTime") or 0.0, 2),
        "b-value": lambda ds: round(b_value(ds) or 0.0, 0),
        "temporal position": lambda ds: _float(ds, "TemporalPositionIdentifier") or 0.0,
        "trigger time": lambda ds: round(_float(ds, "TriggerTime") or 0.0, 1),
        "stack": lambda ds: str(ds.get("StackID", "") or ""),
    }
    varying = [name for name, key in keys.items() if len({key(ds) for ds in datasets}) > 1]
    if "temporal position" in varying and "trigger time" in varying:
        varying.remove("trigger time")
    groups: dict[tuple, list[Dataset]] = {}
    for ds in datasets:
        groups.setdefault(tuple(keys[name](ds) for name in varying), []).append(ds)
    sets = []
    for values, members in groups.items():
        part = ", ".join(describe(name, value) for name, value in zip(varying, values))
        for index, subset in enumerate(_split_by_acquisition_time(members), start=1):
            label = part
            if len(subset) != len(members):
                when = _acquisition_datetime(subset[0])
                label = ", ".join(
                    x for x in (part, f"acquisition {index}" + (f" at {when:%H:%M:%S}" if when else "")) if x
                )
            sets.append(ImageSet(series, subset, label))
    if len(sets) == 1:
        sets[0].part = ""
    return sets


def _split_by_acquisition_time(datasets: list[Dataset]) -> list[list[Dataset]]:
    """Split instances that repeat slice positions into volumes by their acquisition time (rank at each position);
    left whole when no position repeats or the times do not tell the repeats apart (a duplicate, reported later)."""
    by_position: dict[tuple | None, list[Dataset]] = {}
    for ds in datasets:
        by_position.setdefault(_position_key(ds), []).append(ds)
    repeats = max(len(v) for v in by_position.values())
    if repeats == 1 or None in by_position:
        return [datasets]
    volumes: list[list[Dataset]] = [[] for _ in range(repeats)]
    for members in by_position.values():
        times = [_acquisition_datetime(ds) for ds in members]
        if any(t is None for t in times) or len(set(times)) != len(times):
            return [datasets]
        for rank, ds in enumerate(sorted(members, key=_acquisition_datetime)):
            volumes[rank].append(ds)
    return [v for v in volumes if v]


# ------------------------------------------------------------------------------------------- evidence
def _exclusion(s: ImageSet) -> str:
    ds = s.first
    tokens = set().union(*(_tokens(d) for d in s.datasets))
    if str(ds.get("Modality", "")) != "MR" or str(ds.get("SOPClassUID", "")) not in _MR_STORAGE:
        return f"not an MR image (Modality {ds.get('Modality', '?')}, SOP class {ds.get('SOPClassUID', '?')})"
    if "LOCALIZER" in tokens:
        return "ImageType LOCALIZER"
    plane = _private_value(ds, 0x0019, ("GEMS_ACQU_01",), 0x17)
    if plane is not None and str(plane).strip() == "256":
        return "GE SeriesPlane (0019,xx17) = 3-plane localizer"
    if "AAHScout" in str(ds.get("SeriesDescription", "")) or str(ds.get("SequenceName", "")).endswith("fl2d1"):
        return "Siemens localizer (AAHScout / fl2d1 sequence)"
    orientations = {tuple(round(float(v), 2) for v in d.get("ImageOrientationPatient", []) or []) for d in s.datasets}
    if len(orientations) > 1:
        return f"{len(orientations)} orientations in one image set (a multi-plane localizer)"
    if tokens & _MAP_TOKENS:
        return f"calculated map (ImageType {sorted(tokens & _MAP_TOKENS)})"
    if tokens & _SUBTRACTION_TOKENS:
        return "subtraction (ImageType SUBTRACTION)"
    if tokens & _PROJECTION_TOKENS:
        return f"projection or reformat (ImageType {sorted(tokens & _PROJECTION_TOKENS)})"
    kind = _dixon_kind(tokens)
    if kind in ("water", "fat"):
        return f"Dixon {kind} image (ImageType)"
    if len(s.datasets) < MIN_SLICES:
        return f"{len(s.datasets)} slices (fewer than {MIN_SLICES}: a localizer or a single image)"
    return ""


@dataclass
class _Facts:
    te: float | None
    tr: float | None
    gradient_echo: bool
    t1_gre: bool
    t2: bool
    b: float | None
    diffusion: bool
    dixon: str
    fat_sat: bool
    contrast: bool
    agent_phase: str
    injection: dt.datetime | None
    time: dt.datetime | None
    field: float | None
    plane: tuple
    normal: np.ndarray | None


def _sequence_kinds(ds: Dataset) -> set[str]:
    """ScanningSequence values (SE, GR, EP, ...); for an Enhanced MR image, which has none, the same read from its
    MR Pulse Sequence module (PS3.3 C.8.13.4): EchoPulseSequence SPIN / GRADIENT / BOTH, EchoPlanarPulseSequence."""
    value = ds.get("ScanningSequence")
    if value:
        return {str(v).upper() for v in ([value] if isinstance(value, str) else value)}
    pulse = str(ds.get("EchoPulseSequence", "")).upper()
    kinds = {"SE"} if pulse in ("SPIN", "BOTH") else set()
    kinds |= {"GR"} if pulse in ("GRADIENT", "BOTH") else set()
    return kinds | ({"EP"} if str(ds.get("EchoPlanarPulseSequence", "")).upper() == "YES" else set())


def _facts(s: ImageSet) -> _Facts:
    ds = s.first
    tokens = set().union(*(_tokens(d) for d in s.datasets))
    te, tr = _float(ds, "EchoTime"), _float(ds, "RepetitionTime")
    sequence = _sequence_kinds(ds)
    b_values = [b for b in (b_value(d) for d in s.datasets) if b is not None]
    b = max(b_values) if b_values else None
    diffusion = (
        bool(tokens & _DIFFUSION_TOKENS)
        or str(ds.get("AcquisitionContrast", "")).upper() == "DIFFUSION"
        or (b is not None and b > 0)
        or ("EP" in sequence and "ep_b" in str(ds.get("SequenceName", "")))
    )
    gradient_echo = "GR" in sequence and "SE" not in sequence
    t1_gre = not diffusion and te is not None and te < 10 and tr is not None and 0 < tr < 50
    t2 = (
        not diffusion
        and not gradient_echo
        and "EP" not in sequence
        and te is not None
        and te >= 60
        and (tr is None or tr == 0 or tr >= 800)
    )
    options = ds.get("ScanOptions", "")
    options = {str(v).upper() for v in ([options] if isinstance(options, str) else options)}
    suppression = str(ds.get("SpectrallySelectedSuppression", "")).upper()  # Enhanced MR, C.8.13.4
    fat_sat = bool(options & {"FS", "SFS", "FAT_SAT", "SPAIR", "SPIR", "CHEMSAT"}) or "FAT" in suppression
    times = [t for t in (_acquisition_datetime(d) for d in s.datasets) if t is not None]
    return _Facts(
        te=te,
        tr=tr,
        gradient_echo=gradient_echo,
        t1_gre=t1_gre,
        t2=t2,
        b=b,
        diffusion=diffusion,
        dixon=_dixon_kind(tokens),
        fat_sat=fat_sat,
        contrast=bool(str(ds.get("ContrastBolusAgent", "") or "").strip()),
        agent_phase=str(ds.get("ContrastBolusAgentPhase", "") or "").upper(),
        injection=_injection_datetime(ds),
        time=min(times) if times else None,
        field=_field_strength(ds),
        plane=_plane_key(ds),
        normal=_normal(ds),
    )


def _echo_phase(te_ms: float, field_t: float) -> float:
    """Fat-water phase of an echo time in cycles, modulo 1 (0 in phase, 0.5 opposed)."""
    return (te_ms * 1e-3 * _FAT_WATER_PPM * 1e-6 * _GYROMAGNETIC_MHZ_PER_T * 1e6 * field_t) % 1.0


def _echo_kind(te_ms: float | None, field_t: float | None) -> str:
    if te_ms is None or not field_t:
        return ""
    phase = _echo_phase(te_ms, field_t)
    if min(phase, 1 - phase) < 0.15:
        return "in-phase"
    if abs(phase - 0.5) < 0.15:
        return "opposed-phase"
    return ""


def _same_acquisition(a: tuple[ImageSet, _Facts], b: tuple[ImageSet, _Facts]) -> bool:
    if a[0].series is b[0].series:
        return True
    if a[1].plane != b[1].plane or a[1].time is None or b[1].time is None:
        return False
    return abs((a[1].time - b[1].time).total_seconds()) <= 60


def _add_dixon_evidence(candidates: list[tuple[ImageSet, _Facts]]) -> set[int]:
    """In/Out Phase evidence; returns the ids of the image sets that are in/opposed-phase echoes."""
    members: set[int] = set()
    for s, f in candidates:
        if f.dixon == "in-phase":
            s.add("In Phase", 6, "ImageType says in-phase")
            members.add(id(s))
        elif f.dixon == "opposed-phase":
            s.add("Out Phase", 6, "ImageType says opposed-phase")
            members.add(id(s))
    gre = [(s, f) for s, f in candidates if f.t1_gre and not f.dixon]
    for i, a in enumerate(gre):
        for b in gre[i + 1 :]:
            if a[1].te == b[1].te or not _same_acquisition(a, b):
                continue
            field = a[1].field or b[1].field
            kinds = {_echo_kind(a[1].te, field): a, _echo_kind(b[1].te, field): b}
            if set(kinds) != {"in-phase", "opposed-phase"}:
                continue
            for kind, (s, f) in kinds.items():
                phase = "In Phase" if kind == "in-phase" else "Out Phase"
                other = kinds["opposed-phase" if kind == "in-phase" else "in-phase"][1]
                s.add(phase, 5, f"dual echo: TE {f.te:g} ms is {kind} at {field:g} T (other echo TE {other.te:g} ms)")
                members.add(id(s))
    return members


def _add_dynamic_evidence(candidates: list[tuple[ImageSet, _Facts]]) -> list[tuple[ImageSet, _Facts]]:
    """Dynamic-phase evidence; returns the dynamic group's core: the largest set of T1 gradient-echo image sets
    sharing one plane and matrix (time order).

    A T1 gradient-echo set on its own grid (other matrix, field of view, slice thickness or orientation: a delayed
    phase acquired separately) takes part in the timing too, but wherever a set of the core fits a phase's window
    equally, the core's is preferred."""
    groups: dict[tuple, list[tuple[ImageSet, _Facts]]] = {}
    for s, f in candidates:
        groups.setdefault(f.plane, []).append((s, f))
    if not groups:
        return []
    core = max(groups.values(), key=len)
    if len(core) < 2:
        return []
    in_core = {id(s) for s, _ in core}
    group = sorted(
        candidates, key=lambda item: (item[1].time or dt.datetime.max, str(item[0].first.get("SeriesNumber", "")))
    )
    core.sort(key=lambda item: (item[1].time or dt.datetime.max, str(item[0].first.get("SeriesNumber", ""))))
    for s, _ in group:
        for phase in DYNAMIC_PHASES:
            if id(s) in in_core:
                s.add(phase, 2, f"T1 gradient echo sharing its plane and matrix with {len(core) - 1} other set(s)")
            else:
                s.add(phase, 1, "T1 gradient echo on its own grid (plane, matrix or pixel spacing of its own)")

    injection = next((f.injection for _, f in group if f.injection is not None), None)
    any_contrast = any(f.contrast for _, f in group)
    all_contrast = all(f.contrast for _, f in group)
    slots = _time_slots(group)  # acquisitions at the same time are indistinguishable by timing

    def is_post(slot: list[tuple[ImageSet, _Facts]]) -> bool:
        f = slot[0][1]
        if injection is not None and f.time is not None:
            return f.time >= injection
        return f.contrast

    def off_grid(slot: list[tuple[ImageSet, _Facts]]) -> bool:
        return all(id(s) not in in_core for s, _ in slot)

    if injection is None and (not any_contrast or (all_contrast and len(slots) >= 4)):
        # no injection time, and contrast attributes that cannot tell: the first acquisition is the mask
        pre, post = slots[:1], slots[1:]
        pre_reason = "first of the dynamic acquisitions in time (no injection time in the study)"
    else:
        pre = [slot for slot in slots if not is_post(slot)]
        post = [slot for slot in slots if is_post(slot)]
        pre_reason = (
            "acquired before the injection (ContrastBolusStartTime)"
            if injection is not None
            else "no ContrastBolusAgent, unlike the later dynamic acquisitions"
        )
    if pre:
        mask = [slot for slot in pre if not off_grid(slot)] or pre
        for s, _ in mask[-1]:
            s.add("C-pre", 5, pre_reason)
    if not post:
        return core
    if injection is None:
        start = post[0][0][1].time
        estimated = start - dt.timedelta(seconds=_ASSUMED_ARTERIAL_DELAY_S) if start else None
    else:
        estimated = injection
    timed = all(slot[0][1].time is not None for slot in post)
    if estimated is not None and timed and (injection is not None or len(post) > 3):
        how = "after the injection" if injection is not None else "after the estimated injection"
        taken: set[int] = set()
        for phase, (centre, low, high) in _DELAY_WINDOWS.items():
            delays = {id(slot): (slot[0][1].time - estimated).total_seconds() for slot in post}
            inside = [slot for slot in post if id(slot) not in taken and low <= delays[id(slot)] <= high]
            if not inside:
                continue
            best = min(inside, key=lambda slot: (off_grid(slot), abs(delays[id(slot)] - centre)))
            taken.add(id(best))
            for s, _ in best:
                s.add(phase, 5, f"acquired {delays[id(best)]:.0f} s {how} (window {low:g}-{high:g} s)")
    else:
        for phase, slot in zip(DYNAMIC_PHASES[1:], post):
            for s, _ in slot:
                s.add(phase, 5, f"post-contrast dynamic number {DYNAMIC_PHASES.index(phase)} in time order")
    return core


def _time_slots(group: list[tuple[ImageSet, _Facts]], tolerance_s: float = 2.0) -> list[list[tuple[ImageSet, _Facts]]]:
    """The group (in time order) cut into acquisitions at the same time; sets without a time stay alone."""
    slots: list[list[tuple[ImageSet, _Facts]]] = []
    for item in group:
        time = item[1].time
        last = slots[-1][0][1].time if slots else None
        if time is not None and last is not None and abs((time - last).total_seconds()) <= tolerance_s:
            slots[-1].append(item)
        else:
            slots.append([item])
    return slots


def _add_other_evidence(candidates: list[tuple[ImageSet, _Facts]], reference_normal: np.ndarray | None) -> None:
    for s, f in candidates:
        phase = _AGENT_PHASES.get(f.agent_phase)
        if phase and f.t1_gre:
            s.add(phase, 4, f"ContrastBolusAgentPhase {f.agent_phase} (Contrast/Bolus Usage functional group)")
    diffusion = [(s, f) for s, f in candidates if f.diffusion]
    highest = max((f.b or 0.0 for _, f in diffusion), default=0.0)
    for s, f in diffusion:
        s.add("DWI", 5, "diffusion-weighted (ImageType, b-value or EPI diffusion sequence)")
        if f.b is not None and f.b > 0 and f.b == highest:
            s.add("DWI", 2, f"highest b-value of the study (b={f.b:g})")
        elif f.b is not None and f.b < 100:
            s.add("DWI", -2, f"low b-value (b={f.b:g})")
    for s, f in candidates:
        if f.t2:
            s.add("T2WI", 5, f"T2-weighted (TE {f.te:g} ms, TR {f.tr:g} ms, not gradient echo)")
            if f.fat_sat:
                s.add("T2WI", 0.5, "fat suppressed")
            if reference_normal is not None and f.normal is not None:
                if abs(float(np.dot(reference_normal, f.normal))) > np.cos(np.radians(30)):
                    s.add("T2WI", 1, "in the plane of the dynamic series")
        tokens = _tokens(s.first)
        if "DERIVED" in tokens:
            for phase in ("T2WI", "DWI", "In Phase", "Out Phase", *DYNAMIC_PHASES):
                s.add(phase, -1, "DERIVED image (an original acquisition is preferred)")


def _rule_matches(conditions: Mapping[str, object], ds: Dataset) -> bool:
    for keyword, wanted in conditions.items():
        value = ds.get(keyword)
        if value is None:
            return False
        if isinstance(wanted, (int, float)) and not isinstance(wanted, bool):
            try:
                if float(value) != float(wanted):
                    return False
            except (TypeError, ValueError):
                return False
            continue
        values = [value] if isinstance(value, (str, int, float)) else list(value)
        text = "\\".join(str(v) for v in values)
        patterns = wanted if isinstance(wanted, list) else [wanted]
        if not all(re.search(str(p), text, re.IGNORECASE) for p in patterns):
            return False
        logger.debug("rule condition %s=%r matched %r", keyword, wanted, text)
    return True


def _add_name_evidence(sets: Iterable[ImageSet], rules: Mapping | None) -> None:
    if not rules:
        return
    for selection in rules.get("selections", []):
        phase = str(selection.get("name", ""))
        weight = float(selection.get("weight", NAME_WEIGHT))
        conditions = selection.get("conditions", {})
        for s in sets:
            if _rule_matches(conditions, s.first):
                shown = ", ".join(f"{k}={str(s.first.get(k, ''))!r}" for k in conditions if k != "Modality")
                s.add(phase, weight, f"name rule of the rules file matches {shown or 'its conditions'}")


# ------------------------------------------------------------------------------------------ the decision
def slice_problems(datasets: Sequence[Dataset], label: str) -> list[str]:
    """Missing or duplicated slices of one image set (positions along its slice normal), in words."""
    normal = _normal(datasets[0]) if datasets else None
    if normal is None or any(ds.get("ImagePositionPatient") is None for ds in datasets):
        return [f"{label}: images without ImagePositionPatient/ImageOrientationPatient, slice order unknown"]
    if len(datasets) < 2:
        return [f"{label}: {len(datasets)} image, a volume needs at least 2"]
    located = sorted(
        ((float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))), ds) for ds in datasets),
        key=lambda item: item[0],
    )
    positions = np.array([p for p, _ in located])
    steps = np.diff(positions)
    duplicates = [
        f"at {positions[k]:.2f} mm (instances {located[k][1].get('InstanceNumber', '?')} and "
        f"{located[k + 1][1].get('InstanceNumber', '?')})"
        for k in np.nonzero(steps < 1e-3)[0]
    ]
    gaps = []
    distinct = steps[steps >= 1e-3]
    spacing = float(np.median(distinct)) if distinct.size else 0.0
    for k in np.nonzero(steps > 1.5 * spacing)[0] if distinct.size else []:
        gaps.append(
            f"{int(round(steps[k] / spacing)) - 1} between {positions[k]:.2f} and {positions[k + 1]:.2f} mm "
            f"(instances {located[k][1].get('InstanceNumber', '?')} and {located[k + 1][1].get('InstanceNumber', '?')})"
        )

    def summary(items: list[str]) -> str:
        return "; ".join(items[:3]) + (f"; and {len(items) - 3} more" if len(items) > 3 else "")

    problems = []
    if duplicates:
        problems.append(f"{label}: {len(duplicates)} duplicated slice position(s): {summary(duplicates)}")
    if gaps:
        problems.append(f"{label}: missing slice(s), spacing {spacing:.2f} mm: {summary(gaps)}")
    return problems


def identify_phases(
    series_list: Sequence,
    phases: Sequence[str],
    rules: Mapping | None = None,
    series_phases: Mapping[str, str] | None = None,
) -> PhaseIdentification:
    """Decide which image set of a study serves each phase (see the module docstring).

    Args:
        series_list: the study's SDK ``DICOMSeries`` (``DICOMStudy.get_all_series()``).
        phases: phase names in network channel order (the bundle's ``PHASES``).
        rules: the site's name rules (SDK series-selector JSON, see ``phase_rules.json``); None = no name evidence.
        series_phases: explicit SeriesInstanceUID -> phase overrides.

    Returns:
        A :class:`PhaseIdentification`; its ``problems`` list every reason the study cannot be used.
    """
    from scipy.optimize import linear_sum_assignment

    phases = tuple(phases)
    unknown = sorted({p for p in (series_phases or {}).values() if p not in phases})
    problems = [f"the series -> phase map names unknown phases {unknown}; phases are {list(phases)}"] if unknown else []
    sets = [s for series in series_list for s in image_sets_of_series(series)]
    sets.sort(key=lambda s: (_float(s.first, "SeriesNumber") or 0.0, s.part))
    for s in sets:
        s.excluded = _exclusion(s)
    usable = [(s, _facts(s)) for s in sets if not s.excluded]
    # the b=0 volume of a diffusion series often states no b-value (Canon) or b=0 with plain ImageType (Philips)
    diffusion_series = {id(s.series) for s, f in usable if f.diffusion}
    for s, f in usable:
        if not f.diffusion and id(s.series) in diffusion_series and (f.b is None or f.b < 100):
            f.diffusion, f.t2, f.b = True, False, f.b or 0.0
    for s, f in usable:
        s.notes = [
            text
            for text in (
                f"TE {f.te:g} ms" if f.te is not None else "",
                f"TR {f.tr:g} ms" if f.tr is not None else "",
                f"b={f.b:g}" if f.b is not None else "",
                f"acquired {f.time:%H:%M:%S}" if f.time else "",
                "contrast agent" if f.contrast else "",
            )
            if text
        ]
    dixon = _add_dixon_evidence(usable)
    dynamic = _add_dynamic_evidence([(s, f) for s, f in usable if f.t1_gre and id(s) not in dixon])
    reference_normal = dynamic[0][1].normal if dynamic else None  # the core of the dynamic group
    _add_other_evidence(usable, reference_normal)
    _add_name_evidence([s for s, _ in usable], rules)
    for s, _ in usable:
        phase = (series_phases or {}).get(s.series_instance_uid)
        if phase in phases:
            s.add(phase, OVERRIDE_WEIGHT, "site map SeriesInstanceUID -> phase")

    chosen: dict[str, ImageSet] = {}
    candidates = [s for s, _ in usable]
    if candidates:
        scores = np.array([[s.score(p) for s in candidates] for p in phases])
        rows, cols = linear_sum_assignment(-np.where(scores > 0, scores, -1e6))
        chosen = {phases[r]: candidates[c] for r, c in zip(rows, cols) if scores[r, c] >= MIN_SCORE}
    for phase in phases:
        if phase not in chosen:
            weak = sorted(((s.score(phase), s.label) for s in candidates if s.score(phase) > 0), reverse=True)
            best = f"best candidate {weak[0][1]} has only score {weak[0][0]:g} (< {MIN_SCORE:g}); " if weak else ""
            listed = [s.label for s, _ in usable]
            problems.append(
                f"phase {phase!r} not found: {best or 'no image set has evidence for it; '}usable image sets: "
                f"{listed}; excluded: {[f'{s.label}: {s.excluded}' for s in sets if s.excluded]}"
            )
            continue
        best = chosen[phase]
        assigned = {id(s) for s in chosen.values()}
        ties = [
            s
            for s in candidates
            if s is not best and id(s) not in assigned and abs(s.score(phase) - best.score(phase)) < 1e-9
        ]
        if ties:
            problems.append(
                f"phase {phase!r} is ambiguous: {[best.label, *(s.label for s in ties)]} have the same evidence "
                f"(score {best.score(phase):g}); give the site map (SeriesInstanceUID -> phase) or a stricter rule"
            )
    for phase, s in chosen.items():
        problems.extend(slice_problems(s.datasets, f"phase {phase!r} ({s.label})"))
    serving: dict[int, list[str]] = {}
    for phase, s in chosen.items():
        serving.setdefault(id(s.series), []).append(phase)
    for s in {id(s.series): s for s in chosen.values()}.values():
        for message in getattr(s.series, FILE_PROBLEMS, []):
            problems.append(f"phase(s) {serving[id(s.series)]} (series {s.first.get('SeriesNumber', '?')}): {message}")
    for s in chosen.values():
        logger.debug("evidence for %s: %s", s.label, s.evidence)
    return PhaseIdentification(phases, sets, chosen, problems)
