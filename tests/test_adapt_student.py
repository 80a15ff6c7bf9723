"""`cytoedge adapt` from the distilled student: its weights load, reproduce the shipped file, and adapting
keeps the uncertainty and anomaly heads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
STUDENT = REPO / "engines" / "models" / "student-v1" / "model.onnx"


def _crops(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, 64, 64, 3), dtype=np.uint8)


def test_student_weights_reproduce_the_shipped_onnx_file() -> None:
    pytest.importorskip("torch")
    from engines.adapt import load_weights
    from engines.distill import Student
    from engines.unfold import max_difference

    model, meta = load_weights(STUDENT)
    assert isinstance(model, Student) and meta.kind == "student"
    assert max_difference(model, STUDENT, _crops(16)) < 1e-3


def test_unfolding_a_trained_student_gives_back_its_function(tmp_path: Path) -> None:
    """Export folds BatchNorm into the convolutions; unfolding must compute the same logits again."""
    torch = pytest.importorskip("torch")
    from engines import export
    from engines.distill import Student
    from engines.unfold import max_difference, network_for, unfold

    torch.manual_seed(0)
    trained = Student(8, 8, (8, 16, 16, 16))
    trained.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for _ in range(3):
            trained(torch.randn(16, 3, 64, 64) * 2 + 0.5)
        for m in trained.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    meta = export.make_metadata(name="t", version="1", classes=[str(i) for i in range(8)], input_size=64,
                                mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], field_um=36.0, kind="student",
                                uncertainty_output="uncertainty", anomaly_output="anomaly")
    path = export.export_onnx(trained, tmp_path / "model.onnx", meta)
    fresh = Student(8, 8, (8, 16, 16, 16))
    assert type(network_for(meta, path)) is Student
    unfold(fresh, path, _crops(32), meta)
    assert max_difference(fresh, path, _crops(8, 1)) < 1e-3
    norms = [m for m in fresh.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(float(m.running_var.mean()) != pytest.approx(1.0) for m in norms)  # real statistics, not identity


def test_adapting_the_student_keeps_its_heads_and_exports_three_outputs(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from edge.onnx_backend import OnnxRuntimeClassifier
    from engines import export
    from engines.adapt import AdaptConfig, adapt_model, load_replay, load_weights
    from engines.baseline import save_weights

    model, meta = load_weights(STUDENT)
    replay = load_replay(STUDENT, meta.classes)
    assert replay is not None and len(replay[1]) == 400
    labels = np.array([meta.classes.index("neutrophil")] * 4 + [meta.classes.index("lymphocyte")] * 4)
    cfg = AdaptConfig(batchnorm=True, layers="all", replay=True, epochs=1, threads=1)
    adapted = adapt_model(model, meta, _crops(24), _crops(8, 1), labels, cfg, replay, log=lambda *_: None)
    path = export.export_onnx(adapted, tmp_path / "model.onnx", export.replace(meta, name="site", kind="site"))
    save_weights(adapted, tmp_path / "weights.pt")
    again, _ = load_weights(path)
    pred = OnnxRuntimeClassifier(path, threads=1).classify(_crops(3, 2))
    assert pred.probs.shape == (3, 8) and pred.uncertainty.shape == (3,) and pred.anomaly.shape == (3,)
    assert type(again) is type(adapted)
