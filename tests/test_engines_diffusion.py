"""The diffusion teacher, its scoring, the distilled student and its shipped file: real code, real data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import smoke_pbc_root

from engines import pbc

REPO = Path(__file__).resolve().parent.parent
STUDENT = REPO / "engines" / "models" / "student-v1"


def need_data() -> Path:
    root = pbc.data_dir()
    if not (root / "manifest.csv").is_file():
        pytest.skip(f"PBC data not found at {root} (set CYTOEDGE_PBC to the pbc/ folder)")
    return root


# ------------------------------------------------------------------------------------ scoring pieces
def test_disc_mask_is_a_centred_disc() -> None:
    pytest.importorskip("torch")
    from engines.diffusion import disc_mask

    mask = disc_mask(32, 0.34).numpy()
    assert mask[15:17, 15:17].all() and mask[0, 0] == 0 and mask[-1, -1] == 0 and mask[0, 16] == 0
    assert np.array_equal(mask, mask[::-1]) and np.array_equal(mask, mask.T)  # symmetric: no orientation bias
    assert abs(mask.sum() - math.pi * (0.34 * 32) ** 2) < 0.05 * mask.sum()


def test_checkpoints_from_before_the_augment_and_init_options_still_resume() -> None:
    from dataclasses import asdict

    from engines.diffusion import DiffusionConfig, _comparable

    old = {k: v for k, v in asdict(DiffusionConfig()).items() if k not in ("augment", "init")}
    assert _comparable(old) == _comparable(asdict(DiffusionConfig(minutes=3, threads=1)))
    assert _comparable(old) != _comparable(asdict(DiffusionConfig(augment="strong-isolate")))


def test_shared_noise_is_identical_across_classes() -> None:
    """Within a trial every class (and the null class) must see the very same noisy image: the paired
    comparison is what makes few trials enough. Checked on the inputs the network really receives."""
    torch = pytest.importorskip("torch")
    from engines.diffusion import UNet
    from engines.teacher import ScoreConfig, denoising_errors, trial_noise

    torch.manual_seed(0)
    model = UNet(4, (16, 32)).eval()
    seen: list[tuple] = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(tuple(a.clone() for a in args)))
    x0 = torch.rand(3, 3, 32, 32) * 2 - 1
    cfg = ScoreConfig(timesteps=(50, 200, 500), prune_after=0)
    errors, passes = denoising_errors(model, x0, cfg)
    assert errors.shape == (3, 5, 3) and not np.isnan(errors).any() and passes == 3 * 5 * 3
    assert len(seen) == 3  # one batched forward pass per trial: all classes of all cells together
    for x, t, y in seen:
        assert len(set(t.tolist())) == 1
        for cell in range(3):
            rows = x[cell * 5:(cell + 1) * 5]  # the 5 conditions (4 classes + null) of one cell
            assert torch.equal(rows, rows[:1].expand_as(rows))
        assert sorted(y[:5].tolist()) == [0, 1, 2, 3, 4]
    assert torch.equal(trial_noise(1, (3, 8, 8)), trial_noise(1, (3, 8, 8)))
    assert not torch.equal(trial_noise(1, (3, 8, 8)), trial_noise(2, (3, 8, 8)))
    again, _ = denoising_errors(model, x0, cfg)
    np.testing.assert_array_equal(errors, again)  # deterministic


def test_pruning_keeps_the_null_class_and_the_best_classes() -> None:
    torch = pytest.importorskip("torch")
    from engines.diffusion import UNet
    from engines.teacher import ScoreConfig, denoising_errors, simulate_pruning, summarise

    torch.manual_seed(1)
    model = UNet(6, (16, 32)).eval()
    x0 = torch.rand(4, 3, 32, 32) * 2 - 1
    pruned, passes = denoising_errors(model, x0, ScoreConfig(timesteps=(50, 150, 300, 500), prune_after=2, keep=2))
    assert passes == 4 * (2 * 7 + 2 * 3)
    assert not np.isnan(pruned[:, -1, :]).any()  # the null class is always scored
    assert (np.isnan(pruned[:, :6, 2:]).sum(axis=1) == 4).all()  # 4 of 6 classes dropped after trial 2
    full, _ = denoising_errors(model, x0, ScoreConfig(timesteps=(50, 150, 300, 500), prune_after=0))
    simulated, sim_passes = simulate_pruning(full, 2, 2)
    np.testing.assert_allclose(np.isnan(simulated), np.isnan(pruned))
    assert sim_passes == passes / 4
    out = summarise(pruned, tau=0.1)
    assert np.allclose(out["posterior"].sum(1), 1, atol=1e-5)
    assert ((out["uncertainty"] >= 0) & (out["uncertainty"] <= 1)).all()


def test_auroc_and_kappa() -> None:
    from engines.compare import auroc, cohen_kappa

    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1], bool)) == 1.0
    assert auroc(np.array([0.5, 0.5, 0.5, 0.5]), np.array([0, 1, 0, 1], bool)) == 0.5
    a = np.array([0, 1, 2, 0, 1, 2])
    assert cohen_kappa(a, a, 3) == 1.0


def test_temperature_fit_recovers_the_temperature_that_generated_the_labels() -> None:
    from calibration.temperature import calibrated_probs, fit_temperature

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2000, 5)) * 4
    labels = np.array([rng.choice(5, p=p) for p in calibrated_probs(logits, 2.0)])
    assert abs(fit_temperature(logits, labels) - 2.0) < 0.3


# ------------------------------------------------------------------------------------ the whole chain
@pytest.mark.slow
def test_smoke_chain_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny teacher -> label -> calibrate -> distil -> export -> the runtime loads it and classifies a real
    crop, with uncertainty and anomaly taken from the student's heads."""
    pytest.importorskip("torch")
    root = smoke_pbc_root()
    monkeypatch.setenv("CYTOEDGE_PBC", str(root))
    from edge.onnx_backend import OnnxRuntimeClassifier
    from engines import diffusion, distill, teacher

    t_ckpt = tmp_path / "teacher.pt"
    assert diffusion.main(["train", "--preset", "smoke", "--out", str(t_ckpt), "--threads", "1"]) == 0
    robust = tmp_path / "teacher-robust.pt"  # the robust teacher's path: continue from it with augmentation
    assert diffusion.main(["train", "--preset", "smoke", "--out", str(robust), "--threads", "1", "--init",
                           str(t_ckpt), "--augment", "strong-isolate"]) == 0
    val, train = tmp_path / "val.npz", tmp_path / "train.npz"
    assert teacher.main(["label", "--teacher", str(t_ckpt), "--split", "val", "--preset", "smoke",
                         "--no-prune", "--out", str(val), "--threads", "1"]) == 0
    assert teacher.main(["calibrate", "--val", str(val), "--out", str(tmp_path / "calib.json")]) == 0
    assert teacher.main(["label", "--teacher", str(t_ckpt), "--split", "train", "--preset", "smoke",
                         "--out", str(train), "--threads", "1", "--prune-after", "1", "--keep", "2"]) == 0
    calib = json.loads((tmp_path / "calib.json").read_text())
    assert calib["tau"] > 0 and set(calib["squash"]) >= {"lr_gap", "margin"}
    from engines.experiments import teacher_curve  # accuracy against steps, from checkpoint copies

    assert teacher_curve.main(["--points", str(t_ckpt), str(tmp_path / "calib.json"),
                               "--out", str(tmp_path / "curve.json")]) == 0
    (row,) = json.loads((tmp_path / "curve.json").read_text())["points"]
    assert row["step"] > 0 and row["val_accuracy"] == calib["val_accuracy"]
    best = max((p["accuracy"] for p in calib["pruning"]), default=None)
    assert (row["pruned_best"] or {}).get("accuracy") == best  # the best simulated pruning, not a fixed one
    # the teacher's posterior on other microscopes' unlabelled cells (here: four real PBC crops stand in)
    samples = list(pbc.read_manifest(root))[:4]
    crops = np.stack([pbc.load_crop_bgr(root / s.path, 64) for s in samples])
    cells, far = tmp_path / "white64.npz", tmp_path / "teacher-foreign.npz"
    np.savez(cells, crops=crops, source=np.array(["a", "a", "b", "b"]), split=np.array(["train"] * 4),
             frame=np.arange(4))
    assert teacher.main(["label", "--teacher", str(t_ckpt), "--foreign", str(cells), "--preset", "smoke",
                         "--out", str(far), "--threads", "1"]) == 0
    foreign_errors = teacher.load_labels(far)["errors"]
    assert foreign_errors.shape[:2] == (4, 9) and np.isfinite(foreign_errors[:, -1]).all()
    with pytest.raises(SystemExit):  # neither --split nor --foreign
        teacher.main(["label", "--teacher", str(t_ckpt), "--out", str(far)])
    s_ckpt = tmp_path / "student.pt"
    assert distill.main(["train", "--preset", "smoke", "--labels", str(train), "--calib",
                         str(tmp_path / "calib.json"), "--out", str(s_ckpt), "--threads", "1",
                         "--augment", "strong-isolate"]) == 0  # the robust student's path (docs/robustness.md)
    assert distill.main(["train", "--preset", "smoke", "--labels", str(train), "--calib", str(tmp_path / "calib.json"),
                         "--out", str(tmp_path / "student-foreign.pt"), "--threads", "1", "--foreign", str(cells),
                         str(far), "--foreign-weight", "1.0"]) == 0
    out = tmp_path / "student"
    assert distill.main(["export", "--student", str(s_ckpt), "--out", str(out)]) == 0
    # the pixel teacher measured like the student (the same command as the latent one's)
    from engines.experiments import latent_teacher

    test = tmp_path / "test.npz"
    assert teacher.main(["label", "--teacher", str(t_ckpt), "--split", "test", "--preset", "smoke",
                         "--no-prune", "--out", str(test), "--threads", "1"]) == 0
    figures = tmp_path / "teacher.json"
    assert latent_teacher.main(["--teacher", str(t_ckpt), "--test", str(test), "--calib", str(tmp_path / "calib.json"),
                                "--students", str(out), "--out", str(figures)]) == 0
    measured = json.loads(figures.read_text())
    assert measured["teacher"]["steps"] > 0 and "autoencoder" not in measured["teacher"]
    assert 0 <= measured["test"]["balanced_accuracy"] <= 1
    assert 0 <= measured["students"]["student"]["teacher_student_top1"] <= 1

    classifier = OnnxRuntimeClassifier(out / "model.onnx", threads=1)
    meta = classifier.metadata
    assert meta.kind == "student" and meta.uncertainty_output == "uncertainty" and meta.anomaly_output == "anomaly"
    from edge.drift import Reference

    assert Reference.from_json(meta.reference).features == ["anomaly", "colour_0", "colour_1", "colour_2",
                                                             "uncertainty"]
    sample = next(s for s in pbc.read_manifest(root) if s.label == "neutrophil")
    crop = pbc.load_crop_bgr(root / sample.path, meta.input_size)[None]
    pred = classifier.classify(np.concatenate([crop, crop[:, ::-1]]))
    assert pred.probs.shape == (2, 8) and np.allclose(pred.probs.sum(1), 1, atol=1e-5)
    import onnxruntime as ort

    from edge.classifier import preprocess

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    raw_u, raw_a = session.run(["uncertainty", "anomaly"], {"image": preprocess(np.concatenate([crop, crop[:, ::-1]]),
                                                                                 meta)})
    np.testing.assert_allclose(pred.uncertainty, np.clip(raw_u.reshape(-1), 0, 1), atol=1e-6)
    np.testing.assert_allclose(pred.anomaly, np.clip(raw_a.reshape(-1), 0, 1), atol=1e-6)


# ------------------------------------------------------------------------------------ the shipped file
def test_shipped_student_metadata_and_card() -> None:
    onnx_path = STUDENT / "model.onnx"
    if not onnx_path.is_file():
        pytest.skip("engines/models/student-v1/model.onnx not built yet")
    from edge.modelmeta import file_sha256
    from edge.onnx_backend import OnnxRuntimeClassifier

    classifier = OnnxRuntimeClassifier(onnx_path, threads=1)
    meta = classifier.metadata
    assert meta.kind == "student" and meta.classes == pbc.CLASSES and meta.input_size == 64
    assert meta.uncertainty_output == "uncertainty" and meta.anomaly_output == "anomaly"
    from edge.drift import Reference

    assert 0 < meta.temperature < 20
    reference = Reference.from_json(meta.reference)  # the domain alarm can use the shipped reference
    assert {"anomaly", "uncertainty"} <= set(reference.features)
    assert all(len(q["anomaly"]) == 101 for q in reference.quantiles.values())
    baseline = OnnxRuntimeClassifier(REPO / "engines" / "models" / "baseline-cnn" / "model.onnx", threads=1).metadata
    assert (meta.mean, meta.std, meta.um_per_px, meta.field_um) == (baseline.mean, baseline.std,
                                                                    baseline.um_per_px, baseline.field_um)
    assert onnx_path.stat().st_size < 8_000_000
    card = json.loads((STUDENT / "card.json").read_text())
    assert card["sha256"] == file_sha256(onnx_path)
    assert card["sha256"] in (STUDENT / "card.md").read_text()
    pred = classifier.classify(np.full((3, 64, 64, 3), 200, np.uint8))
    assert pred.probs.shape == (3, 8) and ((pred.anomaly >= 0) & (pred.anomaly <= 1)).all()
