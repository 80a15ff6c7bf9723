"""The whole path: `cytoedge replay` in a child process -> real ZeroMQ socket on loopback -> subscriber."""

from __future__ import annotations

import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import REPO, SAMPLES, run_cli

from edge.client import Subscriber
from edge.messages import TOPIC_CELLS, TOPIC_STATUS


def start_replay(endpoint: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "edge", "-q", "replay", str(SAMPLES), "--publish", endpoint, *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wbc_boxes(frame_path: str) -> list[tuple[int, int, int, int]]:
    xml = SAMPLES / "annotations" / (Path(frame_path).stem + ".xml")
    boxes = []
    for obj in ET.parse(xml).findall("object"):
        if obj.findtext("name") == "WBC":
            box = obj.find("bndbox")
            x0, y0, x1, y1 = (int(float(box.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append((x0, y0, x1 - x0, y1 - y0))
    return boxes


def iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    w = max(0, min(ax1, bx1) - max(a[0], b[0]))
    h = max(0, min(ay1, by1) - max(a[1], b[1]))
    inter = w * h
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union else 0.0


def collect_one_full_loop(subscriber: Subscriber, frames: int, timeout_s: float = 60) -> list[dict]:
    """Messages for frame ids covering every sample exactly once, with consecutive seq numbers."""
    run: list[dict] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        received = subscriber.receive(1.0)
        if received is None or received.topic != TOPIC_CELLS:
            continue
        message = received.payload
        if run and message["seq"] != run[-1]["seq"] + 1:
            run = []
        if not run and message["frame_id"] % frames != 0:
            continue
        run.append(message)
        if len(run) == frames:
            return run
    pytest.fail("did not receive a full gap-free loop of the samples in time")


def test_replay_publishes_one_gap_free_cells_message_per_frame_with_correct_boxes(endpoint: str) -> None:
    with Subscriber(endpoint, topics=(TOPIC_CELLS, TOPIC_STATUS)) as subscriber:
        process = start_replay(endpoint, "--pace", "recorded", "--fps", "20", "--loop")
        try:
            run = collect_one_full_loop(subscriber, frames=20)
        finally:
            process.terminate()
            _out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert [Path(m["source"]).name for m in run] == sorted(p.name for p in SAMPLES.glob("*.jpg"))
    expected = found = 0
    for message in run:
        truth = wbc_boxes(message["source"])
        predicted = [c["bbox"] for c in message["cells"] if c["kind"] == "wbc"]
        expected += len(truth)
        found += sum(any(iou(t, p) >= 0.5 for p in predicted) for t in truth)
        for cell in message["cells"]:
            if cell["kind"] in ("wbc", "platelet"):
                assert abs(sum(cell["probs"].values()) - 1.0) < 1e-3
                assert cell["label"] == max(cell["probs"], key=cell["probs"].get)
                assert 0.0 <= cell["uncertainty"] <= 1.0 and 0.0 <= cell["anomaly"] <= 1.0
    assert found / expected >= 0.95, f"white-cell recall {found}/{expected}"


def test_late_subscriber_gets_status_within_a_second(endpoint: str) -> None:
    process = start_replay(endpoint, "--pace", "recorded", "--fps", "2", "--loop")
    try:
        time.sleep(2.0)  # the publisher is well under way before this subscriber arrives
        with Subscriber(endpoint, topics=(TOPIC_STATUS,)) as subscriber:
            joined = time.monotonic()
            received = subscriber.receive(timeout_s=1.5)
            waited = time.monotonic() - joined
    finally:
        process.terminate()
        process.communicate(timeout=20)
    assert received is not None and received.topic == TOPIC_STATUS
    assert waited <= 1.0
    assert received.payload["state"] == "running"
    assert received.payload["model"].startswith(("baseline", "student"))


def test_sigterm_finishes_and_publishes_a_final_status(endpoint: str) -> None:
    with Subscriber(endpoint, topics=(TOPIC_STATUS,)) as subscriber:
        process = start_replay(endpoint, "--pace", "recorded", "--fps", "10", "--loop")
        assert subscriber.receive(timeout_s=10) is not None
        process.terminate()
        final = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and final is None:
            received = subscriber.receive(timeout_s=1)
            if received is not None and received.payload.get("final"):
                final = received.payload
        process.communicate(timeout=20)
    assert process.returncode == 0
    assert final is not None and final["state"] == "stopped"


def test_replay_to_the_end_exits_0_with_finished_state(endpoint: str, tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    result = run_cli("-q", "replay", str(SAMPLES), "--publish", endpoint, "--pace", "max", "--audit", str(audit))
    assert result.returncode == 0, result.stderr
    lines = audit.read_text().splitlines()
    assert len(lines) == 20
    import json

    assert [json.loads(line)["seq"] for line in lines] == list(range(20))
