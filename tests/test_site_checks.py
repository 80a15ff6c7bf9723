"""What a site model is checked against on the site's own cells: the alarm self-check (random halves
agree with each other, a recording that drifted half-way is caught by comparing its halves) and
whether adapting beat the base model on the reviewed cells."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="engines.site_model trains with torch (the [train] extra)")

from edge.drift import FEATURES
from engines.site_model import alarm_self_check


def site_cells(n: int, shift_second_half: float, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    labels = rng.choice(["neutrophil", "lymphocyte", "eosinophil"], size=n, p=[0.6, 0.3, 0.1])
    values = {name: rng.normal(0.5, 0.05, n).astype(np.float32) for name in FEATURES}
    values["colour_1"][n // 2:] -= shift_second_half
    return labels, values


def test_random_halves_of_a_steady_site_do_not_alarm() -> None:
    labels, values = site_cells(300, 0.0)
    check = alarm_self_check(labels, values, streams=5)
    assert check["checks"] > 0 and check["alarm_share"] == 0.0
    assert alarm_self_check(labels, values, ordered=True, streams=5)["alarm_share"] == 0.0


def test_a_recording_that_drifted_half_way_alarms_only_on_ordered_halves() -> None:
    labels, values = site_cells(300, 0.05)  # one standard deviation of green, like BCCD's drift
    assert alarm_self_check(labels, values, ordered=True, streams=5)["alarm_share"] > 0.5
    assert alarm_self_check(labels, values, streams=5)["alarm_share"] < 0.05


def test_too_few_cells_per_class_is_reported_as_not_measured() -> None:
    labels, values = site_cells(12, 0.0)
    assert alarm_self_check(labels, values) == {"checks": 0, "alarm_share": None}


def test_adapt_warns_when_the_site_model_is_no_better_on_the_sites_own_cells() -> None:
    from edge.commands.adapt import site_model_helped

    def cv(base: float, site: float, n: int = 40) -> dict:
        return {"base": {"balanced_accuracy": base, "n": n}, "site": {"balanced_accuracy": site, "n": n}}

    assert site_model_helped(cv(0.40, 0.80))
    assert not site_model_helped(cv(0.80, 0.80))
    assert not site_model_helped(cv(0.80, 0.81))  # one cell in 40 is noise
    assert not site_model_helped(cv(0.80, 0.70))
