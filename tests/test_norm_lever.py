"""The normalisation lever: a GroupNorm baseline has no batch statistics, exports, and old run keys stay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def test_group_norm_network_has_no_batch_statistics_and_exports(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from edge.onnx_backend import OnnxRuntimeClassifier
    from engines import export
    from engines.baseline import BaselineCNN

    model = BaselineCNN(8, 8, (8, 16, 16, 16), norm="group").eval()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    # One cell's output does not depend on the other cells of its batch, even in training mode.
    model.train()
    model.dropout.eval()  # dropout's mask is random; the normalisation is what is under test
    x = torch.randn(4, 3, 64, 64)
    torch.testing.assert_close(model(x)[:1], model(x[:1]))
    meta = export.make_metadata(name="gn", version="1", classes=[str(i) for i in range(8)], input_size=64,
                                mean=[0.5] * 3, std=[0.25] * 3, field_um=36.0, kind="baseline")
    path = export.export_onnx(model.eval(), tmp_path / "model.onnx", meta)
    probs = OnnxRuntimeClassifier(path, threads=1).classify(np.zeros((2, 64, 64, 3), np.uint8)).probs
    assert probs.shape == (2, 8)


def test_batch_norm_default_keeps_the_run_keys_of_earlier_checkpoints() -> None:
    from dataclasses import asdict

    from engines.baseline import TrainConfig, make_norm

    assert "norm" in asdict(TrainConfig()) and TrainConfig().norm == "batch"
    with pytest.raises(ValueError):
        make_norm("layer", 8)
