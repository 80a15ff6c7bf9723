"""The lab-to-lab augmentations: shapes kept, seeded, and each op doing what its name says."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from engines import augment


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def disc_image(diameter: float, size: int = 64) -> np.ndarray:
    """A purple disc on a pale pink background, like a stained cell in a crop."""
    image = np.full((size, size, 3), (225, 215, 240), np.uint8)
    cv2.circle(image, (size // 2, size // 2), round(diameter / 2), (140, 60, 110), -1)
    return image


def dark_area(image: np.ndarray) -> int:
    return int((image.astype(int).sum(2) < 500).sum())


@pytest.mark.parametrize("name", sorted(augment.OPS))
def test_every_op_keeps_shape_dtype_and_is_seeded(name: str) -> None:
    image = disc_image(30)
    image[::7] = (180, 160, 200)  # some texture, so blur and JPEG have something to change
    op = augment.OPS[name]
    a = op(image, rng(3), 1.0)
    b = op(image, rng(3), 1.0)
    assert a.shape == image.shape and a.dtype == np.uint8
    assert np.array_equal(a, b)


def test_batch_is_deterministic_and_seed_dependent() -> None:
    images = np.stack([disc_image(20 + i) for i in range(16)])
    a = augment.augment_batch(images, "robust", 7)
    b = augment.augment_batch(images, "robust", 7)
    c = augment.augment_batch(images, "robust", 8)
    assert a.shape == images.shape and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, images)


def test_batch_refuses_wrong_input() -> None:
    with pytest.raises(ValueError):
        augment.augment_batch(np.zeros((2, 64, 64, 3), np.float32), "robust", 0)


def test_stain_jitter_keeps_blank_background_white_and_changes_stain() -> None:
    blank = np.full((32, 32, 3), 250, np.uint8)
    cell = disc_image(40)
    for seed in range(20):
        out = augment.stain_jitter(blank, rng(seed), 1.0)
        assert out.min() >= 235, "unstained glass must stay white-ish"
        changed = augment.stain_jitter(cell, rng(seed), 1.0)
        assert np.abs(changed.astype(int) - cell).max() <= 80
    diffs = [np.abs(augment.stain_jitter(cell, rng(s), 1.0).astype(int) - cell)[32, 32].max() for s in range(20)]
    assert max(diffs) >= 5, "the stained disc must change colour"


def test_stain_round_trip_without_jitter_is_identity() -> None:
    cell = disc_image(40)
    out = augment.stain_jitter(cell, rng(0), 0.0)
    assert np.abs(out.astype(int) - cell).max() <= 1


def test_hue_saturation_leaves_grey_grey() -> None:
    grey = np.full((16, 16, 3), 128, np.uint8)
    out = augment.hue_saturation(grey, rng(1), 1.0)
    assert np.abs(out.astype(int) - 128).max() <= 1
    cell = disc_image(40)
    assert any(not np.array_equal(augment.hue_saturation(cell, rng(s), 1.0), cell) for s in range(5))


def test_white_balance_scales_channels_within_range() -> None:
    flat = np.full((8, 8, 3), 200, np.uint8)
    for seed in range(10):
        out = augment.white_balance(flat, rng(seed), 1.0)[0, 0].astype(float)
        assert np.all(np.abs(out / 200 - 1) <= 0.121)
    outs = {tuple(augment.white_balance(flat, rng(s), 1.0)[0, 0]) for s in range(10)}
    assert len(outs) > 5


def test_gamma_keeps_black_and_white_and_moves_midtones() -> None:
    ramp = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (2, 1, 3))
    outs = [augment.gamma(ramp, rng(s), 1.0) for s in range(10)]
    for out in outs:
        assert out[0, 0, 0] == 0 and out[0, 255, 0] == 255
        assert np.all(np.diff(out[0, :, 0].astype(int)) >= 0), "a tone curve must stay monotonic"
    assert max(abs(int(o[0, 128, 0]) - 128) for o in outs) > 10


def test_illumination_gradient_makes_a_ramp() -> None:
    flat = np.full((64, 64, 3), 200, np.uint8)
    out = augment.illumination_gradient(flat, rng(2), 1.0).astype(float)
    assert out.std() > 1.0
    assert abs(out.mean() - 200) < 3.0, "a ramp about the centre keeps the mean"


def test_defocus_and_motion_blur_soften_edges() -> None:
    image = disc_image(30)
    sharpness = np.abs(np.diff(image.astype(int), axis=1)).sum()
    for op in (augment.defocus, augment.motion_blur):
        out = op(image, rng(4), 1.0)
        assert np.abs(np.diff(out.astype(int), axis=1)).sum() < sharpness
        assert abs(out.astype(float).mean() - image.mean()) < 2.0


def test_sensor_noise_adds_zero_mean_noise() -> None:
    flat = np.full((64, 64, 3), 120, np.uint8)
    out = augment.sensor_noise(flat, rng(5), 1.0).astype(float)
    assert out.std() > 0.5
    assert abs(out.mean() - 120) < 1.0


def test_jpeg_changes_fine_texture() -> None:
    noisy = rng(6).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out = augment.jpeg(noisy, rng(6), 1.0)
    assert out.shape == noisy.shape and not np.array_equal(out, noisy)


def test_zoom_in_makes_a_centred_disc_bigger_and_zoom_out_pads_with_background() -> None:
    image = disc_image(30)
    area = dark_area(image)
    bigger = augment.zoom(image, 1.25)
    smaller = augment.zoom(image, 0.8)
    assert dark_area(bigger) == pytest.approx(area * 1.25**2, rel=0.08)
    assert dark_area(smaller) == pytest.approx(area * 0.8**2, rel=0.08)
    # The strip zoomed out into view is the crop's background, not black.
    assert np.abs(smaller[0, 0].astype(int) - image[0, 0]).max() <= 2


def test_scale_jitter_stays_within_25_percent() -> None:
    image = disc_image(30)
    area = dark_area(image)
    for seed in range(20):
        ratio = dark_area(augment.scale_jitter(image, rng(seed), 1.0)) / area
        assert 0.8**2 * 0.92 <= ratio <= 1.25**2 * 1.08


def test_every_pipeline_uses_only_known_ops_and_every_op_is_used() -> None:
    used = {s.op for pipeline in augment.PIPELINES.values() for s in pipeline.steps}
    assert used == set(augment.OPS)
    assert all(0 < s.p <= 1 for pipeline in augment.PIPELINES.values() for s in pipeline.steps)
    assert "stain" in augment.PIPELINES["robust"].describe()


def test_strong_set_drops_the_sensor_ops_and_widens_colour() -> None:
    strong = {s.op: s for s in augment.PIPELINES["strong"].steps}
    assert not {"noise", "jpeg"} & set(strong) and strong["stain"].strength > 1
    assert [s.op for s in augment.PIPELINES["strong-isolate"].steps if s.op != "isolate"] == list(strong)


def test_isolate_keeps_the_centre_and_paints_the_edge_with_the_plasma_colour() -> None:
    image = np.full((64, 64, 3), (200, 220, 250), np.uint8)  # plasma
    image[:8, :8] = (120, 90, 160)  # a red cell in the corner
    image[28:36, 28:36] = (120, 40, 60)  # the white cell's nucleus
    out = augment.isolate(image, np.random.default_rng(0))
    assert (out[28:36, 28:36] == image[28:36, 28:36]).all()
    assert np.abs(out[:8, :8].astype(int) - (200, 220, 250)).max() <= 1


def test_desaturate_moves_colour_towards_grey() -> None:
    image = np.full((8, 8, 3), (40, 80, 200), np.uint8)
    out = augment.desaturate(image, np.random.default_rng(0))
    assert np.ptp(out[0, 0].astype(int)) < np.ptp(image[0, 0].astype(int))


# ------------------------------------------------------------------------- the training-loop hook
def test_baseline_basic_run_key_is_unchanged_and_robust_differs() -> None:
    """--augment basic must keep the checkpoint keys (and --resume) of runs made before the option."""
    import hashlib
    import json
    from dataclasses import asdict

    from engines import baseline

    data = baseline.PreparedData(["a"], [0.5] * 3, [0.2] * 3, {}, {"train": np.zeros(3)}, {}, {"sha256": "x"})
    basic = baseline.TrainConfig()
    # options added later, at their defaults
    later = ("augment", "context_radius", "norm", "input_norm", "style", "foreign_cells", "foreign_batch",
             "foreign_exclude", "consistency", "consistency_threshold", "init", "resolution", "colour", "amplitude_mix")
    legacy = {k: v for k, v in asdict(basic).items() if k not in later}
    text = json.dumps({"cfg": legacy, "split": "x", "n": {"train": 3}}, sort_keys=True)
    assert baseline.run_key(basic, data) == hashlib.sha256(text.encode()).hexdigest()[:12]
    assert baseline.run_key(baseline.TrainConfig(augment="robust"), data) != baseline.run_key(basic, data)
    assert baseline.run_key(baseline.TrainConfig(context_radius=0.4), data) != baseline.run_key(basic, data)
    assert baseline.run_key(baseline.TrainConfig(norm="group"), data) != baseline.run_key(basic, data)
    assert baseline.run_key(baseline.TrainConfig(resolution=32), data) != baseline.run_key(basic, data)
    assert baseline.run_key(baseline.TrainConfig(colour="grey"), data) != baseline.run_key(basic, data)


@pytest.mark.slow
def test_baseline_trains_one_tiny_epoch_with_robust_augmentation(tmp_path) -> None:
    pytest.importorskip("torch")
    from conftest import SHARED_DATA

    from engines import baseline

    root = SHARED_DATA / "pbc"
    if not (root / "manifest.csv").is_file():
        pytest.skip(f"no PBC data at {root}")
    cfg = baseline.TrainConfig(epochs=1, batch_size=16, per_class_limit=4, augment="robust", threads=1)
    _, _, history = baseline.train(root, cfg, tmp_path, log=lambda *_: None)
    assert len(history["epochs"]) == 1 and np.isfinite(history["epochs"][0]["loss"])
