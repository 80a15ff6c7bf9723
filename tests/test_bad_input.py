"""Bad input through the real command: a clear one-line message, no traceback, nothing published."""

from __future__ import annotations

import shutil
from pathlib import Path

import zmq
from conftest import SAMPLES, run_cli

from edge.client import Subscriber
from edge.messages import TOPIC_CELLS, TOPIC_STATUS


def assert_clean_failure(result, code: int, text: str) -> None:  # type: ignore[no-untyped-def]
    assert result.returncode == code, (result.returncode, result.stderr)
    assert text in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_empty_folder(tmp_path: Path, endpoint: str) -> None:
    assert_clean_failure(run_cli("replay", str(tmp_path), "--publish", endpoint), 1, "no images")


def test_missing_model_file_publishes_nothing(tmp_path: Path, endpoint: str) -> None:
    with Subscriber(endpoint, topics=(TOPIC_CELLS, TOPIC_STATUS)) as subscriber:
        result = run_cli("replay", str(SAMPLES), "--publish", endpoint, "--model", str(tmp_path / "none.onnx"))
        assert_clean_failure(result, 1, "model file not found")
        assert subscriber.receive(0.3) is None


def test_corrupt_model_file(tmp_path: Path, endpoint: str) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model at all")
    assert_clean_failure(
        run_cli("replay", str(SAMPLES), "--publish", endpoint, "--model", str(bad)), 1, "cannot load model"
    )


def test_bad_config_value(tmp_path: Path, endpoint: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[pipeline]\nqueue_size = 0\n")
    result = run_cli("replay", str(SAMPLES), "--publish", endpoint, "--config", str(config))
    assert_clean_failure(result, 2, "pipeline.queue_size = 0 is not allowed")


def test_bad_flag_value_goes_through_the_same_validation(endpoint: str) -> None:
    result = run_cli("replay", str(SAMPLES), "--publish", endpoint, "--fps", "-3")
    assert_clean_failure(result, 2, "source.fps = -3.0 is not allowed")


def test_port_already_in_use(endpoint: str) -> None:
    blocker = zmq.Context.instance().socket(zmq.PUB)
    blocker.bind(endpoint)
    try:
        result = run_cli("replay", str(SAMPLES), "--publish", endpoint)
    finally:
        blocker.close(linger=0)
    assert_clean_failure(result, 1, "Address already in use")


def test_unreadable_image_is_skipped_and_the_rest_published(tmp_path: Path, endpoint: str) -> None:
    shutil.copy(SAMPLES / "BloodImage_00007.jpg", tmp_path / "a.jpg")
    (tmp_path / "b.jpg").write_bytes(b"garbage")
    audit = tmp_path / "audit.jsonl"
    result = run_cli("replay", str(tmp_path), "--publish", endpoint, "--pace", "max", "--audit", str(audit))
    assert result.returncode == 0, result.stderr
    assert "b.jpg: not a readable image" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(audit.read_text().splitlines()) == 1


def test_truncated_video_is_reported_not_fatal(tmp_path: Path, endpoint: str) -> None:
    import cv2

    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 240))
    frame = cv2.resize(cv2.imread(str(SAMPLES / "BloodImage_00007.jpg")), (320, 240))
    for _ in range(20):
        writer.write(frame)
    writer.release()
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    audit = tmp_path / "audit.jsonl"
    result = run_cli(
        "replay",
        str(path),
        "--publish",
        endpoint,
        "--pace",
        "max",
        "--audit",
        str(audit),
        "--config",
        str(_config_for_small_frames(tmp_path)),
    )
    assert result.returncode == 0, result.stderr
    assert "truncated" in result.stderr
    assert 0 < len(audit.read_text().splitlines()) < 20


def _config_for_small_frames(tmp_path: Path) -> Path:
    config = tmp_path / "half.toml"
    config.write_text("[microscope]\num_per_px = 0.15\n")
    return config


def test_unknown_command_is_a_usage_error() -> None:
    result = run_cli("frobnicate")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
