"""The latent diffusion teacher (engines/latent.py): autoencoder -> latent diffusion -> labels that the
existing calibration and distillation take unchanged, on the smoke presets (seconds, any machine)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import smoke_pbc_root


def test_autoencoder_maps_a_crop_to_a_quarter_size_latent_and_back() -> None:
    torch = pytest.importorskip("torch")
    from engines.latent import AutoEncoder

    ae = AutoEncoder((8, 16), latent=4).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (2, 4, 16, 16)
    assert ae.decode(z).shape == x.shape


def test_latent_scale_makes_the_training_latents_unit_variance() -> None:
    torch = pytest.importorskip("torch")
    from engines.latent import AutoEncoder, encode, fit_latent_scale

    torch.manual_seed(0)
    crops = np.random.default_rng(0).integers(0, 255, (64, 64, 64, 3), dtype=np.uint8)
    ae = AutoEncoder((8, 16), latent=4)
    fit_latent_scale(ae, crops)
    z = encode(ae, crops)
    assert torch.allclose(z.mean((0, 2, 3)), torch.zeros(4), atol=1e-4)
    assert torch.allclose(z.std((0, 2, 3)), torch.ones(4), atol=1e-3)


def test_a_longer_budget_resumes_the_same_run_but_other_maths_is_refused() -> None:
    from dataclasses import asdict

    from engines.latent import LatentDiffusionConfig, _maths

    assert _maths(asdict(LatentDiffusionConfig(minutes=5))) == _maths(asdict(LatentDiffusionConfig(minutes=60)))
    assert _maths(asdict(LatentDiffusionConfig())) != _maths(asdict(LatentDiffusionConfig(augment="basic")))


def test_smoke_chain_autoencoder_diffusion_label_calibrate_distil(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """What CI keeps of the latent teacher: every stage runs on the tiny presets, resumes, and its label
    files feed engines.teacher calibrate and engines.distill as the pixel teacher's do."""
    pytest.importorskip("torch")
    root = smoke_pbc_root()
    monkeypatch.setenv("CYTOEDGE_PBC", str(root))
    from engines import distill, latent, teacher

    ae, t_ckpt = tmp_path / "ae.pt", tmp_path / "teacher.pt"
    assert latent.main(["autoencoder", "--preset", "smoke", "--out", str(ae), "--threads", "1"]) == 0
    assert latent.main(["diffusion", "--preset", "smoke", "--ae", str(ae), "--out", str(t_ckpt), "--threads", "1"]) == 0
    import torch

    state = torch.load(t_ckpt, map_location="cpu", weights_only=False)
    assert state["done"] and state["step"] == 8 and state["history"] and "autoencoder" in state
    # A resumed run with a larger step cap continues from step 8 rather than starting again.
    assert latent.main(["diffusion", "--preset", "smoke", "--ae", str(ae), "--out", str(t_ckpt), "--threads", "1",
                        "--max-steps", "10"]) == 0
    assert torch.load(t_ckpt, map_location="cpu", weights_only=False)["step"] == 10
    val, train = tmp_path / "val.npz", tmp_path / "train.npz"
    assert latent.main(["label", "--teacher", str(t_ckpt), "--split", "val", "--preset", "smoke", "--no-prune",
                        "--out", str(val), "--threads", "1"]) == 0
    labels = teacher.load_labels(val)
    assert labels["errors"].shape[1:] == (9, 2) and not np.isnan(labels["errors"]).any()
    assert teacher.main(["calibrate", "--val", str(val), "--out", str(tmp_path / "calib.json")]) == 0
    assert json.loads((tmp_path / "calib.json").read_text())["tau"] > 0
    assert latent.main(["label", "--teacher", str(t_ckpt), "--split", "train", "--preset", "smoke",
                        "--out", str(train), "--threads", "1", "--prune-after", "1", "--keep", "2"]) == 0
    # Unlabelled foreign white cells (as engines.foreign cut writes them): the teacher labels them and the
    # student is distilled on them too; only train-frame cells are used.
    cells = tmp_path / "foreign.npz"
    np.savez(cells, crops=np.random.default_rng(0).integers(0, 255, (6, 64, 64, 3), dtype=np.uint8),
             source=np.array(["bccd"] * 3 + ["raabin"] * 3), split=np.array(["train", "val"] * 3),
             frame=np.arange(6))
    foreign_labels = tmp_path / "foreign-labels.npz"
    assert latent.main(["label", "--teacher", str(t_ckpt), "--foreign", str(cells), "--preset", "smoke",
                        "--out", str(foreign_labels), "--threads", "1"]) == 0
    assert teacher.load_labels(foreign_labels)["errors"].shape == (6, 9, 2)
    assert distill.main(["train", "--preset", "smoke", "--labels", str(train), "--calib",
                         str(tmp_path / "calib.json"), "--out", str(tmp_path / "student.pt"), "--threads", "1",
                         "--foreign", str(cells), str(foreign_labels)]) == 0
    state = torch.load(tmp_path / "student.pt", map_location="cpu", weights_only=False)
    assert state["config"]["foreign_weight"] == 1.0 and len(state["history"]) == 2
