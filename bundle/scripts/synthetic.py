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
"""Synthetic 8-phase liver-lesion data: the embedded default dataset of the bundle, multi-site federated sets,
the LLD-MMRI released layout, and (through :mod:`.synthetic_dicom`) DICOM studies.

Every output is drawn from one phantom core (``_synth_phantom``): lesions of the 7 LLD-MMRI classes with the
per-phase enhancement patterns of issue 3, per-patient jitter, Rician noise, bias field, misregistration, partial
volume, atypical cases and site profiles. Everything is deterministic by ``seed`` (``numpy.random.Generator``
seeded per case, never the global generator).

Command line: ``python -m scripts.synthetic --help`` (or ``lcadb-synth``).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import _synth_phantom as core
from ._synth_io import CaseRecord, atomic_directory, stratified_folds, write_classification_index, write_nifti
from ._synth_phantom import SITE_PROFILES, SiteProfile, get_site
from .constants import LESION_CLASSES, PHASE_FILE_NAMES, PHASES, ROI_MARGIN
from .roi import box_from_mask, crop_lesion_roi, roi_slices

__all__ = [
    "DEFAULT_DATASET_NAME",
    "DEFAULT_DATASET_SPEC",
    "DEFAULT_EXTRA_TRAINING_CASES",
    "DEFAULT_PRESET",
    "PRESETS",
    "default_dataset_name",
    "SITE_PROFILES",
    "SiteProfile",
    "SynthOptions",
    "default_dataset",
    "DefaultDatasetPath",
    "generate_dataset",
    "generate_federated_datasets",
    "main",
    "render_case",
    "site_class_counts",
    "write_released_layout",
]

logger = logging.getLogger(__name__)

#: Folder name prefix of the embedded default dataset inside the cache folder (see :func:`default_dataset_name`).
DEFAULT_DATASET_NAME = "synthetic-v1"

#: Dataset presets (docs/data.md "Presets"): class counts and appearance knobs (:class:`SynthOptions` fields).
#: ``classic``: balanced, typical appearance, small spread (easy: a radiomics baseline reaches macro-F1 ~0.99).
#: ``realistic``: LLD-MMRI-like class imbalance, wide within-class spread, published look-alike patterns, sizes
#: 5-100 mm, breath-hold misregistration 5-20 mm, vessels and cirrhotic/fatty livers.
PRESETS: dict[str, dict] = {
    "classic": {"num_cases_per_class": 50, "options": {"size_range_mm": (8.0, 40.0)}},
    "realistic": {
        # hemangioma, ICC, abscess, metastasis, cyst, FNH, HCC: HCC about 3.4x FNH as in LLD-MMRI (157 vs 46)
        "num_cases_per_class": [49, 39, 35, 45, 49, 32, 101],
        "options": {
            "size_range_mm": (5.0, 100.0),
            "size_spread": 1.5,
            "atypical_fraction": 0.35,
            "atypical_variants": "realistic",
            "jitter": 0.3,
            "misregistration_mm": 20.0,
            "misregistration_min_mm": 5.0,
            "cirrhosis_probability": (0.1, 0.3, 0.05, 0.1, 0.05, 0.05, 0.75),
            "fatty_liver_probability": 0.2,
            "vessels": (0, 3),
        },
    },
}

#: Preset of the embedded default dataset (the main job's data).
DEFAULT_PRESET = "realistic"

#: Training cases the embedded default dataset adds to its preset's cases (``extra_training_cases`` of
#: :func:`generate_dataset`): the preset's 350 cases, test split included, stay as they are.
DEFAULT_EXTRA_TRAINING_CASES = 560


def _dataset_spec(preset: str, extra_training_cases: int = 0) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}.")
    if extra_training_cases < 0:
        raise ValueError(f"extra_training_cases must be >= 0, got {extra_training_cases}.")
    spec = {
        "preset": preset,
        "seed": 20240601,
        "site": ("site_a", "site_b", "site_c"),
        "test_fraction": 0.2,
        **PRESETS[preset],
    }
    if extra_training_cases:  # absent when 0, so that a preset's own dataset keeps its cache name
        spec["extra_training_cases"] = int(extra_training_cases)
    return spec


#: The embedded default dataset: the ``realistic`` preset (350 cases: 280 training cases in 5 folds, 70 test cases),
#: all sites, plus :data:`DEFAULT_EXTRA_TRAINING_CASES` training cases drawn the same way.
DEFAULT_DATASET_SPEC: dict = _dataset_spec(DEFAULT_PRESET, DEFAULT_EXTRA_TRAINING_CASES)

_SITE_INDEX = {name: i for i, name in enumerate(sorted(SITE_PROFILES))}


@dataclass(frozen=True)
class SynthOptions:
    """Appearance knobs of the generator (documented in docs/data.md).

    Args:
        atypical_fraction: fraction of lesions drawn with their class's atypical pattern; default 0.1.
        size_range_mm: clip range of the lesion diameter; default (5, 60).
        jitter: log-sd of the per-patient per-phase lesion level jitter; default 0.1.
        misregistration_mm: maximum inter-phase shift (mm); None = site default (1.5-2.5).
        noise_scale: multiplies the site's Rician noise; default 1.
        partial_volume: average sub-slices over the slice thickness; default True.
        atypical_variants: ``"classic"`` (one atypical pattern per class, ``ATYPICAL``) or ``"realistic"`` (2-3
            published look-alike patterns per class, ``REALISTIC_ATYPICAL``); default "classic".
        size_spread: multiplies the log-sd of the class size priors; default 1.
        misregistration_min_mm: smallest inter-phase shift (mm) when ``misregistration_mm`` is set; default 0.
        cirrhosis_probability: per class, probability that the liver is cirrhotic (coarse nodular texture, altered
            enhancement); default none.
        fatty_liver_probability: probability of a fatty liver (signal drop out of phase); default 0.
        vessels: (min, max) intrahepatic vessels drawn near the lesion; default (0, 0).
    """

    atypical_fraction: float = 0.1
    size_range_mm: tuple[float, float] = (5.0, 60.0)
    jitter: float = 0.1
    misregistration_mm: float | None = None
    noise_scale: float = 1.0
    partial_volume: bool = True
    atypical_variants: str = "classic"
    size_spread: float = 1.0
    misregistration_min_mm: float = 0.0
    cirrhosis_probability: tuple[float, ...] = ()
    fatty_liver_probability: float = 0.0
    vessels: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if not 0.0 <= self.atypical_fraction <= 1.0:
            raise ValueError(f"atypical_fraction must be in [0, 1], got {self.atypical_fraction}.")
        lo, hi = self.size_range_mm
        if not 0 < lo <= hi:
            raise ValueError(f"size_range_mm must satisfy 0 < min <= max, got {self.size_range_mm}.")
        if self.jitter < 0 or self.noise_scale < 0:
            raise ValueError(f"jitter and noise_scale must be >= 0, got {self.jitter} and {self.noise_scale}.")
        if self.misregistration_mm is not None and self.misregistration_mm < 0:
            raise ValueError(f"misregistration_mm must be >= 0 or None, got {self.misregistration_mm}.")
        if self.atypical_variants not in ("classic", "realistic"):
            raise ValueError(f"atypical_variants must be 'classic' or 'realistic', got {self.atypical_variants!r}.")
        if self.size_spread <= 0 or not 0 <= self.misregistration_min_mm:
            raise ValueError(
                f"size_spread must be > 0 and misregistration_min_mm >= 0, got {self.size_spread}, "
                f"{self.misregistration_min_mm}."
            )
        probabilities = (*self.cirrhosis_probability, self.fatty_liver_probability)
        if self.cirrhosis_probability and len(self.cirrhosis_probability) != len(LESION_CLASSES):
            raise ValueError(f"cirrhosis_probability needs one value per class, got {self.cirrhosis_probability}.")
        if not all(0.0 <= v <= 1.0 for v in probabilities):
            raise ValueError(f"liver disease probabilities must be in [0, 1], got {probabilities}.")
        if not 0 <= self.vessels[0] <= self.vessels[1]:
            raise ValueError(f"vessels must be (min, max) with 0 <= min <= max, got {self.vessels}.")

    def site(self, site: SiteProfile) -> SiteProfile:
        """The site profile with this noise scale applied."""
        if self.noise_scale == 1.0:
            return site
        from dataclasses import replace

        return replace(site, noise=site.noise * self.noise_scale)


def _tqdm(iterable, **kwargs):
    from monai.utils import optional_import

    tqdm, has_tqdm = optional_import("tqdm", name="tqdm")
    return tqdm(iterable, **kwargs) if has_tqdm else iterable


def _case_rng(seed: int, site: str, label: int, k: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SITE_INDEX.get(site, 99), int(label), int(k)])


# ------------------------------------------------------------------------------------------- one case
def render_case(
    rng: np.random.Generator, label: int, site: str | SiteProfile = "site_a", options: SynthOptions | None = None
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """Render the 8 lesion ROI crops of one case (one lesion, one patient).

    Each phase is sampled on a small window around the lesion at the site's resolution (DWI coarser), the lesion
    box is measured on that phase (misregistration included) and the ROI is cut with :func:`crop_lesion_roi`
    and the LLD-MMRI margins.

    Returns:
        ``({phase: (crop [X, Y, Z] float32, RAS affine 4x4)}, metadata dict)``.
    """
    options = options or SynthOptions()
    prof = options.site(get_site(site))
    phantom = core.sample_phantom(rng, prof)
    lesion = core.sample_lesion(
        rng,
        label,
        prof,
        size_range_mm=options.size_range_mm,
        atypical_fraction=options.atypical_fraction,
        jitter=options.jitter,
        atypical_variants=core.REALISTIC_ATYPICAL if options.atypical_variants == "realistic" else None,
        size_spread=options.size_spread,
    )
    extent = float(lesion.radii.max() * (1.0 + lesion.lobe_amp.sum()))
    lesion.centre = core.place_lesion_centre(rng, phantom, extent)
    phantom.lesions.append(lesion)
    mis = prof.misregistration_mm if options.misregistration_mm is None else options.misregistration_mm
    if options.misregistration_min_mm > 0 and options.misregistration_mm is not None:
        phantom.shifts = _breath_hold_shifts(rng, options.misregistration_min_mm, mis)
    else:
        phantom.shifts = core.sample_phase_shifts(rng, mis)
    background = _add_background(rng, phantom, lesion, label, options)
    # the window is centred on the shifted lesion; breath-hold shifts (up to 20 mm) need no extra context around it
    context = 2.0 if options.misregistration_min_mm > 0 else mis
    out = {}
    for phase in PHASES:
        if phase == "DWI":
            sp = prof.pixel_spacing * prof.dwi_spacing_factor
            spacing = (sp, sp, prof.dwi_thickness)
        else:
            spacing = (prof.pixel_spacing, prof.pixel_spacing, prof.slice_thickness)
        half = [extent + context + (m + 0.5) * s for m, s in zip(ROI_MARGIN, spacing)]
        grid = core.window_grid(lesion.centre + phantom.shifts[phase], half, spacing)
        pv = None if options.partial_volume else 1
        masks: list[np.ndarray] = []
        image = core.render_phase(phantom, phase, grid, rng, partial_volume=pv, masks=masks)
        mask = masks[0]
        if mask.any():
            box = box_from_mask(mask)
        else:  # lesion smaller than a voxel of this phase: box the voxel at its centre
            idx = np.clip(np.rint(grid.to_index(lesion.centre + phantom.shifts[phase])), 0, np.asarray(grid.shape) - 1)
            i, j, k = (int(v) for v in idx)
            box = (i, j, k, i + 1, j + 1, k + 1)
        crop = crop_lesion_roi(image, box, ROI_MARGIN)
        (sx, sy, sz), _ = roi_slices(box, grid.shape, ROI_MARGIN)
        affine = grid.affine_ras()
        affine[:3, 3] = affine[:3, :3] @ np.array([sx.start, sy.start, sz.start]) + affine[:3, 3]
        out[phase] = (crop, affine)
    meta = {
        "label": int(label),
        "class_name": LESION_CLASSES[label],
        "site": prof.name,
        "diameter_mm": round(lesion.diameter_mm, 2),
        "atypical": lesion.atypical,
    }
    if background is not None:
        meta.update(background)
    return out, meta


#: Liver level factors of background liver disease (relative to a normal liver), per phase.
_CIRRHOSIS_FACTOR = {"T2WI": 1.1, "DWI": 1.15, "C+A": 0.9, "C+V": 0.9, "C+Delay": 0.95}
_FATTY_FACTOR = {"In Phase": 1.05, "Out Phase": 0.55, "T2WI": 1.05}


def _breath_hold_shifts(rng: np.random.Generator, lo: float, hi: float) -> dict[str, np.ndarray]:
    """Inter-phase shifts of separate breath-holds: magnitude U(lo, hi) mm, mostly cranio-caudal; C+A is 0."""
    shifts = {}
    for phase in PHASES:
        if phase == core.REFERENCE_PHASE:
            shifts[phase] = np.zeros(3)
            continue
        direction = np.array([rng.normal(0, 0.3), rng.normal(0, 0.3), rng.choice([-1.0, 1.0])])
        shifts[phase] = direction / np.linalg.norm(direction) * rng.uniform(lo, hi)
    return shifts


def _add_background(
    rng: np.random.Generator, phantom: core.Phantom, lesion: core.Lesion, label: int, options: SynthOptions
) -> dict | None:
    """Background liver disease and vessels near the lesion (only for options that ask for them)."""
    if not options.cirrhosis_probability and options.fatty_liver_probability == 0 and options.vessels[1] == 0:
        return None
    cirrhotic = bool(options.cirrhosis_probability) and rng.uniform() < options.cirrhosis_probability[label]
    fatty = rng.uniform() < options.fatty_liver_probability
    factor = dict.fromkeys(PHASES, 1.0)
    for phase, f in _CIRRHOSIS_FACTOR.items() if cirrhotic else ():
        factor[phase] *= f
    for phase, f in _FATTY_FACTOR.items() if fatty else ():
        factor[phase] *= f
    phantom.liver_factor = factor
    if cirrhotic:  # regenerative nodules and fibrosis: a coarser, stronger parenchymal texture
        phantom.liver_texture = core._texture_waves(rng, wavelength_mm=6.0, n=8)
        phantom.liver_texture_amp = 0.12
    n = int(rng.integers(options.vessels[0], options.vessels[1] + 1))
    radius = float(lesion.radii.mean())
    for _ in range(n):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        offset = rng.normal(size=3)
        offset -= (offset @ direction) * direction
        offset /= max(np.linalg.norm(offset), 1e-6)
        point = lesion.centre + offset * radius * rng.uniform(1.1, 2.2)
        phantom.vessels.append((point, direction, float(rng.uniform(1.5, 5.0))))
    return {"cirrhotic": cirrhotic, "fatty_liver": fatty, "vessels": n}


# ----------------------------------------------------------------------------------------- datasets
def site_class_counts(site: str | SiteProfile, num_cases: int) -> list[int]:
    """Cases per class for ``num_cases`` at ``site`` following its class mix (largest remainder, >= 1 each)."""
    if num_cases < len(LESION_CLASSES):
        raise ValueError(f"num_cases must be >= {len(LESION_CLASSES)} (one per class), got {num_cases}.")
    p = get_site(site).class_probabilities()
    raw = p * (num_cases - len(p))
    counts = np.floor(raw).astype(int) + 1
    for i in np.argsort(-(raw - np.floor(raw)))[: num_cases - counts.sum()]:
        counts[i] += 1
    return [int(c) for c in counts]


def _normalise_counts(num_cases_per_class: int | Sequence[int]) -> list[int]:
    if isinstance(num_cases_per_class, (int, np.integer)):
        counts = [int(num_cases_per_class)] * len(LESION_CLASSES)
    else:
        counts = [int(c) for c in num_cases_per_class]
    if len(counts) != len(LESION_CLASSES) or min(counts) < 0 or sum(counts) == 0:
        raise ValueError(
            f"num_cases_per_class must be a positive int or {len(LESION_CLASSES)} non-negative ints, "
            f"got {num_cases_per_class}."
        )
    return counts


@dataclass(frozen=True)
class _Spec:
    case: str
    label: int
    site: str
    k: int
    fold: int | None


def _render_and_write(root: Path, spec: _Spec, seed: int, options: SynthOptions) -> dict:
    crops, meta = render_case(_case_rng(seed, spec.site, spec.label, spec.k), spec.label, spec.site, options)
    case_dir = root / "images" / spec.case
    case_dir.mkdir(parents=True)
    for phase, (crop, affine) in crops.items():
        write_nifti(case_dir / f"{PHASE_FILE_NAMES[phase]}.nii.gz", crop, affine)
    meta.update(
        split="test" if spec.fold is None else "training",
        fold=spec.fold,
        shape={p: list(crops[p][0].shape) for p in PHASES},
    )
    return meta


def _write_cases(
    root: Path, specs: Sequence[_Spec], seed: int, options: SynthOptions, progress: bool, num_workers: int = 0
) -> Path:
    """Render and write ``specs`` into the (temporary) dataset root; return the datalist path.

    ``num_workers > 1`` renders in forked worker processes (cases are seeded one by one, so the output is the
    same as with one process); without ``fork`` (Windows) it falls back to one process.
    """
    import multiprocessing

    meta_all: dict[str, dict] = {}
    bar = dict(desc=f"synthetic {root.name}", disable=not progress, unit="case", total=len(specs))
    if num_workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(num_workers, mp_context=ctx) as pool:
            futures = [pool.submit(_render_and_write, root, spec, seed, options) for spec in specs]
            for spec, future in zip(specs, _tqdm(futures, **bar)):
                meta_all[spec.case] = future.result()
    else:
        for spec in _tqdm(specs, **bar):
            meta_all[spec.case] = _render_and_write(root, spec, seed, options)
    with open(root / "cases.json", "w", encoding="utf-8") as f:
        json.dump({"seed": seed, "options": asdict(options), "cases": meta_all}, f, indent=1)
    return write_classification_index(root, [CaseRecord(s.case, s.label, s.fold) for s in specs])


def generate_dataset(
    output_dir: str | os.PathLike,
    num_cases_per_class: int | Sequence[int] = 10,
    seed: int = 0,
    site: str | Sequence[str] = "site_a",
    *,
    test_fraction: float = 0.2,
    num_folds: int = 5,
    options: SynthOptions | None = None,
    case_prefix: str = "SYN",
    overwrite: bool = False,
    progress: bool = True,
    num_workers: int = 0,
    extra_training_cases: int = 0,
) -> Path:
    """Generate a classification dataset in the LLD-MMRI layout the bundle trains on.

    Writes ``images/<case>/<phase>.nii.gz`` (8 ROI crops per case, LLD-MMRI margins), ``labels.txt``,
    ``datalist.json`` (``training`` with ``fold`` 0..num_folds-1 stratified by class, and ``test``) and
    ``cases.json`` (per-case site, size, atypical flag, crop shapes). Written to a temporary folder and renamed.

    Args:
        output_dir: dataset root to create.
        num_cases_per_class: cases per class (int, or one count per class); includes the test cases.
        seed: seed of every random draw.
        site: site profile name, or a sequence of names that the cases of each class cycle through.
        test_fraction: fraction of each class held out as the ``test`` split; default 0.2.
        num_folds: number of cross-validation folds of the training cases; default 5.
        options: appearance knobs (:class:`SynthOptions`).
        case_prefix: case names are ``<prefix><number>`` in a shuffled order (names do not reveal the class).
        overwrite: replace an existing ``output_dir``.
        progress: show a tqdm progress bar.
        num_workers: worker processes (0 or 1: this process); the output does not depend on it.
        extra_training_cases: more ``training`` cases (with folds), in the class proportions of
            ``num_cases_per_class``, appended after the others. They are drawn after every other draw, so the
            dataset without them (same other arguments) has the same cases, split and folds: only the training
            split grows.

    Returns:
        Path of ``datalist.json``.

    Raises:
        ValueError: for an unknown site or invalid counts/fractions.
        FileExistsError: when ``output_dir`` exists and ``overwrite`` is False.
    """
    counts = _normalise_counts(num_cases_per_class)
    if extra_training_cases < 0:
        raise ValueError(f"extra_training_cases must be >= 0, got {extra_training_cases}.")
    sites = [site] if isinstance(site, str) else list(site)
    if not sites:
        raise ValueError("site must name at least one site profile.")
    for s in sites:
        get_site(s)
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}.")
    options = options or SynthOptions()
    rng = np.random.default_rng([int(seed), 7])
    entries = []  # (label, site, k, is_test)
    for label, n in enumerate(counts):
        n_test = int(round(n * test_fraction))
        test_idx = set(rng.permutation(n)[:n_test].tolist())
        for k in range(n):
            entries.append((label, sites[k % len(sites)], k, k in test_idx))
    order = rng.permutation(len(entries))
    named = [(f"{case_prefix}{i:04d}", *entries[j]) for i, j in enumerate(order)]
    train = [e for e in named if not e[4]]
    folds = stratified_folds([e[1] for e in train], num_folds, rng)
    fold_of = {e[0]: f for e, f in zip(train, folds)}
    specs = [_Spec(e[0], e[1], e[2], e[3], fold_of.get(e[0])) for e in named]
    if extra_training_cases:
        specs += _extra_training_specs(counts, sites, extra_training_cases, num_folds, seed, case_prefix, len(specs))
    target = Path(output_dir)
    with atomic_directory(target, overwrite=overwrite) as tmp:
        _write_cases(tmp, specs, seed, options, progress, num_workers)
    logger.info("wrote %d cases to %s", len(specs), target)
    return target / "datalist.json"


def _extra_training_specs(
    counts: Sequence[int],
    sites: Sequence[str],
    num_cases: int,
    num_folds: int,
    seed: int,
    case_prefix: str,
    first_index: int,
) -> list[_Spec]:
    """``num_cases`` more training cases in the proportions of ``counts``; each class continues its own case index
    ``k`` (so no case repeats one of the dataset), drawn with a random stream of their own."""
    share = np.asarray(counts, dtype=np.float64) / sum(counts) * num_cases
    extra = np.floor(share).astype(int)
    for i in np.argsort(-(share - extra), kind="stable")[: num_cases - int(extra.sum())]:
        extra[i] += 1
    rng = np.random.default_rng([int(seed), 8])
    entries = [(label, sites[k % len(sites)], k) for label, n in enumerate(counts) for k in range(n, n + extra[label])]
    order = rng.permutation(len(entries))
    named = [(f"{case_prefix}{first_index + i:04d}", *entries[j]) for i, j in enumerate(order)]
    folds = stratified_folds([e[1] for e in named], num_folds, rng)
    return [_Spec(e[0], e[1], e[2], e[3], f) for e, f in zip(named, folds)]


def generate_federated_datasets(
    output_dir: str | os.PathLike,
    sites: Sequence[str] = ("site_a", "site_b", "site_c"),
    cases_per_site: int = 70,
    seed: int = 0,
    *,
    test_cases_per_site: int = 14,
    num_folds: int = 5,
    options: SynthOptions | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """One dataset per site (class mix of the site, domain shift between sites) plus a pooled held-out test set.

    ``output_dir/<site>/`` holds the site's cases, all in ``training`` with folds (no local test split);
    ``output_dir/pooled_test/`` holds ``test_cases_per_site`` class-balanced cases from every site in ``test``
    (its ``training`` list is empty). Each dataset is written atomically.

    Returns:
        ``{site: dataset root, ..., "pooled_test": dataset root}`` (roots, not datalist paths).
    """
    if not sites:
        raise ValueError("sites must name at least one site profile.")
    options = options or SynthOptions()
    root = Path(output_dir)
    out: dict[str, Path] = {}
    for s in sites:
        counts = site_class_counts(s, cases_per_site)
        generate_dataset(
            root / s,
            counts,
            seed,
            s,
            test_fraction=0.0,
            num_folds=num_folds,
            options=options,
            case_prefix=f"{s}_",
            overwrite=overwrite,
            progress=progress,
        )
        out[s] = root / s
    specs = []
    for s in sites:
        for i in range(test_cases_per_site):
            label = i % len(LESION_CLASSES)
            # k offset keeps test patients disjoint from the site's training patients (same seed and site)
            specs.append(_Spec(f"test_{s}_{i:04d}", label, s, 100000 + i, None))
    with atomic_directory(root / "pooled_test", overwrite=overwrite) as tmp:
        _write_cases(tmp, specs, seed, options, progress)
    out["pooled_test"] = root / "pooled_test"
    return out


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("LCADB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lcadb"


def _spec_of(preset: str | None, extra_training_cases: int | None) -> dict:
    """The default spec (``preset`` None and ``extra_training_cases`` None), else ``preset``'s (default preset when
    None) with ``extra_training_cases`` (0 when None) more training cases."""
    if preset is None and extra_training_cases is None:
        return DEFAULT_DATASET_SPEC
    return _dataset_spec(preset or DEFAULT_PRESET, extra_training_cases or 0)


def default_dataset_name(preset: str | None = None, extra_training_cases: int | None = None) -> str:
    """Cache folder name of the default dataset (or of ``preset``'s, with ``extra_training_cases``): the prefix plus a
    fingerprint of its spec and of the generator's code.

    Any change of the generator gives a new folder, so a cache never serves data an older generator wrote.
    """
    spec = _spec_of(preset, extra_training_cases)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    here = Path(__file__).resolve().parent
    for module in ("synthetic.py", "_synth_phantom.py", "_synth_io.py", "constants.py"):
        digest.update((here / module).read_bytes())
    return f"{DEFAULT_DATASET_NAME}-{digest.hexdigest()[:12]}"


def default_dataset(
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    num_workers: int | None = None,
    preset: str | None = None,
    extra_training_cases: int | None = None,
) -> Path:
    """The embedded default dataset (:data:`DEFAULT_DATASET_SPEC`), generated once and cached.

    Args:
        cache_dir: cache folder; default ``$LCADB_CACHE`` or ``~/.cache/lcadb``. The dataset is
            ``<cache_dir>/<default_dataset_name()>``.
        progress: show a progress bar while generating.
        num_workers: worker processes for the first generation; None = number of CPUs (at most 8).
        preset: a :data:`PRESETS` name instead of the default spec (e.g. ``"classic"``, the easy earlier default, or
            ``"realistic"``, the default's 350 cases without its extra training cases).
        extra_training_cases: training cases added to the preset's (same test split); None: the default spec's
            :data:`DEFAULT_EXTRA_TRAINING_CASES` without ``preset``, else 0.

    Returns:
        The dataset root (holding ``datalist.json``).
    """
    target = _cache_root(cache_dir) / default_dataset_name(preset, extra_training_cases)
    marker = target / "datalist.json"
    if marker.is_file():
        return target
    spec = dict(_spec_of(preset, extra_training_cases))
    spec.pop("preset", None)
    options = SynthOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.pop("options", {}).items()})
    try:
        workers = min(os.cpu_count() or 1, 8) if num_workers is None else num_workers
        generate_dataset(target, options=options, progress=progress, num_workers=workers, **spec)
    except OSError:  # FileExistsError included
        if not marker.is_file():  # a concurrent process finished first, or the folder is broken
            raise
    return target


class DefaultDatasetPath(os.PathLike):
    """The embedded default dataset's folder as a path-like that generates the dataset on first use.

    The bundle configs' ``dataset_dir`` default: parsing a config or checking a workflow's properties
    builds this object and nothing more; the dataset is generated (once, cached) only when the data
    loader asks for the path through ``os.fspath``.

    Args:
        cache_dir: cache folder, as for :func:`default_dataset`.
        preset: a :data:`PRESETS` name instead of the default spec, as for :func:`default_dataset`
            (``--dataset_dir#preset classic`` on the command line).
        extra_training_cases: as for :func:`default_dataset` (``--dataset_dir#extra_training_cases 1120``).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike | None = None,
        preset: str | None = None,
        extra_training_cases: int | None = None,
    ) -> None:
        _spec_of(preset, extra_training_cases)  # a bad preset or count fails when the config is parsed
        self.cache_dir = cache_dir
        self.preset = preset
        self.extra_training_cases = extra_training_cases

    def __fspath__(self) -> str:
        return str(default_dataset(self.cache_dir, preset=self.preset, extra_training_cases=self.extra_training_cases))

    def __repr__(self) -> str:
        name = default_dataset_name(self.preset, self.extra_training_cases)
        return f"DefaultDatasetPath({str(_cache_root(self.cache_dir) / name)!r})"


# --------------------------------------------------------------------------------- released layout
def write_released_layout(
    output_dir: str | os.PathLike,
    num_patients: int = 8,
    seed: int = 0,
    site: str = "site_a",
    *,
    matrix: Sequence[int] = (96, 96),
    num_slices: int | None = 16,
    lesions_per_patient: tuple[int, int] = (1, 2),
    num_folds: int = 5,
    test_fraction: float = 0.2,
    options: SynthOptions | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a small dataset in the LLD-MMRI2023 *released* layout, to test the adapter.

    Layout (as LMMMEng/LLD-MMRI2023 ``main/README.md`` and ``main/preprocess/crop_roi.py`` read it)::

        images/<patient>/<studyUID>/<seriesUID>.nii.gz        one full volume per phase
        labels/Annotation.json                                {"Annotation_info": {patient: [per-phase item]}}
        labels/fold<k>.csv                                    lesion_classifier,dataset,label (Train/Val/Test)

    Each per-phase item: ``studyUID``, ``seriesUID``, ``phase``, ``pixel_spacing``, ``slice_thickness`` and
    ``annotation.lesion[<idx>]`` = ``{"category": label, "bbox": {"3D_box": {x_min, y_min, z_min, x_max, y_max,
    z_max}}}`` where x/y maxima are exclusive and ``z_max`` is the last slice (inclusive), as crop_roi.py slices
    them (``[z_min:z_max + 1, y_min:y_max, x_min:x_max]``). Lesion ``0`` of a patient is case ``<patient>``,
    lesion ``i`` is case ``<patient>_<i>``. Fold k's CSV marks fold k's cases ``Val``.

    Returns:
        The dataset root.
    """
    if num_patients < 1:
        raise ValueError(f"num_patients must be >= 1, got {num_patients}.")
    lo, hi = lesions_per_patient
    if not 1 <= lo <= hi <= 3:
        raise ValueError(f"lesions_per_patient must satisfy 1 <= min <= max <= 3, got {lesions_per_patient}.")
    from pydicom.uid import generate_uid

    options = options or SynthOptions()
    prof = options.site(get_site(site))
    grids = core.study_grids(prof, matrix, num_slices)
    zr = core.coverage_z(grids)
    margin_z = 2 * prof.dwi_thickness
    zr = (zr[0] + margin_z, zr[1] - margin_z)
    rng = np.random.default_rng([int(seed), 11])
    annotation: dict[str, list] = {}
    cases: list[tuple[str, int]] = []
    target = Path(output_dir)
    with atomic_directory(target, overwrite=overwrite) as tmp:
        for p in _tqdm(range(num_patients), desc="released layout", disable=not progress, unit="patient"):
            prng = np.random.default_rng([int(seed), 13, p])
            patient = f"MR{100000 + p}"
            n_les = int(prng.integers(lo, hi + 1))
            labels = [int((p + i * 3) % len(LESION_CLASSES)) for i in range(n_les)]
            size = (options.size_range_mm[0], min(options.size_range_mm[1], 40.0))
            phantom = core.sample_study(
                prng, prof, labels, zr, size, options.atypical_fraction, options.jitter, options.misregistration_mm
            )
            study_uid = generate_uid(entropy_srcs=[str(seed), patient, "study"])
            items = []
            for phase in PHASES:
                grid = grids[phase]
                series_uid = generate_uid(entropy_srcs=[str(seed), patient, phase])
                masks: list[np.ndarray] = []
                image = core.render_phase(phantom, phase, grid, prng, masks=masks)
                folder = tmp / "images" / patient / study_uid
                folder.mkdir(parents=True, exist_ok=True)
                write_nifti(folder / f"{series_uid}.nii.gz", image, grid.affine_ras())
                lesions = {}
                for i, lesion in enumerate(phantom.lesions):
                    mask = masks[i]
                    if mask.any():
                        x0, y0, z0, x1, y1, z1 = box_from_mask(mask)
                    else:
                        c = np.rint(grid.to_index(lesion.centre + phantom.shifts[phase])).astype(int)
                        x0, y0, z0, x1, y1, z1 = c[0], c[1], c[2], c[0] + 1, c[1] + 1, c[2] + 1
                    box = {"x_min": x0, "y_min": y0, "z_min": z0, "x_max": x1, "y_max": y1, "z_max": z1 - 1}
                    lesions[str(i)] = {
                        "category": lesion.label,
                        "bbox": {"3D_box": {k: int(v) for k, v in box.items()}},
                    }
                items.append(
                    {
                        "studyUID": study_uid,
                        "seriesUID": series_uid,
                        "phase": phase,
                        "pixel_spacing": [grid.spacing[0], grid.spacing[1]],
                        "slice_thickness": grid.slab,
                        "annotation": {"lesion": lesions},
                    }
                )
            annotation[patient] = items
            for i, lesion in enumerate(phantom.lesions):
                cases.append((patient if i == 0 else f"{patient}_{i}", lesion.label))
        (tmp / "labels").mkdir()
        with open(tmp / "labels" / "Annotation.json", "w", encoding="utf-8") as f:
            json.dump({"Annotation_info": annotation}, f, indent=1)
        n_test = int(round(len(cases) * test_fraction))
        perm = rng.permutation(len(cases))
        test = {cases[i][0] for i in perm[:n_test]}
        train = [c for c in cases if c[0] not in test]
        folds = dict(zip([c[0] for c in train], stratified_folds([c[1] for c in train], num_folds, rng)))
        for k in range(num_folds):
            with open(tmp / "labels" / f"fold{k + 1}.csv", "w", encoding="utf-8", newline="") as f:
                w = csv.writer(f)
                w.writerow(["lesion_classifier", "dataset", "label"])
                for case, label in cases:
                    split = "Test" if case in test else ("Val" if folds[case] == k else "Train")
                    w.writerow([case, split, label])
    return target


# -------------------------------------------------------------------------------------------- CLI
def _benchmark(args: argparse.Namespace) -> dict:
    import tempfile

    from .synthetic_dicom import generate_dicom_study

    result: dict = {"workers": args.workers}
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        generate_dataset(
            Path(tmp) / "nifti",
            args.cases_per_class,
            args.seed,
            ("site_a", "site_b", "site_c"),
            options=SynthOptions(size_range_mm=(8.0, 40.0)),
            progress=False,
            num_workers=args.workers,
        )
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        n = args.cases_per_class * len(LESION_CLASSES)
        result.update(nifti_cases=n, nifti_seconds=round(wall, 2), nifti_cases_per_second=round(n / wall, 2))
        if args.workers <= 1:
            result["nifti_cpu_seconds_per_case"] = round(cpu / n, 3)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(args.studies):
            generate_dicom_study(Path(tmp) / f"dicom{i}", args.seed + i, num_lesions=2)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        result.update(
            dicom_studies=args.studies,
            dicom_seconds_per_study=round(wall / max(args.studies, 1), 2),
            dicom_cpu_seconds_per_study=round(cpu / max(args.studies, 1), 2),
        )
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lcadb-synth",
        description="Synthetic 8-phase liver-lesion MRI: classification datasets (NIfTI), DICOM studies, "
        "federated multi-site sets and the LLD-MMRI released layout.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
        sp.add_argument("--atypical-fraction", type=float, default=0.1, help="fraction of atypical lesions")
        sp.add_argument(
            "--size-range",
            type=float,
            nargs=2,
            default=(5.0, 60.0),
            metavar=("MIN", "MAX"),
            help="lesion diameter range in mm (default 5 60)",
        )
        sp.add_argument("--noise-scale", type=float, default=1.0, help="multiplies the site noise (default 1)")
        sp.add_argument("--misregistration", type=float, default=None, help="max inter-phase shift in mm")
        sp.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    sp = sub.add_parser("nifti", help="classification dataset (images/<case>/<phase>.nii.gz + datalist.json)")
    sp.add_argument("output_dir", type=Path)
    sp.add_argument("--cases-per-class", type=int, default=10)
    sp.add_argument("--site", nargs="+", default=["site_a"], choices=sorted(SITE_PROFILES))
    sp.add_argument("--test-fraction", type=float, default=0.2)
    sp.add_argument("--num-folds", type=int, default=5)
    sp.add_argument("--workers", type=int, default=0, help="worker processes (default 0: this process)")
    common(sp)

    sp = sub.add_parser("default", help="generate (once) the embedded default dataset and print its path")
    sp.add_argument("--cache-dir", type=Path, default=None, help="default $LCADB_CACHE or ~/.cache/lcadb")
    sp.add_argument("--workers", type=int, default=None, help="worker processes (default: CPUs, at most 8)")
    sp.add_argument("--preset", choices=sorted(PRESETS), default=None, help=f"default {DEFAULT_PRESET}")
    sp.add_argument(
        "--extra-training-cases",
        type=int,
        default=None,
        help=f"training cases added to the preset's (default {DEFAULT_EXTRA_TRAINING_CASES} without --preset, else 0)",
    )

    sp = sub.add_parser("federated", help="one dataset per site plus a pooled held-out test set")
    sp.add_argument("output_dir", type=Path)
    sp.add_argument("--sites", nargs="+", default=["site_a", "site_b", "site_c"], choices=sorted(SITE_PROFILES))
    sp.add_argument("--cases-per-site", type=int, default=70)
    sp.add_argument("--test-cases-per-site", type=int, default=14)
    common(sp)

    sp = sub.add_parser("dicom", help="DICOM MR studies (8 series + SEG + ground_truth.json each)")
    sp.add_argument("output_dir", type=Path)
    sp.add_argument("--num-studies", type=int, default=1)
    sp.add_argument("--site", default="site_a", choices=sorted(SITE_PROFILES))
    sp.add_argument("--naming-style", default=None, help="siemens | ge | philips | canon | uih | lldmmri (site's)")
    sp.add_argument("--num-lesions", type=int, default=None, help="1-3 (default random)")
    sp.add_argument("--matrix", type=int, nargs=2, default=(256, 256), metavar=("COLS", "ROWS"))
    sp.add_argument("--slices", type=int, default=None, help="slices per series (default: site's)")
    sp.add_argument("--mixed-geometry", action="store_true", help="oblique T2WI, shifted C+Delay coverage")
    sp.add_argument("--layout", default="separate", help="separate | single-series (dynamic and Dixon series)")
    sp.add_argument("--distractors", action="store_true", help="localizer, coronal T2, ADC, subtraction, MIP")
    common(sp)

    sp = sub.add_parser("released", help="LLD-MMRI released layout (full volumes + Annotation.json + fold CSVs)")
    sp.add_argument("output_dir", type=Path)
    sp.add_argument("--num-patients", type=int, default=8)
    sp.add_argument("--site", default="site_a", choices=sorted(SITE_PROFILES))
    sp.add_argument("--matrix", type=int, nargs=2, default=(96, 96), metavar=("COLS", "ROWS"))
    sp.add_argument("--slices", type=int, default=16)
    common(sp)

    sp = sub.add_parser("benchmark", help="measure generation speed (NIfTI cases/s, DICOM s/study); prints JSON")
    sp.add_argument("--cases-per-class", type=int, default=10)
    sp.add_argument("--studies", type=int, default=2)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--workers", type=int, default=0, help="worker processes for the NIfTI part (default 0)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m scripts.synthetic`` / ``lcadb-synth``)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("highdicom").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    opts = None
    if hasattr(args, "atypical_fraction"):
        opts = SynthOptions(
            atypical_fraction=args.atypical_fraction,
            size_range_mm=tuple(args.size_range),
            noise_scale=args.noise_scale,
            misregistration_mm=args.misregistration,
        )
    if args.command == "nifti":
        path = generate_dataset(
            args.output_dir,
            args.cases_per_class,
            args.seed,
            args.site,
            test_fraction=args.test_fraction,
            num_folds=args.num_folds,
            options=opts,
            overwrite=args.overwrite,
            num_workers=args.workers,
        )
        print(path)
    elif args.command == "default":
        print(
            default_dataset(
                args.cache_dir,
                num_workers=args.workers,
                preset=args.preset,
                extra_training_cases=args.extra_training_cases,
            )
        )
    elif args.command == "federated":
        paths = generate_federated_datasets(
            args.output_dir,
            args.sites,
            args.cases_per_site,
            args.seed,
            test_cases_per_site=args.test_cases_per_site,
            options=opts,
            overwrite=args.overwrite,
        )
        print(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))
    elif args.command == "dicom":
        from .synthetic_dicom import generate_dicom_study

        for i in _tqdm(range(args.num_studies), desc="dicom studies", unit="study"):
            out = args.output_dir / f"study_{i:03d}" if args.num_studies > 1 else args.output_dir
            truth = generate_dicom_study(
                out,
                args.seed + i,
                num_lesions=args.num_lesions,
                naming_style=args.naming_style,
                site=args.site,
                matrix=tuple(args.matrix),
                num_slices=args.slices,
                mixed_geometry=args.mixed_geometry,
                layout=args.layout,
                distractors=args.distractors,
                options=opts,
                overwrite=args.overwrite,
            )
            print(out, truth.study_instance_uid)
    elif args.command == "released":
        print(
            write_released_layout(
                args.output_dir,
                args.num_patients,
                args.seed,
                args.site,
                matrix=tuple(args.matrix),
                num_slices=args.slices,
                options=opts,
                overwrite=args.overwrite,
            )
        )
    elif args.command == "benchmark":
        print(json.dumps(_benchmark(args), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
