"""The shipped baseline model and the engines/ pipeline: real files, real data where available."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import smoke_pbc_root

from calibration.temperature import fit_temperature
from edge.classifier import preprocess
from edge.modelmeta import METADATA_KEY, file_sha256, parse_metadata
from engines import evaluate, pbc

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "engines" / "models"
BASELINE = MODELS / "baseline-cnn"
ONNX = BASELINE / "model.onnx"


def pbc_root() -> Path:
    """$CYTOEDGE_PBC, else $CYTOEDGE_SHARED_DATA/pbc, else ../shared/data/pbc next to the repository."""
    return pbc.data_dir()


def need_data() -> Path:
    root = pbc_root()
    if not (root / "manifest.csv").is_file():
        pytest.skip(f"PBC data not found at {root} (set CYTOEDGE_PBC to the pbc/ folder)")
    return root


def session_for(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def session():
    return session_for(ONNX)


# ------------------------------------------------------------------------------------ shipped model
def test_default_names_a_distilled_student_that_can_be_adapted() -> None:
    name = (MODELS / "DEFAULT").read_text().strip()
    assert name.startswith("student-")
    folder = MODELS / name
    for part in ("model.onnx", "card.md", "card.json", "reference.json", "weights.pt", "replay.npz"):
        assert (folder / part).is_file(), part
    meta = parse_metadata(session_for(folder / "model.onnx").get_modelmeta().custom_metadata_map[METADATA_KEY],
                          str(folder / "model.onnx"))
    assert meta.kind == "student" and meta.uncertainty_output and meta.anomaly_output


def test_shipped_model_metadata_is_valid() -> None:
    custom = session().get_modelmeta().custom_metadata_map
    meta = parse_metadata(custom[METADATA_KEY], str(ONNX))
    assert meta.classes == pbc.CLASSES
    assert meta.input_size == 64 and meta.channel_order == "RGB" and meta.kind == "baseline"
    assert meta.input_name == "image" and meta.logits_output == "logits"
    assert meta.uncertainty_output is None and meta.anomaly_output is None
    assert 0.2 < meta.temperature < 5.0
    assert meta.um_per_px == pytest.approx(meta.field_um / meta.input_size, rel=1e-4)
    assert 30 <= meta.field_um <= 42
    assert ONNX.stat().st_size < 8_000_000


@pytest.mark.parametrize("batch", [1, 5])
def test_dynamic_batch(batch: int) -> None:
    sess = session()
    x = np.random.default_rng(batch).normal(size=(batch, 3, 64, 64)).astype(np.float32)
    (logits,) = sess.run(["logits"], {"image": x})
    assert logits.shape == (batch, 8) and logits.dtype == np.float32
    assert np.isfinite(logits).all()


def test_runtime_classifier_loads_the_shipped_file() -> None:
    from edge.onnx_backend import OnnxRuntimeClassifier

    classifier = OnnxRuntimeClassifier(ONNX, threads=1)
    crops = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    out = classifier.classify(crops)
    assert out.probs.shape == (5, 8)
    np.testing.assert_allclose(out.probs.sum(axis=1), 1.0, atol=1e-5)


def test_card_matches_file() -> None:
    card = json.loads((BASELINE / "card.json").read_text())
    digest = file_sha256(ONNX)
    assert card["sha256"] == digest == card["evaluation"]["model"]["sha256"]
    assert digest in (BASELINE / "card.md").read_text()
    assert card["evaluation"]["n"] == card["split"]["totals"]["test"]
    assert card["evaluation"]["accuracy"] > 0.9


def test_shipped_split_file_is_the_shared_split() -> None:
    root = need_data()
    shipped = json.loads((BASELINE / "split.json").read_text())
    split = pbc.split_pbc(pbc.read_manifest(root), shipped["seed"])
    assert pbc.split_digest(split) == shipped["sha256"]


def test_shipped_model_on_real_test_crops() -> None:
    """A few real test crops, decoded the runtime's way, are mostly classified right."""
    root = need_data()
    samples = pbc.read_manifest(root)
    split = pbc.split_pbc(samples)
    chosen = [s for s in samples if split[s.path] == "test"][::40]
    images = np.stack([pbc.load_crop_bgr(root / s.path, 64) for s in chosen])
    labels = np.array([pbc.CLASSES.index(s.label) for s in chosen])
    pred = evaluate.onnx_logits(ONNX, images).argmax(axis=1)
    assert (pred == labels).mean() > 0.9


# -------------------------------------------------------------------------------------------- split
def synthetic_manifest() -> list[pbc.Sample]:
    counts = {"basophil": 101, "eosinophil": 250, "erythroblast": 37, "ig": 80, "lymphocyte": 9,
              "monocyte": 120, "neutrophil": 300, "platelet": 64}
    return [pbc.Sample(f"{label}/{label[:2]}_{i}.jpg", label) for label, n in counts.items() for i in range(n)]


def test_split_is_deterministic_and_order_free() -> None:
    samples = synthetic_manifest()
    shuffled = samples[:]
    random.Random(1).shuffle(shuffled)
    assert pbc.split_pbc(samples, 7) == pbc.split_pbc(shuffled, 7)
    assert pbc.split_pbc(samples, 7) != pbc.split_pbc(samples, 8)
    assert pbc.split_pbc([(s.path, s.label) for s in samples], 7) == pbc.split_pbc(samples, 7)


def test_split_is_stratified_and_disjoint() -> None:
    samples = synthetic_manifest()
    split = pbc.split_pbc(samples, pbc.SPLIT_SEED)
    assert set(split) == {s.path for s in samples}  # every file in exactly one split
    assert set(split.values()) == {"train", "val", "test"}
    per_class = Counter(s.label for s in samples)
    counts = Counter((split[s.path], s.label) for s in samples)
    for label, n in per_class.items():
        for name, fraction in zip(pbc.SPLITS, pbc.SPLIT_FRACTIONS, strict=True):
            assert abs(counts[(name, label)] - fraction * n) <= 1.0, (label, name)


def test_adding_a_file_moves_no_other_file() -> None:
    samples = synthetic_manifest()
    before = pbc.split_pbc(samples)
    after = pbc.split_pbc([*samples, pbc.Sample("neutrophil/NEW.jpg", "neutrophil")])
    moved = [p for p in before if before[p] != after[p]]
    assert len(moved) <= 1  # at most the file whose slot the new one takes at a boundary


# -------------------------------------------------------------------------------------- calibration
@pytest.mark.parametrize("true_t", [0.6, 1.0, 2.5])
def test_temperature_fit_recovers_known_temperature(true_t: float) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, (20000, 8))
    probs = np.exp(logits / true_t)
    probs /= probs.sum(axis=1, keepdims=True)
    labels = (probs.cumsum(axis=1) > rng.random((len(probs), 1))).argmax(axis=1)
    assert fit_temperature(logits.astype(np.float32), labels) == pytest.approx(true_t, rel=0.05)


def test_ece_and_brier_of_perfect_predictions() -> None:
    labels = np.array([0, 1, 2, 1])
    probs = np.eye(3)[labels]
    assert evaluate.expected_calibration_error(probs, labels) == pytest.approx(0.0)
    assert evaluate.brier_score(probs, labels) == pytest.approx(0.0)
    metrics = evaluate.classification_metrics(labels, labels, ["a", "b", "c"])
    assert metrics["accuracy"] == metrics["balanced_accuracy"] == metrics["macro_f1"] == 1.0


# ----------------------------------------------------------------------------------- preprocessing
def test_training_normalisation_matches_runtime() -> None:
    """Training feeds the network exactly what edge.classifier.preprocess will feed it on the device."""
    torch = pytest.importorskip("torch")
    from engines import baseline, export

    crops = np.random.default_rng(3).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    mean, std = [0.87, 0.75, 0.73], [0.16, 0.18, 0.09]
    meta = export.make_metadata(name="t", version="0", classes=pbc.CLASSES, input_size=64, mean=mean,
                                std=std, field_um=36.0, kind="baseline")
    ours = baseline.normalise(baseline.to_tensor(crops), mean, std)
    assert isinstance(ours, torch.Tensor)
    np.testing.assert_allclose(ours.numpy(), preprocess(crops, meta), atol=1e-5)


# -------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_smoke_preset_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    root = smoke_pbc_root()
    out = tmp_path / "smoke"
    result = subprocess.run(
        [sys.executable, "-m", "engines.baseline", "train", "--preset", "smoke", "--data", str(root),
         "--out", str(out), "--threads", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "epoch 3/3" in result.stdout
    card = json.loads((out / "card.json").read_text())
    assert card["sha256"] == file_sha256(out / "model.onnx")
    assert (out / "card.md").is_file() and (out / "split.json").is_file()
    meta = evaluate.open_session(out / "model.onnx")[1]
    assert meta.classes == pbc.CLASSES and meta.temperature > 0
