"""The shipper's reading of a live audit log (real files, no server): whole lines only, a torn line
skipped and counted, a replaced log shipped from its start, offsets kept across restarts."""

from __future__ import annotations

import json
import os
from pathlib import Path

from edge.collector.ship import Position, Shipper, ShipperState, read_new
from edge.collector.stream import NatsOptions


def line(seq: int, run: str = "R") -> bytes:
    return json.dumps({"run": run, "seq": seq, "frame_id": seq, "cells": []}).encode() + b"\n"


def test_a_line_still_being_written_waits_for_its_newline(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    log.write_bytes(line(0) + line(1) + line(2)[:10])
    lines, after = read_new(log, Position(), 100)
    assert [json.loads(x)["seq"] for x in lines] == [0, 1]
    assert after.offset == len(line(0) + line(1)) and after.line == 2
    with log.open("ab") as out:
        out.write(line(2)[10:])
    lines, after = read_new(log, after, 100)
    assert [json.loads(x)["seq"] for x in lines] == [2] and after.line == 3


def test_a_line_torn_by_a_crash_is_skipped_and_counted_not_shipped(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    log.write_bytes(line(0) + line(1)[:15] + line(0, run="R2"))  # crash mid-line, then the restarted edge
    shipper = Shipper("bench-1", log, None, tmp_path / "state.json", NatsOptions())
    lines, _ = read_new(log, Position(), 100)
    outgoing = shipper._outgoing("cells", log, lines, 0)
    assert [m.msg_id for m in outgoing] == ["bench-1/cells/R/0"]
    assert shipper.state.skipped == 1


def test_a_replaced_or_truncated_log_is_shipped_from_its_start(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    log.write_bytes(line(0) + line(1))
    _, after = read_new(log, Position(), 100)
    os.rename(log, tmp_path / "audit.jsonl.1")  # logrotate
    log.write_bytes(line(5))
    lines, again = read_new(log, after, 100)
    assert [json.loads(x)["seq"] for x in lines] == [5] and again.inode != after.inode
    log.write_bytes(b"")  # truncated in place
    lines, emptied = read_new(log, again, 100)
    assert lines == [] and emptied.offset == 0


def test_offsets_survive_a_restart_written_then_renamed(tmp_path: Path) -> None:
    state_path = tmp_path / "state.json"
    state = ShipperState({"/x/audit.jsonl": Position(7, 120, 3)}, skipped=2)
    state.save(state_path)
    assert ShipperState.load(state_path) == state
    assert oct(state_path.stat().st_mode & 0o777) == "0o600"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_review_lines_are_named_by_slide_and_line_number(tmp_path: Path) -> None:
    session = tmp_path / "slide-20261130-101500.jsonl"
    session.write_text(json.dumps({"run": "R", "frame_id": 1, "cell_id": 0, "reviewer_label": "monocyte"}) + "\n")
    shipper = Shipper("bench 2", tmp_path / "audit.jsonl", tmp_path, tmp_path / "state.json", NatsOptions())
    lines, _ = read_new(session, Position(), 100)
    [message] = shipper._outgoing("review", session, lines, 0)
    assert message.subject == "cytoedge.bench_2.review"
    assert message.msg_id == "bench_2/review/slide-20261130-101500/1"
    assert json.loads(message.data) == {"slide": session.stem, "line": 1, "record": json.loads(lines[0])}


def test_a_decisions_saved_crop_travels_with_it_and_reaches_the_report(tmp_path: Path) -> None:
    import base64

    import cv2
    import numpy as np

    from edge.report import slide as slides
    from edge.report.pdf import crop_jpeg

    (tmp_path / "slide-a").mkdir()
    _, jpeg = cv2.imencode(".jpg", np.full((32, 32, 3), (0, 0, 200), np.uint8))
    (tmp_path / "slide-a" / "R-3-0.jpg").write_bytes(jpeg.tobytes())
    session = tmp_path / "slide-a.jsonl"
    decision = {"run": "R", "frame_id": 3, "cell_id": 0, "model_label": "ig", "reviewer_label": "monocyte",
                "action": "correct", "crop": "slide-a/R-3-0.jpg"}
    session.write_text(json.dumps(decision) + "\n")
    shipper = Shipper("bench-1", tmp_path / "audit.jsonl", tmp_path, tmp_path / "state.json", NatsOptions())
    lines, _ = read_new(session, Position(), 100)
    [message] = shipper._outgoing("review", session, lines, 0)
    shipped = json.loads(message.data)["record"]
    assert base64.b64decode(shipped["crop_jpeg_b64"]) == jpeg.tobytes()

    cells = {"run": "R", "frame_id": 3, "seq": 3, "cells": [{"id": 0, "kind": "wbc", "label": "ig", "review": True,
                                                             "first_seen": True, "bbox": [0, 0, 5, 5]}]}
    built = slides.build([cells], slides.latest_decisions([shipped]), "slide-a", "bench-1")
    [cell] = built.gallery
    assert crop_jpeg(cell, []) == jpeg.tobytes()  # at the lab, without the edge's files
