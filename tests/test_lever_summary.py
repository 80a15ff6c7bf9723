"""The lever tables' arithmetic (engines.experiments): what is averaged over which runs, the AdaBN halves, and
which reference each lever is judged against."""

from __future__ import annotations

from pathlib import Path

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


def _summary(pbc: float, tecom: float, cv: float) -> dict:
    return {"pbc_test_balanced_accuracy": [pbc, 0.01], "tecom_balanced_accuracy": [tecom, 0.02],
            "cellavision-blog_balanced_accuracy": [cv, 0.03], "lomo_mean_distance": [0.5, 0.1]}


def test_lever_table_judges_each_lever_against_the_reference_run_beside_it() -> None:
    from engines.experiments.lever_table import rows

    old = {"per_class": 200, "epochs": 4, "seeds": 3,
           "summary": {"bn+basic": _summary(0.8, 0.4, 0.45), "bn+strong": _summary(0.6, 0.7, 0.4)}}
    rerun = {"per_class": 200, "epochs": 4, "seeds": 3,
             "summary": {"bn+strong": _summary(0.62, 0.65, 0.42), "bn+strong+res32": _summary(0.6, 0.6, 0.4)}}
    table = {(r["file"], r["variant"]): r for r in rows([("old.json", old), ("rerun.json", rerun)])}
    lever = table[("rerun.json", "bn+strong+res32")]
    assert lever["reference_file"] == "rerun.json"  # the re-run beside it, not the older one
    assert lever["tecom_balanced_accuracy_delta"] == -0.05
    assert lever["lever"] == "BatchNorm + strong + 32 px detail"
    # the augmentation alone is judged against basic, and only where basic was re-run beside it
    assert table[("old.json", "bn+strong")]["tecom_balanced_accuracy_delta"] == 0.3
    assert ("rerun.json", "bn+strong") not in table


def test_lever_table_never_compares_runs_of_different_budgets() -> None:
    from engines.experiments.lever_table import rows

    short = {"per_class": 200, "epochs": 4, "summary": {"bn+strong": _summary(0.6, 0.7, 0.4)}}
    longer = {"per_class": 400, "epochs": 10, "summary": {"gn+strong": _summary(0.8, 0.5, 0.4)}}
    (row,) = rows([("short.json", short), ("longer.json", longer)])
    assert row["reference_file"] is None and "tecom_balanced_accuracy_delta" not in row


def test_lever_table_command_refuses_a_missing_file(tmp_path, capsys) -> None:
    from engines.experiments.lever_table import main

    assert main([str(tmp_path / "absent.json")]) == 2
    assert "no such result file" in capsys.readouterr().err


def test_every_measured_variant_builds_the_settings_its_result_file_recorded() -> None:
    """The variant grammar replaced hand-kept tables; the recorded runs (and their resume keys) must not move."""
    import json

    from engines.experiments.norm_augment import recorded
    from engines.experiments.variants import MEASURED

    checked = 0
    for path in sorted((Path(__file__).parents[1] / "engines/experiments/results").glob("*.json")):
        variants = json.loads(path.read_text()).get("variants")
        if not isinstance(variants, dict):
            continue
        for name, settings in variants.items():
            if not isinstance(settings, dict) or "norm" not in settings:
                continue
            assert name in MEASURED, f"{path.name}: {name} is not listed as measured"
            now = recorded(name)
            assert {k: now[k] for k in settings} == settings, f"{path.name}: {name}"
            checked += 1
    assert checked >= 20


def test_unknown_variant_is_refused_with_the_grammar(tmp_path, capsys) -> None:
    from engines.experiments.norm_augment import main

    with pytest.raises(SystemExit) as stop:
        main(["--cells", str(tmp_path / "c.npz"), "--out", str(tmp_path / "o.json"), "--variants", "zz+basic"])
    assert stop.value.code == 2
    assert "expected <bn|gn|ln>+<basic|strong>" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


def test_a_new_combination_needs_no_table_entry() -> None:
    from engines.experiments.norm_augment import lever_config

    cfg = lever_config("gn+strong+xfix", seed=1, epochs=2, per_class=10, cells=Path("cells.npz"))
    assert (cfg.norm, cfg.augment, cfg.consistency, cfg.foreign_cells) == ("group", "strong", 1.0, "cells.npz")
    assert lever_config("ln+basic", 0, 2, 10, Path("cells.npz")).foreign_cells == ""



def test_every_lever_the_harness_can_run_has_a_description_in_the_table() -> None:
    """One grammar serves the harness and the table: a new lever is described the moment it can run."""
    from engines.experiments.lever_table import describe
    from engines.experiments.variants import LEVERS, MEASURED, overrides

    for lever in LEVERS:
        assert describe(f"gn+strong+{lever}").startswith("GroupNorm (8 groups) + strong + ")
        assert overrides(f"bn+basic+{lever}")["augment"] == "basic"
    assert all(describe(name) for name in MEASURED)
