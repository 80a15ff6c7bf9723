"""Fourier amplitude mixing (engines.amplitude_mix): a crop keeps its phase (where its edges are) and takes
some of a foreign donor's amplitude spectrum (its colour, contrast and blur); training uses it on the labelled
PBC crops only, and the exported model is the plain one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import smoke_pbc_root


def _cells(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(30, 220, (n, 16, 16, 3), dtype=np.uint8)


def test_a_donor_with_the_crops_own_spectrum_changes_nothing() -> None:
    from engines.amplitude_mix import amplitude_mix

    crop = _cells(1, 0)
    out = amplitude_mix(crop, crop.copy(), np.random.default_rng(1), eta=1.0, p=1.0)
    assert np.abs(out.astype(int) - crop).max() <= 1  # rounding only


def test_a_flat_donor_moves_the_mean_colour_and_scales_the_detail_keeping_its_pattern() -> None:
    """A flat donor has amplitude only at zero frequency, so the mix is exactly: the crop's detail times
    (1 - lam), plus a mean colour between the crop's and the donor's."""
    from engines.amplitude_mix import amplitude_mix

    crops = _cells(4, 2)
    flat = np.full((1, 16, 16, 3), 240, np.uint8)
    out = amplitude_mix(crops, flat, np.random.default_rng(3), eta=1.0, p=1.0).astype(float)
    for before, after in zip(crops.astype(float), out, strict=True):
        own, moved = before.mean(axis=(0, 1)), after.mean(axis=(0, 1))
        assert ((moved >= own - 1) & (moved <= 241)).all()
        detail, kept = before - own, after - moved
        scale = float((kept * detail).sum() / (detail * detail).sum())
        assert 0.0 <= scale <= 1.0 + 1e-6
        if scale > 0.05:  # the pattern itself is kept: the detail is the same up to that scale
            assert np.corrcoef(kept.ravel(), detail.ravel())[0, 1] > 0.99


def test_nothing_changes_when_off_and_mismatched_donors_are_refused() -> None:
    from engines.amplitude_mix import amplitude_mix

    crops = _cells(3, 4)
    assert amplitude_mix(crops, _cells(2, 5), np.random.default_rng(0), eta=0.0) is crops
    assert amplitude_mix(crops, _cells(2, 5), np.random.default_rng(0), p=0.0) is crops
    with pytest.raises(ValueError, match="cut the foreign cells at the training input size"):
        amplitude_mix(crops, np.zeros((2, 8, 8, 3), np.uint8), np.random.default_rng(0), p=1.0)


def test_amplitude_runs_need_the_cells_file_and_get_their_own_checkpoint_key() -> None:
    from types import SimpleNamespace

    from engines.baseline import TrainConfig, foreign_pool, run_key

    with pytest.raises(ValueError, match="needs foreign_cells"):
        foreign_pool(TrainConfig(amplitude_mix=1.0))
    data = SimpleNamespace(split_summary={"sha256": "abc"}, labels={"train": [0] * 5, "val": [0] * 2})
    plain = run_key(TrainConfig(), data)
    assert run_key(TrainConfig(foreign_cells="x/white64.npz"), data) == plain  # unused cells: the same run
    amp = run_key(TrainConfig(amplitude_mix=1.0, foreign_cells="x/white64.npz"), data)
    assert amp != plain
    assert amp != run_key(TrainConfig(amplitude_mix=1.0, foreign_cells="x/white64.npz", foreign_exclude=("a",)),
                          data)


def test_training_with_amplitude_mixing_moves_the_weights_and_keeps_the_plain_layout(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from engines.baseline import BaselineCNN, TrainConfig, train

    cells = tmp_path / "white64.npz"
    donors = np.full((6, 64, 64, 3), (90, 200, 120), np.uint8)  # a green-tinted, flat "microscope"
    np.savez(cells, crops=donors, source=np.array(["a"] * 6), split=np.array(["train"] * 6), frame=np.arange(6))
    base = TrainConfig(epochs=1, per_class_limit=4, threads=1, stem=8, widths=(8, 16, 16, 16), batch_size=16)
    plain, _, _ = train(smoke_pbc_root(), base, tmp_path / "ckpt", log=lambda *_: None)
    mixed, _, _ = train(smoke_pbc_root(), TrainConfig(**{**base.__dict__, "amplitude_mix": 1.0,
                                                          "foreign_cells": str(cells)}),
                        tmp_path / "ckpt", log=lambda *_: None)
    reference = BaselineCNN(8, 8, (8, 16, 16, 16)).state_dict()
    assert mixed.state_dict().keys() == reference.keys()
    assert any(not torch.equal(plain.state_dict()[k], mixed.state_dict()[k]) for k in reference
               if reference[k].is_floating_point())
