"""The lever tables' arithmetic (engines.experiments): what is averaged over which runs, and the AdaBN halves."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")


def _run(val: float, lomo: float, seen: float | None = None) -> dict:
    run = {"pbc_val_balanced_accuracy": val, "pbc_test_balanced_accuracy": val, "lomo_mean_distance": lomo,
           "tecom": {"balanced_accuracy": 0.5}, "cellavision-blog": {"balanced_accuracy": 0.4}}
    if seen is not None:
        run["lomo_seen_mean_distance"] = seen
    return run


def test_leave_one_out_means_use_only_runs_whose_folds_are_done() -> None:
    from engines.experiments.norm_augment import summarise

    # seed 2's folds are not finished: its lomo figure is still the "seen" one and must not be averaged in
    summary = summarise([_run(0.8, 0.6, seen=0.5), _run(0.7, 0.8, seen=0.7), _run(0.9, 0.1)])
    assert summary["lomo_mean_distance"] == [0.7, 0.1]
    assert summary["lomo_seen_mean_distance"] == [0.6, 0.1]
    assert summary["pbc_val_balanced_accuracy"] == [0.8, round(float(np.std([0.8, 0.7, 0.9])), 4)]


def test_runs_without_foreign_cells_average_every_seed() -> None:
    from engines.experiments.norm_augment import summarise

    summary = summarise([_run(0.8, 0.6), _run(0.6, 0.4)])
    assert summary["lomo_mean_distance"] == [0.5, 0.1]
    assert "lomo_seen_mean_distance" not in summary


def test_adabn_halves_are_fixed_disjoint_and_cover_the_set() -> None:
    from engines.experiments.adabn_levers import halves

    test, pool = halves(301)
    again, _ = halves(301)
    assert np.array_equal(test, again)
    assert len(test) == 150 and len(pool) == 151
    assert sorted(np.concatenate([test, pool]).tolist()) == list(range(301))
