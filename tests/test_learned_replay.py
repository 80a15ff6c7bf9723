"""`[detector] method = "learned"` end to end: `cytoedge replay` runs the learned finder on the bundled
frames and a real ZeroMQ subscriber on loopback receives the white cells it found, classified."""

from __future__ import annotations

from pathlib import Path

from conftest import SAMPLES, replay_and_collect

from edge.messages import TOPIC_CELLS, TOPIC_STATUS


def test_replay_with_the_learned_finder_publishes_each_frames_white_cells(tmp_path: Path, endpoint: str) -> None:
    config = tmp_path / "learned.toml"
    config.write_text('[detector]\nmethod = "learned"\n\n[source]\npace = "max"\n')
    messages = replay_and_collect(SAMPLES, config, endpoint)
    final = next(m for m in messages if m["topic"] == TOPIC_STATUS and m.get("final"))
    frames = [m for m in messages if m["topic"] == TOPIC_CELLS]
    assert final["frames"]["published"] == len(frames) == 20
    white = [c for m in frames for c in m["cells"] if c["kind"] == "wbc"]
    # 22 white cells are boxed in these 20 frames; each cell carries a class and an uncertainty
    assert 20 <= len(white) <= 26
    assert all(c["label"] and 0.0 <= c["uncertainty"] <= 1.0 for c in white)
