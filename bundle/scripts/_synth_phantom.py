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
"""The phantom core of the synthetic generator: one appearance model shared by the NIfTI and DICOM outputs.

A patient is an analytic body in patient coordinates (DICOM LPS, millimetres): body outline with a fat shell,
liver, spleen, kidneys, aorta, IVC and spine, plus 1-3 lesions inside the liver. Every phase is rendered by
sampling that continuous model on a voxel :class:`Grid` (any spacing, matrix or orientation), so the full-FOV
DICOM series, the released-layout volumes and the small classification windows all come from the same code.

Per voxel: tissue level relative to liver (per phase) -> lesion composite (regions rim / centre / nodules /
fill-in / halo / capsule, levels per the class table of issue 3) -> slab average over the slice thickness
(partial volume) -> phase baseline x bias field -> Rician noise. Phases differ by a rigid shift (misregistration).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from .constants import LESION_CLASSES, PHASES

__all__ = [
    "APPEARANCE",
    "ATYPICAL",
    "CLASS_GEOMETRY",
    "Grid",
    "Lesion",
    "PhaseAppearance",
    "Phantom",
    "SITE_PROFILES",
    "SiteProfile",
    "axial_grid",
    "get_site",
    "lesion_mask",
    "render_phase",
    "sample_lesion",
    "sample_phantom",
    "sample_study",
    "study_grids",
    "coverage_z",
    "place_lesion_centre",
    "PHASE_BASE",
    "LEVELS",
    "REFERENCE_PHASE",
    "sample_phase_shifts",
    "window_grid",
]

#: Points evaluated at once (keeps the temporaries in cache).
_CHUNK = 8192

#: Phase used as the geometric reference (no misregistration, SEG and ground-truth boxes live on it).
REFERENCE_PHASE = "C+A"


# ----------------------------------------------------------------------------------------------- sites
@dataclass(frozen=True)
class SiteProfile:
    """Scanner / hospital profile: contrast, noise, geometry and class mix of one site.

    Args:
        name: site id, e.g. ``"site_a"``.
        description: one line for the docs.
        field_strength: tesla (1.5 or 3.0); also picks echo times and imaging frequency in DICOM.
        manufacturer: DICOM Manufacturer of the site's scanner.
        model_name: DICOM ManufacturerModelName.
        naming_style: default SeriesDescription style (key of ``SERIES_DESCRIPTIONS``).
        noise: Rician noise sigma relative to the liver signal of the phase (DWI gets x2).
        contrast: exponent applied to every level relative to liver (1 = nominal, >1 stronger contrast).
        intensity_scale: global signal scale (scanner units).
        bias: amplitude of the multiplicative bias field (log-scale polynomial coefficients).
        fov_mm: in-plane field of view of the full-FOV series.
        pixel_spacing: in-plane spacing (mm) of the classification windows.
        slice_thickness: slice thickness (mm) of T2WI, dual echo and dynamic phases.
        dwi_spacing_factor: DWI in-plane spacing = factor x pixel_spacing (coarser).
        dwi_thickness: DWI slice thickness (mm).
        num_slices: default number of slices of the full-FOV series.
        misregistration_mm: maximum rigid shift between a phase and the reference phase C+A.
        class_mix: relative frequency of the 7 classes at this site (normalised when used).
    """

    name: str
    description: str
    field_strength: float
    manufacturer: str
    model_name: str
    naming_style: str
    noise: float
    contrast: float
    intensity_scale: float
    bias: float
    fov_mm: float
    pixel_spacing: float
    slice_thickness: float
    dwi_spacing_factor: float
    dwi_thickness: float
    num_slices: int
    misregistration_mm: float
    class_mix: tuple[float, ...]

    def class_probabilities(self) -> np.ndarray:
        p = np.asarray(self.class_mix, dtype=float)
        return p / p.sum()


SITE_PROFILES: dict[str, SiteProfile] = {
    "site_a": SiteProfile(
        name="site_a",
        description="1.5 T, Siemens-style, balanced class mix, moderate noise",
        field_strength=1.5,
        manufacturer="SIEMENS",
        model_name="MAGNETOM Aera",
        naming_style="siemens",
        noise=0.05,
        contrast=1.0,
        intensity_scale=1.0,
        bias=0.12,
        fov_mm=380.0,
        pixel_spacing=1.5,
        slice_thickness=5.0,
        dwi_spacing_factor=2.0,
        dwi_thickness=6.0,
        num_slices=40,
        misregistration_mm=2.0,
        class_mix=(1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
    ),
    "site_b": SiteProfile(
        name="site_b",
        description="3 T, GE-style oncology centre: stronger contrast, low noise, thin slices, more HCC/metastases",
        field_strength=3.0,
        manufacturer="GE MEDICAL SYSTEMS",
        model_name="Discovery MR750",
        naming_style="ge",
        noise=0.035,
        contrast=1.15,
        intensity_scale=1.6,
        bias=0.22,
        fov_mm=360.0,
        pixel_spacing=1.25,
        slice_thickness=3.0,
        dwi_spacing_factor=2.0,
        dwi_thickness=5.0,
        num_slices=56,
        misregistration_mm=1.5,
        class_mix=(0.10, 0.18, 0.06, 0.22, 0.08, 0.08, 0.28),
    ),
    "site_c": SiteProfile(
        name="site_c",
        description="1.5 T, Philips-style community hospital: weaker contrast, noisier, thick slices, mostly benign",
        field_strength=1.5,
        manufacturer="Philips Medical Systems",
        model_name="Ingenia",
        naming_style="philips",
        noise=0.08,
        contrast=0.85,
        intensity_scale=0.7,
        bias=0.18,
        fov_mm=400.0,
        pixel_spacing=1.8,
        slice_thickness=7.0,
        dwi_spacing_factor=1.6,
        dwi_thickness=8.0,
        num_slices=32,
        misregistration_mm=2.5,
        class_mix=(0.24, 0.05, 0.14, 0.10, 0.25, 0.14, 0.08),
    ),
}


def get_site(site: str | SiteProfile) -> SiteProfile:
    """Return the :class:`SiteProfile` for a name (or the profile itself).

    Raises:
        ValueError: for an unknown site name, listing the known ones.
    """
    if isinstance(site, SiteProfile):
        return site
    if site not in SITE_PROFILES:
        raise ValueError(f"unknown site {site!r}; known sites: {sorted(SITE_PROFILES)}.")
    return SITE_PROFILES[site]


# ------------------------------------------------------------------------------------------- appearance
#: Symbolic levels of the issue's table, relative to liver (= 1).
LEVELS: dict[str, float] = {"--": 0.3, "-": 0.62, "0": 1.0, "+": 1.5, "++": 2.2}


@dataclass(frozen=True)
class PhaseAppearance:
    """Levels (relative to liver) of the lesion regions in one phase; ``None`` = region not drawn.

    Args:
        body: the whole lesion.
        centre: central region (``r < centre_frac``): scar, necrosis, fibrous core, abscess cavity.
        rim: peripheral shell of width ``rim_width`` (ring / rim / wall).
        nodules: peripheral nodules (discontinuous nodular enhancement) and the fill-in region.
        fill: fill-in fraction (centripetal fill-in of hemangioma): ``r > 1 - fill`` takes the nodule level.
        halo: perilesional liver outside the lesion (abscess halo).
        capsule: thin shell just outside the lesion (HCC capsule).
        heterogeneity: amplitude of the procedural texture inside the lesion (mosaic).
    """

    body: float
    centre: float | None = None
    rim: float | None = None
    nodules: float | None = None
    fill: float | None = None
    halo: float | None = None
    capsule: float | None = None
    heterogeneity: float = 0.04

    def scaled(self, factor: float, contrast: float, rng: np.random.Generator, jitter: float) -> PhaseAppearance:
        """Levels raised to ``contrast``, times ``factor`` and an independent per-region jitter."""

        def f(v: float | None) -> float | None:
            if v is None:
                return None
            return float(v**contrast * factor * math.exp(rng.normal(0.0, jitter * 0.5)))

        return replace(
            self,
            body=f(self.body),  # type: ignore[arg-type]
            centre=f(self.centre),
            rim=f(self.rim),
            nodules=f(self.nodules),
            halo=f(self.halo),
            capsule=f(self.capsule),
        )


_P = PhaseAppearance
_L = LEVELS

#: Class x phase appearance (issue 3 table). Keys: label index, then phase name (constants.PHASES).
APPEARANCE: dict[int, dict[str, PhaseAppearance]] = {
    0: {  # hemangioma: T2 ++, peripheral nodular discontinuous -> centripetal fill-in -> filled
        "T2WI": _P(_L["++"]),
        "DWI": _P(_L["+"]),
        "In Phase": _P(_L["-"]),
        "Out Phase": _P(_L["-"]),
        "C-pre": _P(_L["-"]),
        "C+A": _P(_L["-"], nodules=_L["++"]),
        "C+V": _P(0.8, nodules=_L["++"], fill=0.55),
        "C+Delay": _P(_L["++"], centre=1.7),
    },
    1: {  # cholangiocarcinoma: thin irregular arterial rim, progressive central (fibrous) enhancement
        "T2WI": _P(_L["+"], centre=1.2),
        "DWI": _P(1.3, rim=_L["++"], centre=1.0),  # target-like
        "In Phase": _P(_L["-"]),
        "Out Phase": _P(_L["-"]),
        "C-pre": _P(_L["-"]),
        "C+A": _P(0.68, rim=_L["+"]),
        "C+V": _P(1.05, centre=1.45, rim=1.35),
        "C+Delay": _P(1.3, centre=1.7),
    },
    2: {  # abscess: T2 wall + centre ++, restricted centre, rim + halo, non-enhancing cavity
        "T2WI": _P(2.4, rim=1.4),
        "DWI": _P(2.6, rim=1.3),
        "In Phase": _P(_L["-"]),
        "Out Phase": _P(_L["-"]),
        "C-pre": _P(_L["-"]),
        "C+A": _P(_L["--"], rim=1.6, halo=1.4),
        "C+V": _P(_L["--"], rim=1.5, halo=1.15),
        "C+Delay": _P(_L["--"], rim=1.4),
    },
    3: {  # metastasis: arterial ring, peripheral washout, hypo delay
        "T2WI": _P(_L["+"]),
        "DWI": _P(1.6),
        "In Phase": _P(_L["-"]),
        "Out Phase": _P(_L["-"]),
        "C-pre": _P(_L["-"]),
        "C+A": _P(_L["-"], rim=_L["+"]),
        "C+V": _P(0.72, rim=0.5),
        "C+Delay": _P(0.65),
    },
    4: {  # cyst: very bright T2, no enhancement
        "T2WI": _P(3.0),
        "DWI": _P(0.85),
        "In Phase": _P(0.5),
        "Out Phase": _P(0.5),
        "C-pre": _P(0.5),
        "C+A": _P(_L["--"]),
        "C+V": _P(0.28),
        "C+Delay": _P(0.28),
    },
    5: {  # FNH: near-iso, central scar (T2 ++, arterial dark, delayed +), homogeneous arterial ++
        "T2WI": _P(1.15, centre=_L["++"]),
        "DWI": _P(1.15),
        "In Phase": _P(_L["0"]),
        "Out Phase": _P(_L["0"]),
        "C-pre": _P(_L["0"], centre=0.85),
        "C+A": _P(_L["++"], centre=0.65),
        "C+V": _P(1.05, centre=0.9),
        "C+Delay": _P(1.0, centre=_L["+"]),
    },
    6: {  # HCC: arterial non-rim hyper, washout, enhancing capsule, fat drop in some
        "T2WI": _P(1.4),
        "DWI": _P(_L["+"]),
        "In Phase": _P(_L["0"]),
        "Out Phase": _P(_L["0"]),  # 0.65 when the lesion contains fat (see CLASS_GEOMETRY fat_fraction)
        "C-pre": _P(0.75),
        "C+A": _P(1.6, heterogeneity=0.12),
        "C+V": _P(0.7, capsule=1.7, heterogeneity=0.08),
        "C+Delay": _P(0.65, capsule=1.8),
    },
}

#: Atypical variants (used for a fraction of cases): phases overridden relative to APPEARANCE.
ATYPICAL: dict[int, dict[str, PhaseAppearance]] = {
    0: {"C+A": _P(_L["++"]), "C+V": _P(_L["++"])},  # flash-filling hemangioma
    1: {"DWI": _P(_L["+"]), "C+A": _P(1.0)},  # hypovascular, no target sign
    2: {"T2WI": _P(1.6, rim=1.3), "DWI": _P(1.6, rim=1.3)},  # early (phlegmonous) abscess
    3: {"C+A": _P(_L["+"]), "T2WI": _P(1.9)},  # hypervascular metastasis
    4: {"In Phase": _P(1.3), "Out Phase": _P(1.3), "C-pre": _P(1.3), "T2WI": _P(_L["++"])},  # proteinaceous cyst
    5: {"C+A": _P(1.6), "T2WI": _P(1.15), "C-pre": _P(1.0), "C+V": _P(1.05), "C+Delay": _P(1.0)},  # no scar
    6: {"C+V": _P(1.0), "C+Delay": _P(0.9)},  # HCC without washout or capsule
}

#: Atypical variants of the ``realistic`` preset (one drawn per atypical lesion), overriding APPEARANCE like
#: ATYPICAL. They put each class's published look-alikes next to the other classes (sources in docs/data.md).
REALISTIC_ATYPICAL: dict[int, list[dict[str, PhaseAppearance]]] = {
    0: [
        {"C+A": _P(_L["++"]), "C+V": _P(_L["++"]), "C+Delay": _P(1.6)},  # flash-filling (mimics FNH/hyper-met)
        {"T2WI": _P(1.4), "C+A": _P(0.8, nodules=1.1), "C+V": _P(0.9), "C+Delay": _P(1.0)},  # sclerosed
        {"C+Delay": _P(_L["++"], centre=0.5), "T2WI": _P(_L["++"], centre=3.0)},  # giant, central cleft
    ],
    1: [
        {"DWI": _P(_L["+"]), "C+A": _P(1.0)},  # hypovascular, no target sign
        {"C+A": _P(0.7, rim=1.5), "C+V": _P(0.8, rim=0.6), "C+Delay": _P(0.85)},  # peripheral washout (mimics met)
        {"C+A": _P(1.5, heterogeneity=0.1), "C+V": _P(0.9), "C+Delay": _P(1.1)},  # arterial hyper (mimics HCC)
    ],
    2: [
        {"T2WI": _P(1.6, rim=1.3), "DWI": _P(1.6, rim=1.3)},  # early (phlegmonous)
        {"DWI": _P(1.4, rim=1.6), "C+A": _P(0.4, rim=1.4), "C+V": _P(0.4, rim=1.3)},  # no halo (mimics necrotic met)
    ],
    3: [
        {"C+A": _P(_L["+"]), "T2WI": _P(1.9)},  # hypervascular
        {"C+A": _P(0.7, rim=1.2), "C+V": _P(0.9, centre=1.1), "C+Delay": _P(1.1, centre=1.3)},  # delayed (mimics ICC)
        {"T2WI": _P(2.2), "C+A": _P(0.4, rim=1.4), "C+V": _P(0.4, rim=1.2), "C+Delay": _P(0.4)},  # cystic/necrotic
    ],
    4: [
        {"In Phase": _P(1.3), "Out Phase": _P(1.3), "C-pre": _P(1.3), "T2WI": _P(_L["++"])},  # proteinaceous
        {"T2WI": _P(1.8), "In Phase": _P(1.4), "Out Phase": _P(1.4), "C-pre": _P(1.4), "DWI": _P(1.0)},  # haemorrhagic
    ],
    5: [
        {"C+A": _P(1.6), "T2WI": _P(1.15), "C-pre": _P(1.0), "C+V": _P(1.05), "C+Delay": _P(1.0)},  # no scar
        {"T2WI": _P(1.2), "DWI": _P(1.3), "C+A": _P(1.5), "C+V": _P(1.0), "C+Delay": _P(0.95)},  # mimics HCC
    ],
    6: [
        {"C+V": _P(1.0), "C+Delay": _P(0.9)},  # no washout or capsule
        {"T2WI": _P(1.2), "DWI": _P(1.2), "C+A": _P(0.9), "C+V": _P(0.75), "C+Delay": _P(0.7)},  # hypovascular
        {"C+A": _P(0.8, rim=1.5), "C+V": _P(0.7, rim=1.0), "C+Delay": _P(0.65)},  # rim arterial (LR-M-like)
    ],
}

#: Geometry priors per class: size (median diameter, log-sd), shape and region sizes (uniform ranges).
CLASS_GEOMETRY: dict[int, dict[str, object]] = {
    0: {"size": (24.0, 0.45), "centre_frac": (0.15, 0.3), "nodules": (4, 7), "fill": (0.4, 0.7)},
    1: {"size": (42.0, 0.35), "rim_width": (0.12, 0.2), "rim_irregularity": 0.6, "centre_frac": (0.45, 0.65)},
    2: {"size": (38.0, 0.35), "rim_width": (0.22, 0.35), "halo_width": (0.3, 0.55)},
    3: {"size": (22.0, 0.45), "rim_width": (0.25, 0.4), "lobulation": (0.05, 0.2)},
    4: {"size": (18.0, 0.5), "lobulation": (0.0, 0.05), "elongation": (0.9, 1.1)},
    5: {"size": (30.0, 0.35), "centre_frac": (0.18, 0.3)},
    6: {"size": (32.0, 0.45), "capsule_mm": (1.5, 2.5), "fat_fraction": 0.35},
}

#: Tissue levels relative to liver, per phase (body background used around the lesion and in full FOV).
_TISSUES = ("air", "fat", "muscle", "liver", "spleen", "kidney", "ivc", "aorta", "spine")
_TISSUE_LEVELS: dict[str, tuple[float, ...]] = {
    # phase:     air  fat   muscle liver spleen kidney ivc   aorta spine
    "T2WI": (0.0, 1.7, 0.7, 1.0, 1.7, 1.6, 0.4, 0.2, 0.9),
    "DWI": (0.0, 0.25, 0.6, 1.0, 1.6, 1.5, 0.2, 0.15, 0.5),
    "In Phase": (0.0, 1.9, 0.75, 1.0, 0.8, 0.7, 0.6, 0.5, 1.3),
    "Out Phase": (0.0, 1.7, 0.75, 1.0, 0.8, 0.7, 0.6, 0.5, 1.0),
    "C-pre": (0.0, 0.3, 0.8, 1.0, 0.8, 0.75, 0.7, 0.6, 0.9),
    "C+A": (0.0, 0.3, 0.85, 1.0, 1.4, 2.5, 1.4, 3.5, 1.0),
    "C+V": (0.0, 0.3, 0.9, 1.0, 1.25, 1.8, 2.2, 1.8, 1.1),
    "C+Delay": (0.0, 0.3, 0.9, 1.0, 1.15, 1.6, 1.5, 1.4, 1.1),
}

#: Liver signal per phase (scanner units) before site scale and per-patient jitter.
PHASE_BASE: dict[str, float] = {
    "T2WI": 400.0,
    "DWI": 250.0,
    "In Phase": 700.0,
    "Out Phase": 650.0,
    "C-pre": 500.0,
    "C+A": 650.0,
    "C+V": 800.0,
    "C+Delay": 750.0,
}


# ------------------------------------------------------------------------------------------------ grid
@dataclass(frozen=True)
class Grid:
    """A voxel grid in patient (LPS) millimetres.

    ``world(i, j, k) = origin + i * spacing[0] * axes[0] + j * spacing[1] * axes[1] + k * spacing[2] * axes[2]``;
    for DICOM, ``axes[0]``/``axes[1]`` are the row/column direction cosines and ``axes[2]`` the slice normal.

    Args:
        shape: ``(X, Y, Z)``.
        spacing: voxel spacing (mm) along the three axes.
        origin: world position (mm) of the centre of voxel (0, 0, 0).
        axes: three orthonormal unit vectors (rows).
        thickness: slice thickness (mm) used for the partial-volume slab average (defaults to spacing[2]).
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    axes: tuple[tuple[float, float, float], ...] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    thickness: float | None = None

    @property
    def axes_array(self) -> np.ndarray:
        return np.asarray(self.axes, dtype=np.float64)

    @property
    def slab(self) -> float:
        return float(self.thickness if self.thickness is not None else self.spacing[2])

    def points(self, offset_mm: float = 0.0) -> np.ndarray:
        """World coordinates ``(X*Y*Z, 3)`` float32 of the voxel centres (C order over i, j, k), shifted by
        ``offset_mm`` along the slice normal."""
        idx = [np.arange(n, dtype=np.float32) * np.float32(s) for n, s in zip(self.shape, self.spacing)]
        ax = self.axes_array.astype(np.float32)
        origin = np.asarray(self.origin, dtype=np.float32) + np.float32(offset_mm) * ax[2]
        pts = (
            idx[0][:, None, None, None] * ax[0]
            + idx[1][None, :, None, None] * ax[1]
            + (idx[2][None, None, :, None]) * ax[2]
            + origin
        )
        return pts.reshape(-1, 3)

    def to_index(self, world: Sequence[float]) -> np.ndarray:
        """Continuous voxel index of a world point."""
        d = np.asarray(world, dtype=np.float64) - np.asarray(self.origin, dtype=np.float64)
        return (self.axes_array @ d) / np.asarray(self.spacing, dtype=np.float64)

    def affine_lps(self) -> np.ndarray:
        """4x4 voxel-to-LPS affine."""
        a = np.eye(4)
        a[:3, :3] = self.axes_array.T * np.asarray(self.spacing)[None, :]
        a[:3, 3] = self.origin
        return a

    def affine_ras(self) -> np.ndarray:
        """4x4 voxel-to-RAS affine (NIfTI convention)."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine_lps()


def axial_grid(
    centre: Sequence[float],
    shape: Sequence[int],
    spacing: Sequence[float],
    thickness: float | None = None,
    tilt_deg: float = 0.0,
) -> Grid:
    """An axial grid centred on ``centre``; ``tilt_deg`` rotates it about the patient left-right axis (oblique)."""
    t = math.radians(tilt_deg)
    axes = ((1.0, 0.0, 0.0), (0.0, math.cos(t), -math.sin(t)), (0.0, math.sin(t), math.cos(t)))
    ax = np.asarray(axes)
    half = (np.asarray(shape, dtype=float) - 1) / 2 * np.asarray(spacing, dtype=float)
    origin = np.asarray(centre, dtype=float) - (half[:, None] * ax).sum(axis=0)
    return Grid(
        shape=tuple(int(s) for s in shape),  # type: ignore[arg-type]
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in origin),  # type: ignore[arg-type]
        axes=axes,
        thickness=thickness,
    )


def window_grid(centre: Sequence[float], half_extent_mm: Sequence[float], spacing: Sequence[float]) -> Grid:
    """A small axis-aligned grid covering ``centre +- half_extent_mm``, snapped to the spacing lattice."""
    spacing_a = np.asarray(spacing, dtype=float)
    c = np.asarray(centre, dtype=float)
    n = np.maximum(2 * np.ceil(np.asarray(half_extent_mm, dtype=float) / spacing_a) + 1, 1).astype(int)
    lo = np.floor((c - (n - 1) / 2 * spacing_a) / spacing_a) * spacing_a
    return Grid(
        shape=tuple(int(v) for v in n),  # type: ignore[arg-type]
        spacing=tuple(float(s) for s in spacing_a),  # type: ignore[arg-type]
        origin=tuple(float(v) for v in lo),  # type: ignore[arg-type]
    )


# ------------------------------------------------------------------------------------------------ lesion
def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))[None, :]
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@dataclass
class Lesion:
    """One sampled lesion: geometry, regions and per-phase levels (jitter and site contrast applied)."""

    label: int
    centre: np.ndarray
    radii: np.ndarray
    rotation: np.ndarray
    lobe_dirs: np.ndarray
    lobe_amp: np.ndarray
    lobe_phase: np.ndarray
    rim_width: float
    rim_irregularity: float
    centre_frac: float
    nodule_dirs: np.ndarray
    nodule_sigma: float
    halo_width: float
    capsule_width: float
    appearance: dict[str, PhaseAppearance]
    atypical: bool

    @property
    def class_name(self) -> str:
        return LESION_CLASSES[self.label]

    @property
    def diameter_mm(self) -> float:
        return float(2.0 * self.radii.mean())

    @property
    def bounding_radius(self) -> float:
        """Radius (mm) of a sphere containing the lesion, its halo and capsule."""
        outer = 1.0 + max(self.halo_width, self.capsule_width) + 0.1
        return float(self.radii.max() * (1.0 + self.lobe_amp.sum()) * outer)

    def fields(self, pts: np.ndarray, phase: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Inside weight, lesion level and perilesional factor at world points ``(N, 3)`` for ``phase``."""
        app = self.appearance[phase]
        m = (self.rotation / self.radii[None, :]).astype(np.float32)
        q = (pts - self.centre.astype(np.float32)) @ m
        rho = np.sqrt(np.einsum("ij,ij->i", q, q)) + np.float32(1e-6)
        proj = (q @ self.lobe_dirs.T.astype(np.float32)) / rho[:, None]  # cosines with the lobe directions
        s = np.ones_like(rho)
        for k in range(len(self.lobe_amp)):
            s += np.float32(self.lobe_amp[k]) * np.sin(3.0 * proj[:, k] + np.float32(self.lobe_phase[k]))
        r = rho / s
        edge = np.float32(0.6 / max(float(self.radii.mean()), 1.0))  # ~0.6 mm soft edge
        inside = 1.0 - _smoothstep(1.0 - edge, 1.0 + edge, r)

        v = np.full_like(r, app.body)
        if app.centre is not None and self.centre_frac > 0:
            w = 1.0 - _smoothstep(self.centre_frac - 0.08, self.centre_frac + 0.08, r)
            v += (app.centre - v) * w
        if app.rim is not None:
            rw = np.float32(self.rim_width)
            if self.rim_irregularity > 0:
                rw = rw * (1.0 + np.float32(self.rim_irregularity) * np.sin(5.0 * proj[:, 0]))
            w = _smoothstep(1.0 - rw - 0.06, 1.0 - rw + 0.06, r)
            v += (app.rim - v) * w
        if app.nodules is not None:
            # |q/s - 0.8 n|^2 = r^2 - 1.6 (q.n)/s + 0.64 for unit nodule directions n
            dots = (q @ self.nodule_dirs.T.astype(np.float32)) / s[:, None]
            d2 = (r * r)[:, None] - 1.6 * dots + 0.64
            w = np.exp(-d2 / np.float32(2.0 * self.nodule_sigma**2)) @ np.ones(dots.shape[1], dtype=np.float32)
            w = np.clip(w, 0.0, 1.0)
            if app.fill is not None:
                w = np.maximum(w, _smoothstep(1.0 - app.fill - 0.1, 1.0 - app.fill + 0.1, r))
            v += (app.nodules - v) * w

        out = np.ones_like(r)
        outside = 1.0 - inside
        if app.halo is not None and self.halo_width > 0:
            out += (app.halo - 1.0) * outside * (1.0 - _smoothstep(1.0, 1.0 + self.halo_width, r))
        if app.capsule is not None and self.capsule_width > 0:
            cw = self.capsule_width
            out += (app.capsule - 1.0) * outside * (1.0 - _smoothstep(1.0 + cw, 1.0 + cw + 0.05, r))
        return inside, v, out


def _texture(pts: np.ndarray, k: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Grid-independent procedural texture in [-1, 1]-ish: a sum of random plane waves."""
    t = np.cos(pts @ k.T.astype(np.float32) + phase.astype(np.float32))
    return t @ np.full(k.shape[0], 1.0 / math.sqrt(k.shape[0]), dtype=np.float32)


def _texture_waves(rng: np.random.Generator, wavelength_mm: float, n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    k = _unit_vectors(rng, n) * (2.0 * math.pi / wavelength_mm) * rng.uniform(0.7, 1.3, size=(n, 1))
    return k, rng.uniform(0, 2 * math.pi, size=n)


def sample_lesion(
    rng: np.random.Generator,
    label: int,
    site: SiteProfile,
    centre: Sequence[float] = (0.0, 0.0, 0.0),
    diameter_mm: float | None = None,
    size_range_mm: tuple[float, float] = (5.0, 60.0),
    atypical_fraction: float = 0.1,
    jitter: float = 0.1,
    atypical_variants: Mapping[int, Sequence[Mapping[str, PhaseAppearance]]] | None = None,
    size_spread: float = 1.0,
) -> Lesion:
    """Draw one lesion of class ``label``: size, lobulated shape, regions, per-phase levels.

    Args:
        rng: the generator all draws come from.
        label: class index (constants.LESION_CLASSES).
        site: site profile (contrast exponent).
        centre: world position (mm); the caller places lesions in the liver.
        diameter_mm: fixed mean diameter, or None to draw it from the class prior clipped to ``size_range_mm``.
        size_range_mm: clip range of the drawn diameter.
        atypical_fraction: probability of the class's atypical variant (ATYPICAL).
        jitter: log-sd of the per-patient, per-phase level jitter.
        atypical_variants: per class, atypical variants to draw one from (e.g. REALISTIC_ATYPICAL); None = ATYPICAL.
        size_spread: multiplies the log-sd of the class's diameter prior; default 1.

    Raises:
        ValueError: for an unknown label or an invalid size range / fraction.
    """
    if label not in APPEARANCE:
        raise ValueError(f"label must be in 0..{len(LESION_CLASSES) - 1}, got {label}.")
    if not 0.0 <= atypical_fraction <= 1.0:
        raise ValueError(f"atypical_fraction must be in [0, 1], got {atypical_fraction}.")
    lo, hi = size_range_mm
    if not 0 < lo <= hi:
        raise ValueError(f"size_range_mm must satisfy 0 < min <= max, got {size_range_mm}.")
    geo = CLASS_GEOMETRY[label]

    def rng_range(key: str, default: tuple[float, float]) -> float:
        a, b = geo.get(key, default)  # type: ignore[misc]
        return float(rng.uniform(a, b))

    median, sigma = geo["size"]  # type: ignore[misc]
    drawn = median * math.exp(rng.normal(0.0, sigma * size_spread)) if diameter_mm is None else None
    diameter = float(np.clip(drawn, lo, hi)) if drawn is not None else diameter_mm
    elong = np.array([rng_range("elongation", (0.8, 1.2)) for _ in range(3)])
    radii = diameter / 2.0 * elong / np.cbrt(elong.prod())
    n_lobes = 3
    lob = rng_range("lobulation", (0.04, 0.14))
    lobe_amp = rng.dirichlet(np.ones(n_lobes)) * lob
    n_nod_lo, n_nod_hi = geo.get("nodules", (4, 6))  # type: ignore[misc]
    nodule_dirs = _unit_vectors(rng, int(rng.integers(n_nod_lo, n_nod_hi + 1)))
    capsule_mm = rng_range("capsule_mm", (0.0, 0.0))

    atypical = bool(rng.uniform() < atypical_fraction)
    base = dict(APPEARANCE[label])
    if atypical and atypical_variants is not None:
        options = atypical_variants[label]
        base.update(options[int(rng.integers(len(options)))])
    elif atypical:
        base.update(ATYPICAL[label])
    if label == 6 and rng.uniform() < float(geo["fat_fraction"]):  # type: ignore[arg-type]
        base["Out Phase"] = replace(base["Out Phase"], body=0.65)  # intralesional fat: signal drop out of phase
    if "fill" in geo and base["C+V"].fill is not None:
        base["C+V"] = replace(base["C+V"], fill=rng_range("fill", (0.5, 0.5)))
    appearance = {
        phase: base[phase].scaled(math.exp(rng.normal(0.0, jitter)), site.contrast, rng, jitter) for phase in PHASES
    }
    return Lesion(
        label=int(label),
        centre=np.asarray(centre, dtype=np.float64),
        radii=radii,
        rotation=_random_rotation(rng),
        lobe_dirs=_unit_vectors(rng, n_lobes),
        lobe_amp=lobe_amp,
        lobe_phase=rng.uniform(0, 2 * math.pi, size=n_lobes),
        rim_width=rng_range("rim_width", (0.2, 0.3)),
        rim_irregularity=float(geo.get("rim_irregularity", 0.0)),  # type: ignore[arg-type]
        centre_frac=rng_range("centre_frac", (0.35, 0.5)) if label != 2 else 0.0,
        nodule_dirs=nodule_dirs,
        nodule_sigma=float(rng.uniform(0.14, 0.2)),
        halo_width=rng_range("halo_width", (0.0, 0.0)),
        capsule_width=capsule_mm / max(float(radii.mean()), 1.0),
        appearance=appearance,
        atypical=atypical,
    )


# ------------------------------------------------------------------------------------------------ patient
@dataclass
class Phantom:
    """One patient: anatomy, lesions, per-phase baselines and bias field."""

    site: SiteProfile
    lesions: list[Lesion]
    liver_centre: np.ndarray
    liver_semi: np.ndarray
    body_semi: np.ndarray
    phase_scale: dict[str, float]
    bias_coef: dict[str, np.ndarray]
    liver_texture: tuple[np.ndarray, np.ndarray]
    shifts: dict[str, np.ndarray] = field(default_factory=dict)
    #: background liver disease: liver level factor per phase and liver texture amplitude (normal: none, 0.03)
    liver_factor: dict[str, float] = field(default_factory=dict)
    liver_texture_amp: float = 0.03
    #: intrahepatic vessels: (point on the axis, unit direction, radius mm); drawn with the IVC's levels
    vessels: list[tuple[np.ndarray, np.ndarray, float]] = field(default_factory=list)

    # -- anatomy -------------------------------------------------------------------------------------
    def liver_rho(self, pts: np.ndarray) -> np.ndarray:
        q = (pts - self.liver_centre.astype(np.float32)) / self.liver_semi.astype(np.float32)
        return np.sqrt(np.einsum("ij,ij->i", q, q))

    def tissue(self, pts: np.ndarray) -> np.ndarray:
        """Tissue index (into ``_TISSUES``) at world points."""
        x, y, z = pts[:, 0], pts[:, 1], pts[:, 2]
        bx, by = float(self.body_semi[0]), float(self.body_semi[1])
        e_outer = (x / bx) ** 2 + (y / by) ** 2
        e_inner = (x / (bx - 16.0)) ** 2 + (y / (by - 14.0)) ** 2
        t = np.zeros(len(pts), dtype=np.int8)
        t[e_outer <= 1.0] = 1  # fat
        t[e_inner <= 1.0] = 2  # muscle / generic soft tissue
        t[self.liver_rho(pts) <= 1.0] = 3
        t[((x - 95) / 38) ** 2 + ((y - 35) / 45) ** 2 + ((z - 25) / 55) ** 2 <= 1.0] = 4  # spleen
        for sx in (-70.0, 75.0):  # kidneys, below the liver centre
            t[((x - sx) / 28) ** 2 + ((y - 58) / 30) ** 2 + ((z + 80) / 50) ** 2 <= 1.0] = 5
        t[(x + 25) ** 2 + (y - 45) ** 2 <= 12.0**2] = 6  # IVC
        t[(x - 18) ** 2 + (y - 55) ** 2 <= 11.0**2] = 7  # aorta
        t[x**2 + (y - 85) ** 2 <= 20.0**2] = 8  # vertebral body
        t[e_outer > 1.0] = 0
        return t

    def is_liver(self, pts: np.ndarray) -> np.ndarray:
        return self.tissue(np.asarray(pts, dtype=np.float32)) == 3

    # -- rendering -----------------------------------------------------------------------------------
    def relative_level(
        self, pts: np.ndarray, phase: str, slab_offsets: Sequence[np.ndarray] = (), masks: list | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Signal relative to the liver of ``phase`` at world points (no bias, texture or noise), and the
        texture amplitude per point.

        The anatomy is sampled at ``pts``; lesions are averaged over ``pts + offset`` for each slab offset
        (partial volume along the slice normal), only near each lesion. When ``masks`` is a list, one boolean
        array per lesion (voxel centre inside the lesion) is appended to it.
        """
        levels = np.asarray(_TISSUE_LEVELS[phase], dtype=np.float32) ** np.float32(self.site.contrast)
        tissue = self.tissue(pts)
        rel = levels[tissue]
        amp = np.full(len(pts), 0.03, dtype=np.float32)
        if self.liver_factor or self.vessels or self.liver_texture_amp != 0.03:
            liver = tissue == 3
            rel[liver] *= np.float32(self.liver_factor.get(phase, 1.0))
            amp[liver] = np.float32(self.liver_texture_amp)
            vessel_level = levels[_TISSUES.index("ivc")]
            for point, direction, radius in self.vessels:
                d = pts - point.astype(np.float32)
                along = d @ direction.astype(np.float32)
                dist = np.sqrt(np.maximum(np.einsum("ij,ij->i", d, d) - along * along, 0.0))
                w = (1.0 - _smoothstep(radius - 0.5, radius + 0.5, dist)) * liver
                rel += (vessel_level - rel) * w
                amp *= 1.0 - w
        offsets = list(slab_offsets) or [np.zeros(3, dtype=np.float32)]
        reach = max(float(np.linalg.norm(o)) for o in offsets)
        for lesion in self.lesions:
            dc = pts - lesion.centre.astype(np.float32)
            d2 = np.einsum("ij,ij->i", dc, dc)
            near = np.nonzero(d2 <= np.float32((lesion.bounding_radius + reach) ** 2))[0]
            if masks is not None:
                mask = np.zeros(len(pts), dtype=bool)
                if len(near):
                    mask[near] = lesion.fields(pts[near], phase)[0] >= 0.5
                masks.append(mask)
            if len(near) == 0:
                continue
            bg = rel[near]
            acc = np.zeros(len(near), dtype=np.float32)
            acc_in = np.zeros(len(near), dtype=np.float32)
            for off in offsets:
                inside, v, out = lesion.fields(pts[near] + off.astype(np.float32), phase)
                acc += bg * out * (1.0 - inside) + v * inside
                acc_in += inside
            rel[near] = acc / np.float32(len(offsets))
            het = np.float32(lesion.appearance[phase].heterogeneity)
            amp[near] += (het - amp[near]) * acc_in / np.float32(len(offsets))
        return rel, amp

    def bias(self, pts: np.ndarray, phase: str) -> np.ndarray:
        p = pts.astype(np.float32) / np.float32(200.0)
        x, y, z = p[:, 0], p[:, 1], p[:, 2]
        c = self.bias_coef[phase].astype(np.float32)
        return np.exp(c[0] * x + c[1] * y + c[2] * z + c[3] * x * x + c[4] * y * y + c[5] * x * y)


def sample_phantom(rng: np.random.Generator, site: SiteProfile) -> Phantom:
    """Draw a patient without lesions (anatomy jitter, per-phase baselines, bias field)."""
    common = rng.normal(0.0, site.bias, size=6)
    return Phantom(
        site=site,
        lesions=[],
        liver_centre=np.array([-55.0, -8.0, 5.0]) + rng.normal(0, 4.0, size=3),
        liver_semi=np.array([88.0, 80.0, 92.0]) * rng.uniform(0.92, 1.08, size=3),
        body_semi=np.array([165.0, 122.0]) * rng.uniform(0.93, 1.07, size=2),
        phase_scale={p: PHASE_BASE[p] * site.intensity_scale * math.exp(rng.normal(0.0, 0.1)) for p in PHASES},
        bias_coef={p: common + rng.normal(0.0, site.bias * 0.25, size=6) for p in PHASES},
        liver_texture=_texture_waves(rng, wavelength_mm=10.0, n=4),
    )


def sample_phase_shifts(rng: np.random.Generator, max_mm: float) -> dict[str, np.ndarray]:
    """Rigid misregistration per phase: uniform direction, magnitude U(0, max_mm); C+A is the reference (0)."""
    shifts = {}
    for phase in PHASES:
        if phase == REFERENCE_PHASE or max_mm <= 0:
            shifts[phase] = np.zeros(3)
        else:
            shifts[phase] = _unit_vectors(rng, 1)[0] * rng.uniform(0.0, max_mm)
    return shifts


def render_phase(
    phantom: Phantom,
    phase: str,
    grid: Grid,
    rng: np.random.Generator,
    partial_volume: int | None = None,
    noise: bool = True,
    masks: list | None = None,
) -> np.ndarray:
    """Render ``phase`` of ``phantom`` on ``grid`` -> float32 ``[X, Y, Z]`` (non-negative, scanner units).

    Args:
        phantom: the patient; its ``shifts[phase]`` (mm) moves the anatomy for this phase.
        phase: phase name (constants.PHASES).
        grid: where to sample.
        rng: noise generator.
        partial_volume: number of sub-slices the lesions are averaged over across the slice thickness;
            None = automatic (3 when the slab is thicker than 1.5x the in-plane spacing, else 1).
        noise: add Rician noise.
        masks: if a list, the boolean ``[X, Y, Z]`` mask of each lesion on this grid is appended to it
            (same as :func:`lesion_mask`, without a second evaluation).
    """
    if phase not in PHASE_BASE:
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}.")
    if partial_volume is None:
        partial_volume = 3 if grid.slab > 1.5 * min(grid.spacing[:2]) else 1
    shift = phantom.shifts.get(phase, np.zeros(3)).astype(np.float32)
    normal = grid.axes_array[2]
    offsets = [normal * ((i + 0.5) / partial_volume - 0.5) * grid.slab for i in range(partial_volume)]
    pts_all = grid.points() - shift
    signal = np.empty(len(pts_all), dtype=np.float32)
    mask_all = np.zeros((len(phantom.lesions), len(pts_all)), dtype=bool)
    for start in range(0, len(pts_all), _CHUNK):  # chunks that stay in cache: ~5x faster than whole volumes
        pts = pts_all[start : start + _CHUNK]
        flat_masks: list | None = [] if masks is not None else None
        rel, amp = phantom.relative_level(pts, phase, offsets, flat_masks)
        if flat_masks:
            mask_all[:, start : start + _CHUNK] = np.stack(flat_masks)
        rel *= 1.0 + amp * _texture(pts, *phantom.liver_texture)
        signal[start : start + _CHUNK] = rel * np.float32(phantom.phase_scale[phase]) * phantom.bias(pts, phase)
    if masks is not None:
        masks.extend(m.reshape(grid.shape) for m in mask_all)
    signal = signal.reshape(grid.shape)
    if noise:
        sigma = phantom.site.noise * phantom.phase_scale[phase] * (2.0 if phase == "DWI" else 1.0)
        n = rng.standard_normal((2, *signal.shape), dtype=np.float32) * np.float32(sigma)
        signal = np.sqrt((signal + n[0]) ** 2 + n[1] ** 2)
    return signal


def lesion_mask(phantom: Phantom, lesion: Lesion, phase: str, grid: Grid) -> np.ndarray:
    """Boolean ``[X, Y, Z]`` mask of ``lesion`` (voxel centre inside) on ``grid`` for ``phase``'s shift."""
    shift = phantom.shifts.get(phase, np.zeros(3)).astype(np.float32)
    pts = grid.points() - shift
    mask = np.zeros(len(pts), dtype=bool)
    c = lesion.centre.astype(np.float32)
    near = np.nonzero(((pts - c) ** 2).sum(axis=1) <= np.float32(lesion.bounding_radius**2))[0]
    if len(near):
        inside, _, _ = lesion.fields(pts[near], phase)
        mask[near] = inside >= 0.5
    return mask.reshape(grid.shape)


def place_lesion_centre(
    rng: np.random.Generator,
    phantom: Phantom,
    radius_mm: float,
    z_range: tuple[float, float] | None = None,
    others: Sequence[Lesion] = (),
    max_tries: int = 200,
) -> np.ndarray:
    """Draw a lesion centre inside the liver: the sphere of 0.8 x radius around it must be liver, away from
    other lesions, and within ``z_range`` (mm) if given.

    Raises:
        RuntimeError: when no position is found in ``max_tries`` draws (lesion too large for the liver/coverage).
    """
    sphere = np.concatenate([np.zeros((1, 3)), _unit_vectors(np.random.default_rng(0), 26)], axis=0)
    for _ in range(max_tries):
        q = _unit_vectors(rng, 1)[0] * rng.uniform(0.0, 0.85) ** (1 / 3)
        c = phantom.liver_centre + q * phantom.liver_semi
        if z_range is not None:  # draw z inside the covered slab (thin coverage: the lesion may extend beyond it)
            m = min(radius_mm, 0.45 * (z_range[1] - z_range[0]))
            c[2] = rng.uniform(z_range[0] + m, z_range[1] - m)
        if not phantom.is_liver(c + sphere * (0.8 * radius_mm)).all():
            continue
        if any(np.linalg.norm(c - o.centre) < radius_mm + o.bounding_radius + 5.0 for o in others):
            continue
        return c
    raise RuntimeError(f"could not place a lesion of radius {radius_mm:.1f} mm in the liver after {max_tries} tries.")


def study_grids(
    site: SiteProfile,
    matrix: Sequence[int] = (256, 256),
    num_slices: int | None = None,
    mixed_geometry: bool = False,
    centre_z: float = 5.0,
) -> dict[str, Grid]:
    """Full-FOV acquisition grids of one study, per phase.

    T2WI, dual echo and the dynamic phases: ``matrix`` over the site FOV, ``num_slices`` (site default) of the
    site slice thickness, contiguous. DWI: in-plane spacing x ``site.dwi_spacing_factor`` and thicker slices over
    the same coverage. ``mixed_geometry`` makes T2WI oblique (10 degrees about left-right) with a non-square
    matrix, and shifts the C+Delay coverage by 1.5 slices with 2 extra slices.
    """
    if len(matrix) != 2 or min(matrix) < 8:
        raise ValueError(f"matrix must be (columns, rows) >= 8, got {tuple(matrix)}.")
    n = int(num_slices if num_slices is not None else site.num_slices)
    if n < 4:
        raise ValueError(f"num_slices must be >= 4, got {n}.")
    cols, rows = int(matrix[0]), int(matrix[1])
    sp = site.fov_mm / max(cols, rows)
    th = site.slice_thickness
    centre = (0.0, 0.0, centre_z)
    coverage = n * th
    grids = {p: axial_grid(centre, (cols, rows, n), (sp, sp, th), th) for p in PHASES}
    dcols = max(int(round(cols / site.dwi_spacing_factor)), 8)
    drows = max(int(round(rows / site.dwi_spacing_factor)), 8)
    dsp = site.fov_mm / max(dcols, drows)
    dn = max(int(round(coverage / site.dwi_thickness)), 4)
    grids["DWI"] = axial_grid(centre, (dcols, drows, dn), (dsp, dsp, site.dwi_thickness), site.dwi_thickness)
    if mixed_geometry:
        tc, tr = int(round(cols * 1.25)), int(round(rows * 1.0))
        tsp = site.fov_mm / max(tc, tr)
        grids["T2WI"] = axial_grid(centre, (tc, tr, n), (tsp, tsp, th), th, tilt_deg=10.0)
        grids["C+Delay"] = axial_grid((0.0, 0.0, centre_z + 1.5 * th), (cols, rows, n + 2), (sp, sp, th), th)
    return grids


def coverage_z(grids: Mapping[str, Grid], half_width_mm: float = 100.0) -> tuple[float, float]:
    """z range (mm) inside every grid's slab for all ``|x|, |y| <= half_width_mm`` (covers the liver)."""
    lo, hi = -1e9, 1e9
    for g in grids.values():
        n = g.axes_array[2]
        s = float(n @ np.asarray(g.origin))
        s0, s1 = s - g.spacing[2] / 2, s + (g.shape[2] - 0.5) * g.spacing[2]
        for x in (-half_width_mm, half_width_mm):
            for y in (-half_width_mm, half_width_mm):
                a = (s0 - n[0] * x - n[1] * y) / n[2]
                b = (s1 - n[0] * x - n[1] * y) / n[2]
                lo, hi = max(lo, min(a, b)), min(hi, max(a, b))
    return lo, hi


def sample_study(
    rng: np.random.Generator,
    site: SiteProfile,
    labels: Sequence[int],
    z_range: tuple[float, float] | None = None,
    size_range_mm: tuple[float, float] = (5.0, 60.0),
    atypical_fraction: float = 0.1,
    jitter: float = 0.1,
    misregistration_mm: float | None = None,
) -> Phantom:
    """A patient with one lesion per entry of ``labels``, placed in the liver within ``z_range``."""
    phantom = sample_phantom(rng, site)
    if z_range is not None:  # lesions no thicker than the covered slab
        top = max(size_range_mm[0], 0.9 * (z_range[1] - z_range[0]))
        size_range_mm = (size_range_mm[0], min(size_range_mm[1], top))
    for label in labels:
        for _attempt in range(5):
            lesion = sample_lesion(
                rng, int(label), site, size_range_mm=size_range_mm, atypical_fraction=atypical_fraction, jitter=jitter
            )
            try:
                lesion.centre = place_lesion_centre(
                    rng, phantom, float(lesion.radii.max() * (1 + lesion.lobe_amp.sum())), z_range, phantom.lesions
                )
                break
            except RuntimeError:
                size_range_mm = (size_range_mm[0], max(size_range_mm[0], lesion.diameter_mm * 0.7))
        else:
            raise RuntimeError(f"could not place lesion {len(phantom.lesions) + 1} (class {label}) in the liver.")
        phantom.lesions.append(lesion)
    mis = site.misregistration_mm if misregistration_mm is None else misregistration_mm
    phantom.shifts = sample_phase_shifts(rng, mis)
    return phantom


def check_appearance_tables(appearance: Mapping[int, Mapping[str, PhaseAppearance]] = APPEARANCE) -> None:
    """Import-time check: every class has every phase."""
    for label in range(len(LESION_CLASSES)):
        missing = [p for p in PHASES if p not in appearance.get(label, {})]
        if missing:
            raise ValueError(f"APPEARANCE for class {label} lacks phases {missing}.")


check_appearance_tables()
