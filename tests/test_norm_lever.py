"""The normalisation and resolution levers: GroupNorm / layer-norm baselines have no batch statistics and
export; a resolution-limited network keeps only coarse detail, in the exported graph too; lever networks
save and load with their options; old run keys stay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_group_and_layer_norm_networks_have_no_batch_statistics_and_export(tmp_path: Path, norm: str) -> None:
    torch = pytest.importorskip("torch")
    from edge.onnx_backend import OnnxRuntimeClassifier
    from engines import export
    from engines.baseline import BaselineCNN

    model = BaselineCNN(8, 8, (8, 16, 16, 16), norm=norm).eval()
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
    assert make_norm("layer", 8).num_groups == 1  # layer norm: one group over all channels and positions
    with pytest.raises(ValueError):
        make_norm("instance", 8)


def test_low_pass_removes_detail_finer_than_its_resolution_and_keeps_flat_colour() -> None:
    torch = pytest.importorskip("torch")
    from engines.baseline import LowPass

    low = LowPass(32)
    stripes = torch.zeros(1, 3, 64, 64)
    stripes[..., ::2] = 1.0  # one-pixel stripes: detail a 32-pixel crop of the same field cannot show
    torch.testing.assert_close(low(stripes), torch.full_like(stripes, 0.5))
    flat = torch.full((2, 3, 64, 64), 0.3)
    torch.testing.assert_close(low(flat), flat)
    coarse = torch.zeros(1, 3, 64, 64)
    coarse[..., :32] = 1.0  # a half-field edge survives: the left quarter stays white, the right one dark
    out = low(coarse)
    assert out.shape == coarse.shape and float(out[..., :16].min()) == 1.0 and float(out[..., 48:].max()) == 0.0
    with pytest.raises(ValueError, match="divide"):
        LowPass(48)


def test_resolution_limited_network_exports_with_its_low_pass_in_the_graph(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from engines import export
    from engines.baseline import BaselineCNN, predict_logits

    torch.manual_seed(0)
    model = BaselineCNN(8, 8, (8, 16, 16, 16), resolution=16).eval()
    meta = export.make_metadata(name="res16", version="1", classes=[str(i) for i in range(8)], input_size=64,
                                mean=[0.5] * 3, std=[0.25] * 3, field_um=36.0, kind="baseline")
    path = export.export_onnx(model, tmp_path / "model.onnx", meta)
    from engines.evaluate import onnx_logits

    crops = np.random.default_rng(0).integers(64, 192, (4, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_allclose(onnx_logits(path, crops), predict_logits(model, crops, meta.mean, meta.std),
                               atol=1e-4)
    # A checkerboard with zero mean in every 4x4 block is detail finer than 16 px across: invisible to it.
    board = np.where((np.arange(64)[:, None] + np.arange(64)[None, :]) % 2, 40, -40)[None, :, :, None]
    finer = (crops.astype(int) + board).astype(np.uint8)
    np.testing.assert_allclose(onnx_logits(path, finer), onnx_logits(path, crops), atol=1e-4)
    # The same amount of change as whole blocks is seen.
    blocks = np.kron((np.arange(16)[:, None] + np.arange(16)[None, :]) % 2 * 80 - 40, np.ones((4, 4)))
    coarser = (crops.astype(int) + blocks[None, :, :, None].astype(int)).astype(np.uint8)
    assert np.abs(onnx_logits(path, coarser) - onnx_logits(path, crops)).max() > 1e-3


def test_lever_network_saves_and_loads_with_its_options(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from engines import export
    from engines.adapt import load_weights
    from engines.baseline import WEIGHTS_FILE, BaselineCNN, save_weights

    torch.manual_seed(0)
    model = BaselineCNN(8, 8, (8, 16, 16, 16), norm="layer", resolution=32).eval()
    meta = export.make_metadata(name="ln", version="1", classes=[str(i) for i in range(8)], input_size=64,
                                mean=[0.5] * 3, std=[0.25] * 3, field_um=36.0, kind="baseline")
    path = export.export_onnx(model, tmp_path / "model.onnx", meta)
    save_weights(model, tmp_path / WEIGHTS_FILE)
    loaded, _ = load_weights(path)
    assert loaded.options == {"norm": "layer", "resolution": 32} and loaded.low_pass is not None
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x), model(x))


def test_plasma_relative_network_saves_and_loads_with_its_input_normalisation(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from engines import export
    from engines.adapt import load_weights
    from engines.baseline import WEIGHTS_FILE, BaselineCNN, save_weights

    torch.manual_seed(0)
    model = BaselineCNN(8, 8, (8, 16, 16, 16), input_norm="plasma", pixel_mean=[0.6, 0.5, 0.7],
                        pixel_std=[0.2, 0.25, 0.15]).eval()
    meta = export.make_metadata(name="od", version="1", classes=[str(i) for i in range(8)], input_size=64,
                                mean=[0.6, 0.5, 0.7], std=[0.2, 0.25, 0.15], field_um=36.0, kind="baseline")
    path = export.export_onnx(model, tmp_path / "model.onnx", meta)
    save_weights(model, tmp_path / WEIGHTS_FILE)
    loaded, _ = load_weights(path)
    assert loaded.plasma is not None and loaded.options["input_norm"] == "plasma"
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x), model(x))


def test_grey_network_ignores_hue_and_saturation_even_in_the_onnx_file(tmp_path: Path) -> None:
    """Two crops with the same luminance and different colour give the same answer, in torch and in ONNX;
    the option survives weights.pt."""
    torch = pytest.importorskip("torch")
    import onnxruntime as ort

    from engines import export
    from engines.adapt import load_weights
    from engines.baseline import WEIGHTS_FILE, BaselineCNN, Grey, save_weights

    mean, std = [0.6, 0.5, 0.7], [0.2, 0.25, 0.15]
    torch.manual_seed(0)
    model = BaselineCNN(8, 8, (8, 16, 16, 16), pixel_mean=mean, pixel_std=std, colour="grey").eval()
    rng = np.random.default_rng(0)
    pixels = rng.uniform(0.2, 0.8, (1, 3, 64, 64)).astype(np.float32)
    # move colour along a direction orthogonal to the luminance weights: chroma changes, luminance does not
    w = np.array(Grey.WEIGHTS, np.float32)
    chroma = np.cross(w, [1.0, 0.0, 0.0]).astype(np.float32)
    recoloured = pixels + 0.15 * chroma.reshape(1, 3, 1, 1)
    m, s = np.array(mean, np.float32).reshape(1, 3, 1, 1), np.array(std, np.float32).reshape(1, 3, 1, 1)
    a, b = (pixels - m) / s, (recoloured - m) / s
    assert np.abs(a - b).max() > 0.1
    with torch.no_grad():
        torch.testing.assert_close(model(torch.from_numpy(a)), model(torch.from_numpy(b)), atol=1e-5, rtol=1e-5)
    meta = export.make_metadata(name="grey", version="1", classes=[str(i) for i in range(8)], input_size=64,
                                mean=mean, std=std, field_um=36.0, kind="baseline")
    path = export.export_onnx(model, tmp_path / "model.onnx", meta)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    np.testing.assert_allclose(session.run(None, {name: a})[0], session.run(None, {name: b})[0], atol=1e-4)
    save_weights(model, tmp_path / WEIGHTS_FILE)
    loaded, _ = load_weights(path)
    assert loaded.grey is not None and loaded.options["colour"] == "grey"
