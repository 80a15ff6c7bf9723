"""What the pipeline publishes: the same cells, byte for byte, however it is scheduled.

``tests/data/replay-cells/baseline.json`` was written by the pipeline as it was before the speed-ups
of issue 19 (one thread, one frame at a time, crops cut per cell); the replay below must still
publish exactly those `cells` and `thumb` messages (everything but the run id, clock times and
latencies). Rewrite it only for a change that is meant to alter the published cells, and then with
the unhurried pipeline: issue 14's new cell finder was recorded by running ``--write`` on the pipeline as
it was before the speed-ups (commit 3f66a46) with only the finder and quality gate of the new code
dropped in; the fast pipeline matched it byte for byte. ``python tests/test_pipeline.py --write``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "bccd"
BASELINE = REPO / "tests" / "data" / "replay-cells" / "baseline.json"
VOLATILE = ("run", "published_at", "captured_at")  # differ on every run; everything else must not


def doubled_samples(folder: Path) -> Path:
    """Each bundled frame twice in a row, so the tracker's 'seen before' path is exercised too."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, frame in enumerate(sorted(SAMPLES.glob("*.jpg"))):
        for copy in range(2):
            (folder / f"{2 * index + copy:03d}.jpg").write_bytes(frame.read_bytes())
    return folder


def stable(topic: bytes, message: dict[str, Any]) -> dict[str, Any]:
    """A published message without what changes between runs, and its msgpack digest (wire bytes)."""
    from edge.messages import encode

    fixed = dict(message)
    for name in VOLATILE:
        fixed[name] = None
    if "latency_ms" in fixed:
        fixed["latency_ms"] = {name: 0.0 for name in fixed["latency_ms"]}
    if "source" in fixed:
        fixed["source"] = Path(fixed["source"]).name
    digest = hashlib.sha256(encode(fixed)).hexdigest()
    if "jpeg" in fixed:
        fixed["jpeg"] = hashlib.sha256(fixed["jpeg"]).hexdigest()
    return {"topic": topic.decode(), "sha256": digest, "payload": fixed}


def replay_messages(
    folder: Path, prepare: Callable[[Any], None] | None = None, **overrides: Any
) -> list[dict[str, Any]]:
    """Replay ``folder`` once at full speed through the service's pipeline; the `cells` and `thumb`
    messages in publishing order."""
    from edge import config as cfg
    from edge.messages import TOPIC_CELLS, TOPIC_THUMB
    from edge.service import build_pipeline

    config = cfg.with_overrides(
        cfg.load(None),
        "test",
        source__path=str(folder),
        source__pace="max",
        publish__endpoint="tcp://127.0.0.1:*",
        publish__warmup_s=0.0,
        publish__preview_interval_s=0.0,
        model__path=str(REPO / "engines" / "models" / "baseline-cnn" / "model.onnx"),
        detector__method="classic",  # the finder the baseline was recorded with (the default is now learned)
        **overrides,
    )
    pipeline = build_pipeline(config)
    if prepare is not None:
        prepare(pipeline)
    sent: list[dict[str, Any]] = []
    publish = pipeline.publisher.publish

    def recording(topic: bytes, payload: dict[str, Any]) -> dict[str, Any]:
        message = publish(topic, payload)
        if topic in (TOPIC_CELLS, TOPIC_THUMB):
            sent.append(stable(topic, message))
        return message

    pipeline.publisher.publish = recording  # type: ignore[method-assign]
    try:
        assert pipeline.run() == 0
    finally:
        pipeline.publisher.close()
    return sent


def baseline() -> list[dict[str, Any]]:
    return json.loads(BASELINE.read_text(encoding="utf-8"))


# ONNX Runtime's CPU kernels differ by instruction set (the baseline was recorded on another x86 CPU), so
# a probability may land a few steps of its 5-decimal rounding away: that is the only difference allowed.
PROBABILITY_STEP = 1e-4


def same_content(new: Any, old: Any) -> bool:
    """Equal, except floats may differ by a few rounding steps of the published probabilities."""
    if isinstance(new, float) and isinstance(old, float):
        return abs(new - old) <= PROBABILITY_STEP
    if isinstance(new, dict) and isinstance(old, dict):
        return new.keys() == old.keys() and all(same_content(new[k], old[k]) for k in new)
    if isinstance(new, list) and isinstance(old, list):
        return len(new) == len(old) and all(same_content(a, b) for a, b in zip(new, old, strict=True))
    return bool(new == old)


def assert_same_messages(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert [m["topic"] for m in got] == [m["topic"] for m in expected]
    for new, old in zip(got, expected, strict=True):
        assert same_content(new["payload"], old["payload"]), (new["payload"], old["payload"])
        if new["payload"] == old["payload"]:
            assert new["sha256"] == old["sha256"], "same content, different bytes on the wire"


def test_replay_publishes_the_same_cells_and_thumbs_as_before_the_speed_ups(tmp_path: Path) -> None:
    assert_same_messages(replay_messages(doubled_samples(tmp_path / "frames")), baseline())


class SlowModel:
    """The real model, made slow, so frames pile up in front of it (fault injection, not a fake)."""

    def __init__(self, inner: Any, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s
        self.metadata, self.model_id, self.path = inner.metadata, inner.model_id, inner.path
        self.batch_rows: list[int] = []

    def classify(self, crops: Any) -> Any:
        self.batch_rows.append(len(crops))
        time.sleep(self.delay_s)
        return self.inner.classify(crops)


def test_frames_waiting_for_a_slow_model_are_batched_in_order_with_the_same_cells(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edge.pipeline

    monkeypatch.setattr(edge.pipeline, "HANDOFF_FRAMES", 3)  # room for a batch to gather
    pipelines = []

    def slow_down(pipeline: Any) -> None:
        pipeline.classifier = SlowModel(pipeline.classifier, 0.08)
        pipelines.append(pipeline)

    got = replay_messages(doubled_samples(tmp_path / "frames"), prepare=slow_down)
    assert pipelines[0].frames_classified > pipelines[0].model_calls, "no frames were batched: this proved nothing"
    assert_same_messages(got, baseline())


def test_a_frame_that_cannot_be_classified_does_not_take_its_batch_mates_with_it() -> None:
    import numpy as np

    from edge import config as cfg
    from edge.frames import Frame
    from edge.service import build_pipeline

    config = cfg.with_overrides(cfg.load(None), "test", publish__endpoint="tcp://127.0.0.1:*", publish__warmup_s=0.0)
    camera = FastCamera(0)
    pipeline = build_pipeline(config, source=camera)
    try:
        batch = [pipeline.find(Frame(image, index, 0.0, "test")) for index, image in enumerate(camera.images[:3])]
        batch[1].crops = np.zeros((2, 10, 10, 3), np.uint8)  # not what the model takes
        messages = pipeline._publish_batch(batch)
    finally:
        pipeline.publisher.close()
    assert [m is not None for m in messages] == [True, False, True]
    assert [m["frame_id"] for m in messages if m] == [0, 2]
    assert pipeline.counters.errors == 1 and pipeline.counters.published == 2


class FastCamera:
    """A live source offering the bundled frames faster than the model can take them."""

    live = True
    name = "test camera"

    def __init__(self, count: int) -> None:
        from edge.replay import SourceStats

        self.count, self.state, self.stats = count, "streaming", SourceStats()
        self.images = [cv2.imread(str(p)) for p in sorted(SAMPLES.glob("*.jpg"))]

    def frames(self, stop: threading.Event) -> Iterator[Any]:
        from edge.frames import Frame

        for index in range(self.count):
            if stop.wait(0.005):
                return
            self.stats.read += 1
            yield Frame(self.images[index % len(self.images)], index, time.time(), self.name)
        self.state = "ended"


def test_a_live_source_ahead_of_the_model_loses_the_oldest_frames_never_the_order() -> None:
    from edge import config as cfg
    from edge.messages import TOPIC_CELLS
    from edge.service import build_pipeline

    config = cfg.with_overrides(cfg.load(None), "test", publish__endpoint="tcp://127.0.0.1:*", publish__warmup_s=0.0)
    camera = FastCamera(60)
    pipeline = build_pipeline(config, source=camera)
    pipeline.classifier = SlowModel(pipeline.classifier, 0.05)
    published: list[int] = []
    publish = pipeline.publisher.publish

    def recording(topic: bytes, payload: dict[str, Any]) -> dict[str, Any]:
        if topic == TOPIC_CELLS:
            published.append(payload["frame_id"])
        return publish(topic, payload)

    pipeline.publisher.publish = recording  # type: ignore[method-assign]
    try:
        assert pipeline.run() == 0
    finally:
        pipeline.publisher.close()
    assert pipeline.queue.dropped > 0, "the camera never got ahead, so this test proved nothing"
    assert published == sorted(published) and len(set(published)) == len(published)
    assert len(published) + pipeline.queue.dropped + pipeline.counters.rejected == 60
    assert published[-1] == 59, "the newest frame is never the one dropped"


def test_the_per_frame_cap_limits_classified_cells_and_keeps_every_red_cell() -> None:
    from edge.cellfinder import Detection
    from edge.pipeline import cap_classified

    kinds = ["rbc", "wbc", "rbc", "platelet", "wbc", "rbc", "platelet"]
    detections = [Detection(kind, (i, i, 5, 5), 1.0) for i, kind in enumerate(kinds)]
    kept, left_out = cap_classified(detections, 2)
    assert [d.kind for d in kept] == ["rbc", "wbc", "rbc", "platelet", "rbc"]
    assert left_out == 2


if __name__ == "__main__" and "--write" in sys.argv:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        messages = replay_messages(doubled_samples(Path(tmp) / "frames"))
    BASELINE.write_text("[\n" + ",\n".join(json.dumps(m) for m in messages) + "\n]\n", encoding="utf-8")
    print(f"wrote {len(messages)} messages to {BASELINE}")
