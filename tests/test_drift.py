"""The domain alarm: quiet on cells like the training data, loud on another microscope's."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
from conftest import SAMPLES, replay_and_collect

from edge.drift import ALARM_TEXT, DomainAlarm, Reference, ks_distance
from edge.messages import TOPIC_CELLS, TOPIC_STATUS


def normal_reference(rng: np.random.Generator) -> Reference:
    labels = np.array(["a"] * 500 + ["b"] * 500)
    values = np.concatenate([rng.normal(0, 1, 500), rng.normal(5, 1, 500)]).astype(np.float32)
    return Reference.from_samples({"anomaly": values}, labels)


def test_ks_distance_matches_the_textbook_value() -> None:
    quantiles = np.linspace(0, 1, 101, dtype=np.float32)  # uniform(0, 1) reference
    sample = np.array([0.1, 0.2, 0.9], np.float32)
    cdf = Reference({"x": {"anomaly": quantiles}}, {"x": 100}).mixture_cdf("anomaly", {"x": 1.0})
    # Empirical CDF jumps to 2/3 at 0.2 where the uniform CDF is 0.2.
    assert ks_distance(sample, cdf) == pytest.approx(2 / 3 - 0.2, abs=1e-6)


def test_class_mix_alone_does_not_raise_the_alarm() -> None:
    rng = np.random.default_rng(1)
    alarm = DomainAlarm(normal_reference(rng), window=60, min_cells=30)
    for _ in range(300):  # a slide that is all class "b": a different mix, but the same cells
        alarm.update(["b"], {"anomaly": rng.normal(5, 1, 1)})
        assert not alarm.active


def test_shifted_cells_raise_the_alarm_and_it_clears_when_they_go() -> None:
    rng = np.random.default_rng(2)
    alarm = DomainAlarm(normal_reference(rng), window=60, min_cells=30)
    for _ in range(60):
        alarm.update(["a"], {"anomaly": rng.normal(2.5, 1, 1)})
    assert alarm.active
    for _ in range(120):
        alarm.update(["a"], {"anomaly": rng.normal(0, 1, 1)})
    assert not alarm.active


def exact_normal(mean: float, n: int) -> np.ndarray:
    """n evenly spaced quantiles of N(mean, 1): a sample with no sampling noise."""
    return np.array([NormalDist(mean, 1).inv_cdf((i + 0.5) / n) for i in range(n)], np.float32)


def test_every_cell_is_flagged_until_a_full_window_looks_familiar() -> None:
    reference = Reference.from_samples({"anomaly": exact_normal(0, 1000)}, np.array(["a"] * 1000))
    alarm = DomainAlarm(reference, window=60, min_cells=30)
    quiet = DomainAlarm(reference, window=60, min_cells=30, flag_until_checked=False)
    cells = exact_normal(0, 80)[np.random.default_rng(0).permutation(80)]
    for step, value in enumerate(cells):  # in-domain cells: never an alarm, familiar at the first full window
        for each in (alarm, quiet):
            each.update(["a"], {"anomaly": np.array([value])})
        assert alarm.flags_cells == (step + 1 < 60) and not alarm.active
        assert not quiet.flags_cells


def test_an_ambiguous_foreign_window_stays_flagged_without_raising_the_alarm() -> None:
    reference = Reference.from_samples({"anomaly": exact_normal(0, 1000)}, np.array(["a"] * 1000))
    alarm = DomainAlarm(reference, window=60, min_cells=30)
    # Shifted by 0.55 sd: KS distance ~0.22 at 60 cells, between the clear (0.18) and alarm (0.30) levels.
    for value in exact_normal(0.55, 60)[np.random.default_rng(2).permutation(60)]:
        alarm.update(["a"], {"anomaly": np.array([value])})
        assert alarm.flags_cells and not alarm.checked and not alarm.active


def replay_and_watch(folder: Path, endpoint: str, um_per_px: float, tmp_path: Path, *extra: str) -> list[dict]:
    config = tmp_path / "c.toml"
    config.write_text(f"[microscope]\num_per_px = {um_per_px}\n")
    return replay_and_collect(folder, config, endpoint, *extra, timeout=120)


def test_bccd_frames_from_another_microscope_raise_the_alarm_and_flag_every_cell(endpoint: str, tmp_path: Path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    for loop in range(3):  # 60 frames, about 65 white cells: enough for the 60-cell window
        for path in sorted(SAMPLES.glob("*.jpg")):
            shutil.copy(path, frames / f"{loop}-{path.name}")
    messages = replay_and_watch(frames, endpoint, 0.075, tmp_path, "--pace", "max")
    cells = [m for m in messages if m["topic"] == TOPIC_CELLS]
    statuses = [m for m in messages if m["topic"] == TOPIC_STATUS]
    assert cells and cells[-1]["domain_alarm"] is True
    # No frame passes unflagged: every cell is flagged while unchecked, and then by the alarm.
    assert not any(m["domain_checked"] for m in cells)  # foreign: never found familiar
    assert all(c["review"] for m in cells if m["domain_alarm"] or not m["domain_checked"] for c in m["cells"]
               if c["label"] is not None)
    assert all(m["domain_alarm"] or not m["domain_checked"] for m in cells)
    assert any(ALARM_TEXT in s["warnings"] for s in statuses)


def test_pbc_cells_at_their_own_scale_do_not_raise_the_alarm(pbc_dir: Path, endpoint: str, tmp_path: Path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = random.Random(3)
    mix = {"neutrophil": 45, "lymphocyte": 25, "monocyte": 6, "eosinophil": 4}
    for label, count in mix.items():
        for index, path in enumerate(rng.sample(sorted((pbc_dir / label).glob("*.jpg")), count)):
            shutil.copy(path, frames / f"{rng.random():.6f}-{label}-{index}.jpg")
    messages = replay_and_watch(frames, endpoint, 0.25, tmp_path, "--pace", "max")
    cells = [m for m in messages if m["topic"] == TOPIC_CELLS]
    white = sum(1 for m in cells for c in m["cells"] if c["kind"] == "wbc")
    assert len(cells) == 80 and white >= 60, (len(cells), white)
    assert not any(m["domain_alarm"] for m in cells)
    assert not any(ALARM_TEXT in m.get("warnings", []) for m in messages)
    checked = [m for m in cells if m["domain_checked"]]
    white_reviewed = sum(c["review"] for m in checked for c in m["cells"] if c["kind"] == "wbc")
    assert checked and white_reviewed <= 3, white_reviewed  # in domain, once checked: few white cells to review


@pytest.mark.parametrize(("domain", "um_per_px"), [("tecom", 0.188), ("cellavision-blog", 0.099)])
def test_white_cells_from_other_microscopes_raise_the_alarm(domain: str, um_per_px: float) -> None:
    import csv

    import cv2
    from conftest import SHARED_DATA

    from edge import config as cfg
    from edge.crops import cut_crops
    from edge.drift import features
    from edge.models import open_classifier
    from edge.service import build_alarm

    root = SHARED_DATA / "wbc-shift"
    if not root.is_dir():
        pytest.skip(f"wbc-shift data not found at {root} (set CYTOEDGE_SHARED_DATA)")
    classifier = open_classifier(None, "onnxruntime", 1)
    alarm = build_alarm(classifier, cfg.load(None))
    assert alarm is not None
    rows = [r for r in csv.DictReader((root / "manifest.csv").open()) if r["domain"] == domain]
    states = []
    for row in rows[:80]:
        image = cv2.imread(str(root / row["path"]))
        height, width = image.shape[:2]
        crop = cut_crops(
            image, [(0, 0, width, height)], um_per_px, classifier.metadata.field_um, classifier.metadata.input_size
        )
        result = classifier.classify(crop)
        label = classifier.metadata.classes[int(result.probs[0].argmax())]
        states.append(alarm.update([label], features(result.anomaly, result.uncertainty, crop)))
    assert not any(states[:29]), "no verdict before the window has min_cells"
    assert all(states[40:]), f"alarm not steadily on for {domain}"
