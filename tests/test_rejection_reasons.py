"""Why frames are refused, not just the last reason: the real pipeline replays dark, blurred and empty
versions of the bundled samples, and the status it publishes over ZeroMQ on loopback counts rejected
frames per reason kind; `cytoedge status` and `cytoedge watch` show that as one line."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO, SAMPLES, replay_and_collect, run_cli

from edge.client import Subscriber
from edge.messages import TOPIC_STATUS, rejected_by_reason, rejections_text

# The site's focus threshold, as `cytoedge calibrate site` fits it on these samples (about 0.48): every
# sharp sample passes, a 2-pixel blur (focus about 0.3) does not.
CONFIG = "[quality]\nmin_focus = 0.45\n"
EXPECTED = {"no_contrast": 1, "out_of_focus": 3, "too_dark": 2}


@pytest.fixture(scope="module")
def degraded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two good frames, two dark (different levels: different texts, one kind), three blurred and one
    empty field, named so the replay's order is known (the empty field comes last)."""
    root = tmp_path_factory.mktemp("degraded")
    folder = root / "frames"
    folder.mkdir()
    samples = sorted(SAMPLES.glob("*.jpg"))
    images = [cv2.imread(str(path)) for path in samples[:5]]
    frames = {
        "a_good.png": images[0],
        "b_good.png": images[1],
        "c_dark.png": (images[2] * 0.15).astype(np.uint8),
        "d_dark.png": (images[3] * 0.1).astype(np.uint8),
        "e_blurred.png": cv2.GaussianBlur(images[0], (0, 0), 2),
        "f_blurred.png": cv2.GaussianBlur(images[1], (0, 0), 2),
        "g_blurred.png": cv2.GaussianBlur(images[4], (0, 0), 2),
        "h_empty.png": np.clip(np.random.default_rng(0).normal(200, 2, images[0].shape), 0, 255).astype(np.uint8),
    }
    for name, image in frames.items():
        assert cv2.imwrite(str(folder / name), image)
    (root / "site.toml").write_text(CONFIG)
    return folder


def test_final_status_counts_rejected_frames_per_reason_and_keeps_the_last_reason(
        degraded: Path, endpoint: str) -> None:
    messages = replay_and_collect(degraded, degraded.parent / "site.toml", endpoint, "--pace", "max")
    final = next(m for m in messages if m["topic"] == TOPIC_STATUS and m.get("final"))
    frames = final["frames"]
    assert frames["rejected_by_reason"] == EXPECTED
    assert list(frames["rejected_by_reason"]) == sorted(EXPECTED)  # stable key order on the wire
    assert frames["rejected"] == sum(EXPECTED.values()) == 6
    assert frames["published"] == 2
    assert any(w.startswith("6 frame(s) rejected") and "(last: no contrast" in w for w in final["warnings"])
    assert rejections_text(final) == "out_of_focus 3, too_dark 2, no_contrast 1"  # most frequent first


def test_status_and_watch_each_print_one_line_of_rejections_by_reason(degraded: Path, endpoint: str) -> None:
    """The real commands against a looping replay: `status` while it runs, `watch` up to its final status."""
    watch = subprocess.Popen([sys.executable, "-m", "edge", "watch", endpoint, "--exit-on-end", "--timeout", "60"],
                             cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    replay = subprocess.Popen(
        [sys.executable, "-m", "edge", "-q", "replay", str(degraded), "--publish", endpoint, "--config",
         str(degraded.parent / "site.toml"), "--pace", "recorded", "--fps", "20", "--loop"],
        cwd=REPO, stderr=subprocess.PIPE, text=True,
    )
    try:
        with Subscriber(endpoint, topics=(TOPIC_STATUS,)) as subscriber:  # wait for a whole loop's rejections
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                received = subscriber.receive(0.5)
                if received is not None and set(rejected_by_reason(received.payload)) == set(EXPECTED):
                    break
            else:
                pytest.fail("no status counted every kind of rejection in time")
        status = run_cli("status", endpoint, "--timeout", "10")
        replay.terminate()  # its final status ends `watch --exit-on-end`
        _, replay_err = replay.communicate(timeout=30)
        watched, watch_err = watch.communicate(timeout=30)
    finally:
        for process in (replay, watch):
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert status.returncode == 0, status.stderr
    lines = [line for line in status.stdout.splitlines() if "rejected frames by reason" in line]
    assert len(lines) == 1 and all(kind in lines[0] for kind in EXPECTED), status.stdout
    assert watch.returncode == 0, watch_err
    last_screen = watched.strip().split("\n\n")[-1]
    lines = [line for line in last_screen.splitlines() if line.startswith("rejected frames by reason: ")]
    assert len(lines) == 1, last_screen
    counts = [int(n) for _kind, n in re.findall(r"(\w+) (\d+)", lines[0].split(": ", 1)[1])]
    assert len(counts) == 3 and counts == sorted(counts, reverse=True), lines[0]
    assert "Traceback" not in replay_err + watch_err

