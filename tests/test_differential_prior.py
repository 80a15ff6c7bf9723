"""Calibrating a site's class balance on normal control smears (engines/differential_prior.py and
``cytoedge adapt --normal-controls``): the offsets make control cells read as a normal differential, they
live in the exported head, and a one-sided confusion (neutrophils read as eosinophils) is undone."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="adaptation trains with torch (the [train] extra)")

from conftest import SAMPLES, run_cli  # noqa: E402

from edge.modelmeta import ModelMetadata  # noqa: E402
from engines import differential_prior  # noqa: E402
from engines.adapt import AdaptConfig, adapt_model, method_for, predict_probs  # noqa: E402
from engines.baseline import BaselineCNN  # noqa: E402

CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
EOS, LYM, NEU = CLASSES.index("eosinophil"), CLASSES.index("lymphocyte"), CLASSES.index("neutrophil")


def posteriors(true: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A foreign microscope as the (overconfident) network sees it: neutrophils read as eosinophils (logit 4
    against 0), but less firmly than real eosinophils (12 against 0), so the ranking between the two is
    intact; every other class is read right."""
    logits = np.zeros((len(true), len(CLASSES)))
    for i, t in enumerate(true):
        if t == NEU:
            logits[i, EOS] = 4 + rng.normal(0, 0.5)
        elif t == EOS:
            logits[i, EOS] = 12 + rng.normal(0, 0.5)
        else:
            logits[i, t] = 8 + rng.normal(0, 0.5)
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def normal_smear(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.choice(len(CLASSES), size=n, p=differential_prior.target_shares(CLASSES))


def test_fitted_offsets_make_the_control_cells_average_to_a_normal_differential() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(len(CLASSES)) * 0.3, size=400)
    target = differential_prior.target_shares(CLASSES)
    offsets = differential_prior.fit_offsets(probs, target)
    assert np.allclose(differential_prior.apply_offsets(probs, offsets).mean(0), target, atol=1e-3)
    assert offsets.max() == 0.0


def test_offsets_undo_a_one_sided_confusion_while_real_eosinophils_stay_eosinophils() -> None:
    rng = np.random.default_rng(1)
    control = normal_smear(500, rng)
    offsets = differential_prior.fit_offsets(posteriors(control, rng), differential_prior.target_shares(CLASSES))
    # A later patient with an eosinophilia (20% eosinophils), read with the control's offsets.
    patient = rng.choice([NEU, EOS, LYM], size=300, p=[0.5, 0.2, 0.3])
    before = posteriors(patient, rng).argmax(1)
    after = differential_prior.apply_offsets(posteriors(patient, rng), offsets).argmax(1)
    assert np.mean(before[patient == NEU] == NEU) == 0.0
    assert np.mean(after[patient == NEU] == NEU) > 0.95
    assert np.mean(after[patient == EOS] == EOS) > 0.95
    assert 0.15 < np.mean(after == EOS) < 0.25  # the eosinophilia still shows


def test_too_few_control_cells_are_refused_with_the_minimum_named() -> None:
    probs = np.full((differential_prior.MIN_CELLS - 1, len(CLASSES)), 1 / len(CLASSES))
    with pytest.raises(ValueError, match=f"at least {differential_prior.MIN_CELLS} white cells"):
        differential_prior.fit_offsets(probs, differential_prior.target_shares(CLASSES))


def test_a_simulated_control_run_follows_the_normal_differential_over_the_classes_present() -> None:
    rng = np.random.default_rng(2)
    labels = np.repeat([NEU, LYM, EOS], [50, 50, 50])  # a curated set: every class equally often
    drawn = differential_prior.control_sample(np.arange(len(labels)), labels, CLASSES, rng)
    target = differential_prior.target_shares(CLASSES)[[NEU, LYM, EOS]]
    shares = np.bincount(labels[drawn], minlength=len(CLASSES))[[NEU, LYM, EOS]] / len(drawn)
    assert len(drawn) == len(labels)
    assert np.allclose(shares, target / target.sum(), atol=0.08)


def test_a_simulated_control_run_can_follow_a_given_donors_differential() -> None:
    rng = np.random.default_rng(5)
    labels = np.repeat([NEU, LYM], [100, 100])
    donor = np.zeros(len(CLASSES))
    donor[[NEU, LYM]] = 0.25, 0.75  # a lymphocytosis
    drawn = differential_prior.control_sample(np.arange(len(labels)), labels, CLASSES, rng, donor)
    assert abs(np.mean(labels[drawn] == LYM) - 0.75) < 0.08


def test_offsets_folded_into_the_head_are_what_the_model_then_predicts() -> None:
    torch.manual_seed(0)
    meta = ModelMetadata(name="tiny", version="0", classes=CLASSES, input_size=16, mean=[0.5] * 3, std=[0.25] * 3,
                         um_per_px=1.0, field_um=16.0, temperature=1.7)
    model = BaselineCNN(len(CLASSES), stem=4, widths=(8, 8)).eval()
    crops = np.random.default_rng(3).integers(0, 255, (64, 16, 16, 3), dtype=np.uint8)
    offsets = np.linspace(-3.0, 0.0, len(CLASSES))
    expected = differential_prior.apply_offsets(predict_probs(model, crops, meta), offsets)
    differential_prior.fold_into_head(model.head, offsets, meta.temperature)
    assert np.allclose(predict_probs(model, crops, meta), expected, atol=1e-4)


def test_a_frames_only_site_model_reads_its_controls_as_normal_only_when_they_were_declared_normal() -> None:
    torch.manual_seed(0)
    meta = ModelMetadata(name="tiny", version="0", classes=CLASSES, input_size=16, mean=[0.5] * 3, std=[0.25] * 3,
                         um_per_px=1.0, field_um=16.0)
    model = BaselineCNN(len(CLASSES), stem=4, widths=(8, 8)).eval()
    crops = np.random.default_rng(4).integers(0, 255, (120, 16, 16, 3), dtype=np.uint8)
    empty, no_labels = crops[:0], np.zeros(0, np.int64)
    plain = adapt_model(copy.deepcopy(model), meta, crops, empty, no_labels, method_for(0), log=lambda *_: None)
    calibrated = adapt_model(copy.deepcopy(model), meta, crops, empty, no_labels, method_for(0, normal_controls=True),
                             log=lambda *_: None)
    target = differential_prior.target_shares(CLASSES)
    assert np.allclose(predict_probs(calibrated, crops, meta).mean(0), target, atol=2e-3)
    assert not np.allclose(predict_probs(plain, crops, meta).mean(0), target, atol=0.05)
    assert AdaptConfig().normal_differential is False and method_for(0).normal_differential is False


def test_reviewed_cells_set_the_class_balance_so_normal_controls_add_no_calibration_to_fine_tuning() -> None:
    assert method_for(50, normal_controls=True) == method_for(50)
    assert method_for(50).layers == "all" and not method_for(50).normal_differential


@pytest.mark.slow
def test_cytoedge_adapt_with_normal_controls_writes_a_site_model_that_reads_the_controls_as_normal(
        bccd_dir: Path, tmp_path: Path) -> None:
    store, frames, config = tmp_path / "store", tmp_path / "controls", tmp_path / "site.toml"
    config.write_text(f'[microscope]\num_per_px = 0.075\n\n[model]\nstore = "{store}"\n')
    frames.mkdir()
    for path in sorted((bccd_dir / "JPEGImages").glob("*.jpg"))[:120]:
        (frames / path.name).symlink_to(path)
    result = run_cli("adapt", "--frames", str(frames), "--normal-controls", "--config", str(config),
                     "--name", "site-controls", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    card = json.loads((store / "site-controls" / "card.json").read_text())
    check = card["control_differential"]  # measured through the exported ONNX file
    assert card["method"]["normal_differential"] and check["cells"] >= differential_prior.MIN_CELLS
    distance = 0.5 * sum(abs(check["site"][c] - check["normal"][c]) for c in check["normal"])
    assert distance < 0.1
    assert distance < 0.5 * sum(abs(check["base"][c] - check["normal"][c]) for c in check["normal"])
    assert "Calibrated on normal control smears" in (store / "site-controls" / "card.md").read_text()
    # BCCD frames hold more platelets than white cells: most were left out of the batch-norm statistics.
    assert card["data"]["platelets_left_out_of_batchnorm"] > 0 and card["data"]["pbc_replay_crops"] == 0


def test_cytoedge_adapt_refuses_normal_controls_with_too_few_white_cells(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text(f'[microscope]\num_per_px = 0.075\n\n[model]\nstore = "{tmp_path / "store"}"\n')
    result = run_cli("adapt", "--frames", str(SAMPLES), "--normal-controls", "--config", str(config), timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"--normal-controls needs at least {differential_prior.MIN_CELLS} white cells" in result.stderr
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def test_batch_norm_pool_keeps_every_white_cell_and_platelets_only_up_to_their_training_share() -> None:
    from edge.sitedata import TRAINING_PLATELET_SHARE, Unlabelled, batchnorm_pool

    kinds = ["wbc"] * 100 + ["platelet"] * 150
    crops = np.arange(len(kinds), dtype=np.uint8).repeat(3).reshape(-1, 1, 1, 3)
    pool, dropped = batchnorm_pool(Unlabelled(crops, kinds))
    kept = pool[:, 0, 0, 0]
    assert set(range(100)) <= set(kept.tolist())
    assert dropped == 150 - (len(pool) - 100)
    assert abs((len(pool) - 100) / len(pool) - TRAINING_PLATELET_SHARE) < 0.01
    few = Unlabelled(crops[:110], kinds[:110])  # 10 platelets among 100 white cells: all kept
    assert batchnorm_pool(few)[1] == 0 and len(batchnorm_pool(few)[0]) == 110
