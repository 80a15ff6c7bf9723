"""A live OpenCV source through the whole service: the camera vanishes and comes back, and the
pipeline keeps running, publishes each state change, and resumes classifying."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import cv2
from conftest import REPO, SAMPLES

from edge.client import Subscriber
from edge.messages import TOPIC_CELLS, TOPIC_STATUS


def write_camera_stream(path: Path, loops: int = 2) -> None:
    """A real MJPG video of the sample frames, standing in for a camera's stream."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (640, 480))
    for _ in range(loops):
        for frame in sorted(SAMPLES.glob("*.jpg")):
            writer.write(cv2.imread(str(frame)))
    writer.release()


def test_camera_that_vanishes_and_returns_is_reported_and_resumed(tmp_path: Path, endpoint: str) -> None:
    video = tmp_path / "camera.avi"
    write_camera_stream(video)
    config = tmp_path / "c.toml"
    config.write_text(
        f'[source]\nkind = "opencv"\n[camera]\ndevice = "{video}"\nstall_timeout_s = 1.0\n'
        "reconnect_initial_s = 0.1\nreconnect_max_s = 0.4\n"
        f'[publish]\nendpoint = "{endpoint}"\nstatus_interval_s = 0.2\n'
    )
    states: list[str] = []
    cells_after_return = 0
    with Subscriber(endpoint, topics=(TOPIC_CELLS, TOPIC_STATUS)) as subscriber:
        process = subprocess.Popen([sys.executable, "-m", "edge", "-q", "run", "--config", str(config)], cwd=REPO,
                                   stderr=subprocess.PIPE, text=True)
        try:
            phase = "streaming"
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                received = subscriber.receive(0.5)
                if received is None:
                    continue
                if received.topic == TOPIC_STATUS:
                    state = received.payload["source_state"]
                    if not states or states[-1] != state:
                        states.append(state)
                    if phase == "streaming" and state == "streaming":
                        video.rename(tmp_path / "unplugged.avi")  # the cable is pulled
                        phase = "vanished"
                    elif phase == "vanished" and state == "reconnecting":
                        time.sleep(1.0)
                        (tmp_path / "unplugged.avi").rename(video)  # ... and plugged back in
                        phase = "returned"
                elif phase == "returned" and states[-1] == "streaming":
                    cells_after_return += 1
                    if cells_after_return >= 5:
                        break
            assert process.poll() is None, "the service must keep running through the outage"
        finally:
            process.terminate()
            _out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert "reconnecting" in states
    assert states.index("reconnecting") < len(states) - 1 and states[-1] == "streaming", states
    assert cells_after_return >= 5
    assert "Traceback" not in err
