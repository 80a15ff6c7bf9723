"""Plasma-relative input normalisation (engines.plasma_norm): a per-channel gain on the image (lamp colour,
white balance, camera gain) does not change the network's output, and the graph exports to ONNX with
ONNX Runtime reproducing torch through the unchanged runtime preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

MEAN, STD = [0.8728, 0.748, 0.7212], [0.156, 0.1798, 0.0818]  # PBC training crops' figures


def _crops(n: int = 6, size: int = 64, seed: int = 0) -> np.ndarray:
    """Blood-smear-like float RGB crops in [0, 1]: a peach plasma, pink red cells, a dark purple nucleus."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.empty((n, size, size, 3), np.float32)
    for i in range(n):
        image = np.broadcast_to(np.array([0.96, 0.88, 0.80], np.float32), (size, size, 3)).copy()
        for _ in range(6):
            cy, cx = rng.uniform(0, size, 2)
            image[np.hypot(yy - cy, xx - cx) < 9] = [0.85, 0.55, 0.55]
        cy, cx = rng.uniform(24, 40, 2)
        image[np.hypot(yy - cy, xx - cx) < rng.uniform(8, 14)] = [0.45, 0.25, 0.55]
        out[i] = np.clip(image + rng.normal(0, 0.02, image.shape).astype(np.float32), 0.02, 0.98)
    return out


def _normalised(rgb: np.ndarray) -> torch.Tensor:
    from engines.baseline import normalise

    return normalise(torch.from_numpy(np.ascontiguousarray(rgb.transpose(0, 3, 1, 2))), MEAN, STD)


def _model(input_norm: str = "plasma", seed: int = 0):
    from engines.baseline import BaselineCNN

    torch.manual_seed(seed)
    model = BaselineCNN(8, 8, (8, 16, 16, 16), input_norm=input_norm, pixel_mean=MEAN, pixel_std=STD)
    # Non-trivial BatchNorm statistics, as after training, then inference mode.
    model.train()
    with torch.no_grad():
        model(_normalised(_crops(16, seed=seed + 1)))
    return model.eval()


def test_output_is_invariant_to_a_per_channel_gain_on_the_image() -> None:
    crops = _crops()
    gain = np.array([0.75, 0.95, 0.6], np.float32)  # a warmer lamp and a dimmer camera, below clipping
    with torch.no_grad():
        plasma = _model("plasma")
        base, gained = plasma(_normalised(crops)), plasma(_normalised(crops * gain))
        plain = _model("none")
        plain_base, plain_gained = plain(_normalised(crops)), plain(_normalised(crops * gain))
    torch.testing.assert_close(gained, base, atol=1e-4, rtol=1e-4)
    # The same network without it does see the gain (so the check above is not vacuous).
    assert (plain_gained - plain_base).abs().max() > 100 * (gained - base).abs().max() + 1e-3
    # The plasma it estimates is the background colour, scaled by the gain.
    norm = plasma.plasma
    pixels = _normalised(crops) * norm.std + norm.mean
    level = norm.plasma(pixels).flatten(1).numpy()
    np.testing.assert_allclose(level, np.tile([0.96, 0.88, 0.80], (len(crops), 1)), atol=0.02)


def test_plasma_network_exports_and_onnx_runtime_matches_torch(tmp_path: Path) -> None:
    import onnx

    from edge.classifier import preprocess
    from edge.onnx_backend import OnnxRuntimeClassifier
    from engines import export

    model = _model("plasma")
    meta = export.make_metadata(name="plasma", version="1", classes=[str(i) for i in range(8)], input_size=64,
                                mean=MEAN, std=STD, field_um=36.0, kind="baseline")
    path = export.export_onnx(model, tmp_path / "model.onnx", meta)  # checks ORT on random inputs itself
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"TopK", "Log", "AveragePool"} <= ops
    bgr = np.rint(_crops(5, seed=3)[..., ::-1] * 255).astype(np.uint8)
    bgr = np.concatenate([bgr, np.zeros((1, 64, 64, 3), np.uint8), np.full((1, 64, 64, 3), 255, np.uint8)])
    runtime = OnnxRuntimeClassifier(path, threads=1)
    got = runtime.classify(bgr).probs
    with torch.no_grad():
        logits = model(torch.from_numpy(preprocess(bgr, runtime.metadata)))
    want = torch.softmax(logits, 1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    # Through the runtime (uint8 rounding, no change to preprocessing) a per-channel gain barely moves it.
    gained = np.rint(_crops(5, seed=3)[..., ::-1] * np.array([0.6, 0.95, 0.75], np.float32) * 255).astype(np.uint8)
    assert np.abs(runtime.classify(gained).probs - got[:5]).max() < 0.02


def test_option_keeps_old_run_keys_and_refuses_unknown_values() -> None:
    from dataclasses import asdict

    from engines.baseline import BaselineCNN, TrainConfig

    assert TrainConfig().input_norm == "none" and "input_norm" in asdict(TrainConfig())
    with pytest.raises(ValueError):
        BaselineCNN(8, input_norm="plasma")  # needs the metadata's mean/std
    with pytest.raises(ValueError):
        BaselineCNN(8, input_norm="lab")
    # The default network's state dict is unchanged (shipped weights.pt files still load).
    assert not any("plasma" in k for k in BaselineCNN(8).state_dict())


def test_default_run_key_is_the_one_from_before_the_option() -> None:
    import hashlib
    import json
    from dataclasses import asdict
    from types import SimpleNamespace

    from engines.baseline import TrainConfig, run_key

    data = SimpleNamespace(split_summary={"sha256": "abc"}, labels={"train": [0] * 5, "val": [0] * 2})
    # options added after the first shipped runs, left out of the key at their defaults
    later = ("augment", "context_radius", "norm", "input_norm", "style", "foreign_cells", "foreign_batch",
             "foreign_exclude", "consistency", "consistency_threshold", "init", "resolution", "colour", "amplitude_mix")
    old = {k: v for k, v in asdict(TrainConfig()).items() if k not in later}
    text = json.dumps({"cfg": old, "split": "abc", "n": {"train": 5, "val": 2}}, sort_keys=True)
    assert run_key(TrainConfig(), data) == hashlib.sha256(text.encode()).hexdigest()[:12]
    assert run_key(TrainConfig(input_norm="plasma"), data) != run_key(TrainConfig(), data)


def test_ratio_control_is_also_gain_invariant_and_unknown_modes_fail() -> None:
    from engines.baseline import BaselineCNN
    from engines.plasma_norm import PlasmaNorm

    torch.manual_seed(0)
    model = BaselineCNN(8, 8, (8, 16, 16, 16), input_norm="plasma-ratio", pixel_mean=MEAN, pixel_std=STD).eval()
    crops = _crops()
    with torch.no_grad():
        torch.testing.assert_close(model(_normalised(crops * np.float32([0.7, 0.9, 0.8]))), model(_normalised(crops)),
                                   atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError):
        PlasmaNorm(MEAN, STD, mode="log")
