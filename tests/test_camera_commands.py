"""`cytoedge calibrate` and `cytoedge record` through the real command line, on the bundled frames."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import SAMPLES, run_cli

from edge import config as cfg


def test_calibrate_scale_writes_the_estimate_into_the_config_and_keeps_comments(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'# lab config\n[source]\npath = "{SAMPLES}"\n[microscope]\num_per_px = 0.1  # old guess\n')
    result = run_cli("calibrate", "scale", "--config", str(config), "--frames", "8", "--write")
    assert result.returncode == 0, result.stderr
    value = cfg.load(config)["microscope"]["um_per_px"]
    assert 0.068 < value < 0.082  # BCCD: a red cell of ~7.5 µm is ~100 px
    text = config.read_text()
    assert text.startswith("# lab config") and "# old guess" in text


def test_calibrate_write_without_a_config_file_is_a_usage_error() -> None:
    result = run_cli("calibrate", "focus", "--frames", "4", "--write")
    assert result.returncode == 2
    assert "--write needs --config FILE" in result.stderr and "Traceback" not in result.stderr


def test_stage_micrometer_value_is_written_as_given(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[microscope]\num_per_px = 0.1\n")
    result = run_cli("calibrate", "scale", "--stage-micrometer", "0.0734", "--write", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert cfg.load(config)["microscope"]["um_per_px"] == 0.0734


def test_record_then_replay_publishes_the_same_cells(tmp_path: Path, endpoint: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[source]\npath = "{SAMPLES}"\npace = "max"\n')
    session = tmp_path / "session"
    recorded = run_cli("record", str(session), "--config", str(config))
    assert recorded.returncode == 0, recorded.stderr
    assert len((session / "index.jsonl").read_text().splitlines()) == 20
    audits = []
    for name, path in (("original", SAMPLES), ("recorded", session)):
        audit = tmp_path / f"{name}.jsonl"
        result = run_cli("replay", str(path), "--publish", endpoint, "--pace", "max", "--audit", str(audit))
        assert result.returncode == 0, result.stderr
        audits.append([json.loads(line)["cells"] for line in audit.read_text().splitlines()])
    assert audits[0] == audits[1]


def test_calibrate_site_writes_scale_and_gate_in_one_go_and_keeps_comments(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("# bench 3\n[microscope]\num_per_px = 0.2  # guess\n")
    result = run_cli("calibrate", "site", "--from", str(SAMPLES), "--frames", "20", "--config", str(config),
                     "--write")
    assert result.returncode == 0, result.stderr
    assert "confidence" in result.stdout and "quality:" in result.stdout and "finder:" in result.stdout
    assert "learned finder (in use: [detector] method = learned): cells per frame: wbc 1." in result.stdout
    loaded = cfg.load(config)
    assert 0.065 < loaded["microscope"]["um_per_px"] < 0.08
    assert loaded["quality"]["min_focus"] > 0 and loaded["quality"]["min_contrast"] > 0
    assert "# guess" in config.read_text() and [p.name for p in tmp_path.iterdir()] == ["c.toml"]


def test_calibrate_site_on_frames_without_cells_refuses_in_one_line(tmp_path: Path) -> None:
    import cv2
    import numpy as np

    blank = tmp_path / "blank"
    blank.mkdir()
    for i in range(6):
        cv2.imwrite(str(blank / f"{i}.png"), np.full((480, 640, 3), 200, np.uint8))
    config = tmp_path / "c.toml"
    config.write_text("[microscope]\num_per_px = 0.1\n")
    result = run_cli("calibrate", "site", "--from", str(blank), "--frames", "6", "--config", str(config), "--write")
    assert result.returncode == 1
    assert "scale: only 0 red cell(s)" in result.stderr and "Traceback" not in result.stderr
    assert config.read_text() == "[microscope]\num_per_px = 0.1\n"  # nothing written
