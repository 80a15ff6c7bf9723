"""`cytoedge bench` as CI runs it: a short smoke run of each mode (figures are printed, never asserted)."""

from __future__ import annotations

import json

import cv2
import pytest
from conftest import SAMPLES, run_cli

from edge.benchinput import tiled_frame, write_tiled
from edge.errors import ConfigError


def test_tiled_input_is_camera_sized_real_frames_and_reproducible(tmp_path) -> None:  # type: ignore[no-untyped-def]
    first = write_tiled(SAMPLES, tmp_path / "a", (1920, 1080), count=3)
    again = write_tiled(SAMPLES, tmp_path / "b", (1920, 1080), count=3)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    frame = cv2.imread(str(first[1]))
    assert frame.shape == (1080, 1920, 3)
    tiles = [cv2.imread(str(p)) for p in sorted(SAMPLES.glob("*.jpg"))]
    assert (tiled_frame(tiles, 1, (1920, 1080))[:480, :640] == tiles[1]).all()  # frame k starts at tile k


MODES = [(), ("--fps", "30"), ("--in-memory",), ("--in-memory", "--fps", "30")]


@pytest.mark.parametrize("mode", MODES, ids=["max", "30fps", "mem", "mem30"])
def test_short_tiled_bench_reports_every_stage(mode: tuple[str, ...]) -> None:
    result = run_cli("-q", "bench", "--tiled", "960x540", "--frames", "6", "--json", *mode, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["frame_size"] == "960x540"
    assert report["frames"] + report["dropped"] + report["rejected"] == 6
    assert set(report["breakdown_ms"]) == {"decode", "gate", "finder", "crop", "classify", "track", "publish"}
    assert report["offered_fps"] == (30.0 if "--fps" in mode else "max")


def test_human_report_names_where_the_time_goes() -> None:
    result = run_cli("-q", "bench", "--frames", "4", timeout=300)
    assert result.returncode == 0, result.stderr
    for stage in ("decode", "finder", "crop", "classify", "publish", "CPU per frame"):
        assert stage in result.stdout


def test_a_bad_frame_size_is_one_line_and_exit_2() -> None:
    result = run_cli("bench", "--tiled", "big")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "WIDTHxHEIGHT" in result.stderr


def test_frame_size_limits() -> None:
    with pytest.raises(ConfigError):
        from edge.benchinput import parse_size

        parse_size("10x10")
