"""A student on a GroupNorm body (the normalisation lever, docs/robustness.md): it trains from a GroupNorm
network, keeps its norm through weights.pt, and refuses a body of the other kind with a clear message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import smoke_pbc_root

pytest.importorskip("torch")


def test_group_norm_student_saves_and_loads_with_its_norm(tmp_path: Path) -> None:
    import torch

    from engines import export
    from engines.adapt import load_weights
    from engines.baseline import WEIGHTS_FILE, save_weights
    from engines.distill import Student

    torch.manual_seed(0)
    student = Student(8, 8, (8, 16, 16, 16), norm="group").eval()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in student.modules())
    meta = export.make_metadata(name="gn", version="1", classes=[str(i) for i in range(8)], input_size=64,
                                mean=[0.5] * 3, std=[0.25] * 3, field_um=36.0, kind="student",
                                uncertainty_output="uncertainty", anomaly_output="anomaly")
    path = export.export_onnx(student, tmp_path / "model.onnx", meta)
    save_weights(student, tmp_path / WEIGHTS_FILE)
    loaded, _ = load_weights(path)
    assert isinstance(loaded, Student) and loaded.options == {"norm": "group"}
    x = torch.rand(3, 3, 64, 64)
    for mine, theirs in zip(loaded(x), student(x), strict=True):
        torch.testing.assert_close(mine, theirs)


def _teacher_files(tmp_path: Path, root: Path) -> tuple[Path, Path]:
    """Teacher outputs for a few training cells, in the format engines.teacher writes (what distil reads)."""
    import json

    from engines import pbc
    from engines.baseline import TrainConfig, prepare_data

    data = prepare_data(root, TrainConfig(per_class_limit=24))
    paths = data.paths["train"][:16]
    rng = np.random.default_rng(0)
    labels = tmp_path / "labels.npz"
    np.savez(labels, errors=(0.5 + rng.random((len(paths), len(pbc.CLASSES) + 1, 3))).astype(np.float32),
             paths=np.array(paths), classes=np.array(pbc.CLASSES))
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps({"tau": 0.01, "classes": data.classes, "primary_anomaly": "lr_gap",
                                 "squash": {"lr_gap": {"q50": 1.0, "q95": 1.1}}}))
    return labels, calib


def test_distilling_onto_a_group_norm_body_starts_from_it_and_refuses_a_batch_norm_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from engines import distill, pbc
    from engines.baseline import BaselineCNN, save_weights

    root = smoke_pbc_root()
    monkeypatch.setenv("CYTOEDGE_PBC", str(root))
    labels, calib = _teacher_files(tmp_path, root)
    body = tmp_path / "gn-body.pt"
    save_weights(BaselineCNN(len(pbc.CLASSES), norm="group"), body)
    out = tmp_path / "student.pt"
    assert distill.main(["train", "--preset", "smoke", "--labels", str(labels), "--calib", str(calib),
                         "--init", str(body), "--norm", "group", "--threads", "1", "--out", str(out)]) == 0
    model, state = distill.load_student(out)
    assert state["config"]["norm"] == "group"
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    with pytest.raises(SystemExit, match="does not fit a student body with batch norm"):
        distill.main(["train", "--preset", "smoke", "--labels", str(labels), "--calib", str(calib),
                      "--init", str(body), "--threads", "1", "--out", str(tmp_path / "other.pt")])
