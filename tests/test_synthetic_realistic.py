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
"""The realistic preset: class imbalance, look-alike variants, background liver disease, vessels, breath-holds."""

from __future__ import annotations

import numpy as np
import pytest
from scripts import synthetic
from scripts._synth_phantom import ATYPICAL, REALISTIC_ATYPICAL
from scripts.constants import LESION_CLASSES, PHASES
from scripts.synthetic import PRESETS, SynthOptions, render_case

REALISTIC = SynthOptions(**PRESETS["realistic"]["options"])
HCC = LESION_CLASSES.index("hepatocellular_carcinoma")


def ring_median(crop: np.ndarray) -> float:
    """Median of the outer in-plane margin (mostly liver)."""
    return float(np.median(np.concatenate([crop[:6].ravel(), crop[-6:].ravel()])))


def lesion_mean(crop: np.ndarray) -> float:
    x, y, z = crop.shape
    return float(crop[x // 2 - 1 : x // 2 + 2, y // 2 - 1 : y // 2 + 2, z // 2].mean())


def test_preset_is_the_default_and_imbalanced():
    assert synthetic.DEFAULT_PRESET == "realistic" and synthetic.DEFAULT_DATASET_SPEC["preset"] == "realistic"
    counts = PRESETS["realistic"]["num_cases_per_class"]
    assert counts[HCC] == max(counts) and counts[HCC] / min(counts) == pytest.approx(157 / 46, rel=0.1)
    assert REALISTIC.size_range_mm == (5.0, 100.0) and REALISTIC.misregistration_min_mm == 5.0
    assert all(len(REALISTIC_ATYPICAL[c]) >= 2 for c in range(7)) and set(ATYPICAL) == set(REALISTIC_ATYPICAL)
    assert synthetic.default_dataset_name("classic") != synthetic.default_dataset_name()
    for bad in ({"atypical_variants": "odd"}, {"cirrhosis_probability": (0.5,)}, {"vessels": (2, 1)}):
        with pytest.raises(ValueError):
            SynthOptions(**bad)


def test_background_liver_disease_and_vessels():
    quiet = {"noise_scale": 0.0, "jitter": 0.0, "atypical_fraction": 0.0, "size_range_mm": (25.0, 25.0)}
    normal, meta = render_case(np.random.default_rng(3), 0, "site_a", SynthOptions(**quiet, vessels=(0, 0)))
    assert "fatty_liver" not in meta  # the classic path draws nothing extra
    fatty, meta = render_case(np.random.default_rng(3), 0, "site_a", SynthOptions(**quiet, fatty_liver_probability=1))
    assert meta["fatty_liver"] and not meta["cirrhotic"]
    drop = ring_median(fatty["Out Phase"][0]) / ring_median(fatty["In Phase"][0])
    assert drop < 0.75 * ring_median(normal["Out Phase"][0]) / ring_median(normal["In Phase"][0])
    cirrhotic, meta = render_case(
        np.random.default_rng(3), HCC, "site_a", SynthOptions(**quiet, cirrhosis_probability=(1.0,) * 7)
    )
    flat, _ = render_case(np.random.default_rng(3), HCC, "site_a", SynthOptions(**quiet))
    assert meta["cirrhotic"]
    assert np.std(cirrhotic["T2WI"][0][:6]) > 1.5 * np.std(flat["T2WI"][0][:6])  # coarse nodular parenchyma
    vessels, meta = render_case(np.random.default_rng(3), 0, "site_a", SynthOptions(**quiet, vessels=(3, 3)))
    assert meta["vessels"] == 3
    bright = [float((c["C+V"][0] > 1.6 * ring_median(c["C+V"][0])).mean()) for c in (normal, vessels)]
    assert bright[1] > bright[0] + 0.002  # enhancing portal-venous vessels next to the lesion


def test_realistic_cases_render_with_breath_hold_shifts():
    sizes = []
    for k in range(4):
        crops, meta = render_case(np.random.default_rng([9, k]), HCC, "site_b", REALISTIC)
        assert set(crops) == set(PHASES) and all(np.isfinite(c[0]).all() for c in crops.values())
        sizes.append(meta["diameter_mm"])
    assert all(5.0 <= s <= 101.0 for s in sizes) and max(sizes) > 60  # geometric mean of the radii clipped to 100
    shifts = synthetic._breath_hold_shifts(np.random.default_rng(0), 5.0, 20.0)
    lengths = [np.linalg.norm(v) for p, v in shifts.items() if p != "C+A"]
    assert np.linalg.norm(shifts["C+A"]) == 0 and all(5.0 <= n <= 20.0 for n in lengths)
