"""The bench display's counting rules, review decisions, slides, CSV and malformed input, without
sockets or a browser (edge/display/state.py)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from edge.display.state import MAX_QUEUE, DecisionError, DisplayState
from edge.messages import TOPIC_CELLS, TOPIC_PREVIEW, TOPIC_STATUS, TOPIC_THUMB, encode

CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
RUN = "20240601T120000-1"


def probs_for(label: str) -> dict[str, float]:
    rest = (1.0 - 0.7) / (len(CLASSES) - 1)
    return {name: 0.7 if name == label else rest for name in CLASSES}


def cell(cell_id: int, kind: str, label: str | None = None, review: bool = False) -> dict[str, Any]:
    classified = kind != "rbc"
    return {
        "id": cell_id,
        "bbox": [10 * cell_id, 10, 20, 20],
        "kind": kind,
        "label": label if classified else None,
        "probs": probs_for(label or "neutrophil") if classified else None,
        "uncertainty": 0.8 if review else 0.1,
        "anomaly": 0.1 if classified else None,
        "review": review,
    }


def cells_message(frame_id: int, cells: list[dict[str, Any]], run: str = RUN, seq: int | None = None) -> dict[str, Any]:
    return {
        "schema": "cytoedge.cells/1",
        "run": run,
        "seq": frame_id if seq is None else seq,
        "published_at": 1.0,
        "frame_id": frame_id,
        "captured_at": 1.0,
        "source": "samples/bccd/BloodImage_00007.jpg",
        "model": "baseline-cnn-1@abc",
        "frame_size": [640, 480],
        "latency_ms": {"total": 12.0},
        "domain_alarm": False,
        "cells": cells,
    }


def thumb_message(frame_id: int, cell_id: int, label: str, run: str = RUN) -> dict[str, Any]:
    return {
        "schema": "cytoedge.thumb/1",
        "run": run,
        "seq": 0,
        "published_at": 1.0,
        "frame_id": frame_id,
        "cell_id": cell_id,
        "cells_seq": frame_id,
        "label": label,
        "top": [[label, 0.5], ["lymphocyte", 0.3], ["monocyte", 0.2]],
        "uncertainty": 0.8,
        "anomaly": 0.1,
        "jpeg": b"\xff\xd8fakejpeg",
    }


def status_message(**changes: Any) -> dict[str, Any]:
    payload = {
        "schema": "cytoedge.status/1",
        "run": RUN,
        "seq": 0,
        "published_at": 1.0,
        "state": "running",
        "source_state": "streaming",
        "source": "samples/bccd",
        "fps": 24.5,
        "frames": {"read": 10, "published": 10, "dropped": 3, "skipped": 0, "rejected": 0},
        "latency_ms": {"total": {"p50": 30.0, "p99": 80.0}},
        "queue_depth": 0,
        "model": "baseline-cnn-1@abc",
        "uptime_s": 4.0,
        "warnings": ["1 unreadable frame(s) skipped"],
        "final": False,
    }
    payload.update(changes)
    return payload


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def display(tmp_path: Path, clock: FakeClock) -> DisplayState:
    return DisplayState(tmp_path / "sessions", target=100, stale_after_s=3.0, clock=clock)


def counts(state: DisplayState) -> dict[str, int]:
    return {row["class"]: row["count"] for row in state.snapshot()["differential"] if row["count"]}


def feed_frame(state: DisplayState) -> None:
    """Frame 0: 2 neutrophils, 1 lymphocyte (flagged), 1 platelet, 3 red cells."""
    state.handle(
        TOPIC_CELLS,
        cells_message(
            0,
            [
                cell(0, "wbc", "neutrophil"),
                cell(1, "wbc", "neutrophil"),
                cell(2, "wbc", "lymphocyte", review=True),
                cell(3, "platelet", "platelet"),
                cell(4, "rbc"),
                cell(5, "rbc"),
                cell(6, "rbc"),
            ],
        ),
    )


def test_white_cells_count_by_label_and_platelets_and_red_cells_by_kind(display: DisplayState) -> None:
    feed_frame(display)
    # A platelet-sized object the model calls a monocyte still counts as a platelet (by kind).
    display.handle(TOPIC_CELLS, cells_message(1, [cell(0, "platelet", "monocyte"), cell(1, "wbc", "eosinophil")]))
    snap = display.snapshot()
    assert counts(display) == {"neutrophil": 2, "lymphocyte": 1, "eosinophil": 1}
    assert snap["white_total"] == 4
    assert snap["platelets"] == 2
    assert snap["red_cells"] == 3
    assert snap["slide"]["frames"] == 2
    assert snap["slide"]["flagged"] == 1
    percent = {row["class"]: row["percent"] for row in snap["differential"]}
    assert percent["neutrophil"] == 50.0 and percent["lymphocyte"] == 25.0 and percent["basophil"] == 0.0


def test_differential_lists_every_white_class_of_the_model_but_not_platelet(display: DisplayState) -> None:
    feed_frame(display)
    rows = [row["class"] for row in display.snapshot()["differential"]]
    assert rows == [name for name in CLASSES if name != "platelet"]


def test_the_same_frame_sent_twice_is_counted_once(display: DisplayState) -> None:
    feed_frame(display)
    feed_frame(display)
    assert display.snapshot()["white_total"] == 3
    assert display.snapshot()["slide"]["frames"] == 1


def test_correction_moves_one_count_and_is_appended_to_the_session_file(
    display: DisplayState, clock: FakeClock
) -> None:
    feed_frame(display)
    clock.now += 5
    decision = display.decide(RUN, 0, 2, "correct", "monocyte")
    assert counts(display) == {"neutrophil": 2, "monocyte": 1}
    assert display.snapshot()["white_total"] == 3
    lines = display.slide.session.path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {
            "time": clock.now,
            "run": RUN,
            "frame_id": 0,
            "cell_id": 2,
            "model_label": "lymphocyte",
            "reviewer_label": "monocyte",
            "action": "correct",
        }
    ]
    assert decision.reviewer_label == "monocyte"


def test_a_decided_cell_keeps_its_crop_beside_the_session_for_adaptation(display: DisplayState) -> None:
    feed_frame(display)
    display.handle(TOPIC_THUMB, thumb_message(0, 2, "lymphocyte", run="run/with odd:chars"))
    display.handle(TOPIC_CELLS, cells_message(1, [cell(0, "wbc", "lymphocyte", review=True)], run="run/with odd:chars"))
    display.handle(TOPIC_THUMB, thumb_message(1, 0, "lymphocyte", run="run/with odd:chars"))
    display.decide("run/with odd:chars", 1, 0, "correct", "monocyte")
    display.decide(RUN, 0, 1, "accept")  # no thumbnail was sent for this cell: nothing to keep
    first, second = (json.loads(line) for line in display.slide.session.path.read_text().splitlines())
    saved = display.slide.session.path.parent / first["crop"]
    assert first["crop"] == f"{display.slide.slide_id}/run_with_odd_chars-1-0.jpg"
    assert saved.read_bytes() == b"\xff\xd8fakejpeg"
    assert "crop" not in second


def test_accept_confirms_the_model_label_without_changing_counts(display: DisplayState) -> None:
    feed_frame(display)
    display.decide(RUN, 0, 2, "accept")
    assert counts(display) == {"neutrophil": 2, "lymphocyte": 1}
    record = json.loads(display.slide.session.path.read_text())
    assert (record["action"], record["model_label"], record["reviewer_label"]) == ("accept", "lymphocyte", "lymphocyte")
    assert display.snapshot()["slide"]["decisions"] == 1


def test_a_later_decision_on_the_same_cell_replaces_the_earlier_one(display: DisplayState) -> None:
    feed_frame(display)
    display.decide(RUN, 0, 2, "correct", "monocyte")
    display.decide(RUN, 0, 2, "correct", "basophil")
    display.decide(RUN, 0, 2, "accept")
    assert counts(display) == {"neutrophil": 2, "lymphocyte": 1}
    assert len(display.slide.session.path.read_text().splitlines()) == 3


def test_reviewer_class_platelet_moves_a_white_cell_to_the_platelet_count_and_back(display: DisplayState) -> None:
    feed_frame(display)
    display.decide(RUN, 0, 0, "correct", "platelet")
    assert display.snapshot()["platelets"] == 2
    assert display.snapshot()["white_total"] == 2
    display.decide(RUN, 0, 3, "correct", "lymphocyte")  # the finder's "platelet" was a small lymphocyte
    assert display.snapshot()["platelets"] == 1
    assert counts(display) == {"neutrophil": 1, "lymphocyte": 2}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((RUN, 0, 99, "correct", "monocyte"), "unknown cell"),
        (("other-run", 0, 2, "correct", "monocyte"), "unknown cell"),
        ((RUN, 0, 4, "correct", "monocyte"), "unknown cell"),  # red cells are not reviewed
        ((RUN, 0, 2, "correct", "blast"), "unknown class 'blast'"),
        ((RUN, 0, 2, "correct", None), "unknown class None"),
        ((RUN, 0, 2, "delete", None), "action must be one of"),
        ((RUN, "0", 2, "accept", None), "integers"),
        ((RUN, 0, 2, "accept", "monocyte"), "accept confirms"),
    ],
)
def test_impossible_decisions_are_refused_and_change_nothing(
    display: DisplayState, args: tuple[Any, ...], message: str
) -> None:
    feed_frame(display)
    with pytest.raises(DecisionError, match=message):
        display.decide(*args)
    assert counts(display) == {"neutrophil": 2, "lymphocyte": 1}
    assert not display.slide.session.path.exists()


def test_new_slide_zeroes_counts_forgets_cells_and_starts_a_new_session_file(
    display: DisplayState, clock: FakeClock
) -> None:
    feed_frame(display)
    display.handle(TOPIC_THUMB, thumb_message(0, 2, "lymphocyte"))
    display.decide(RUN, 0, 2, "correct", "monocyte")
    first = display.slide.session.path
    old_frame_thumb = thumb_message(0, 1, "neutrophil")
    display.new_slide()
    snap = display.snapshot()
    assert (snap["white_total"], snap["platelets"], snap["red_cells"], snap["slide"]["frames"]) == (0, 0, 0, 0)
    assert snap["queue"] == []
    assert display.slide.session.path != first  # same second: a suffixed name, the old file untouched
    lines = [json.loads(line) for line in first.read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["reviewer_label"] == "monocyte"  # the decision, then the slide's end
    assert lines[1]["event"] == "slide-end" and lines[1]["frames"] == {RUN: [0, 0]}
    with pytest.raises(DecisionError, match="unknown cell"):
        display.decide(RUN, 0, 1, "accept")
    display.handle(TOPIC_THUMB, old_frame_thumb)  # a late thumbnail of the old slide is not queued
    assert display.snapshot()["queue"] == []
    assert snap["differential"][0]["class"] == "basophil"  # model classes kept


def test_session_files_are_named_after_the_slide_start(tmp_path: Path, clock: FakeClock) -> None:
    state = DisplayState(tmp_path, clock=clock)
    assert state.slide.session.path.parent == tmp_path
    assert state.slide.session.path.name.startswith("slide-") and state.slide.session.path.suffix == ".jsonl"
    assert state.slide.slide_id == state.slide.session.path.stem


def test_csv_has_class_count_percent_per_white_class_then_totals(display: DisplayState) -> None:
    feed_frame(display)
    display.decide(RUN, 0, 2, "correct", "monocyte")
    rows = list(csv.reader(io.StringIO(display.csv())))
    assert rows[0] == ["class", "count", "percent"]
    table = {row[0]: row[1:] for row in rows[1:]}
    assert table["neutrophil"] == ["2", "66.7"]
    assert table["monocyte"] == ["1", "33.3"]
    assert table["basophil"] == ["0", "0.0"]
    assert "platelet" not in table
    assert table["white_cells_total"] == ["3", "100.0"]
    assert table["platelets"] == ["1", ""]
    assert table["red_cells"] == ["3", ""]


def test_csv_of_an_empty_slide_has_no_division_by_zero(display: DisplayState) -> None:
    rows = list(csv.reader(io.StringIO(display.csv())))
    assert rows[0] == ["class", "count", "percent"]
    assert ["white_cells_total", "0", "0.0"] in rows


def test_flagged_cells_enter_the_review_queue_newest_first(display: DisplayState) -> None:
    feed_frame(display)
    display.handle(TOPIC_CELLS, cells_message(1, [cell(0, "wbc", "monocyte", review=True)]))
    display.handle(TOPIC_THUMB, thumb_message(0, 2, "lymphocyte"))
    display.handle(TOPIC_THUMB, thumb_message(1, 0, "monocyte"))
    queue = display.snapshot()["queue"]
    assert [(item["frame_id"], item["cell_id"], item["label"]) for item in queue] == [
        (1, 0, "monocyte"),
        (0, 2, "lymphocyte"),
    ]
    assert queue[0]["top"][0] == ["monocyte", 0.5]
    assert display.thumb(queue[0]["serial"]) == b"\xff\xd8fakejpeg"
    assert display.snapshot()["queue_pending"] == 2
    display.decide(RUN, 0, 2, "correct", "monocyte")
    queue = display.snapshot()["queue"]
    assert queue[1]["decision"] == "monocyte" and display.snapshot()["queue_pending"] == 1


def test_a_thumbnail_for_a_cell_never_counted_is_not_queued(display: DisplayState) -> None:
    display.handle(TOPIC_THUMB, thumb_message(7, 0, "lymphocyte"))  # its cells message was dropped
    assert display.snapshot()["queue"] == []


def test_review_queue_is_bounded_and_drops_decided_cards_first(display: DisplayState) -> None:
    display.handle(
        TOPIC_CELLS, cells_message(0, [cell(i, "wbc", "lymphocyte", review=True) for i in range(MAX_QUEUE + 5)])
    )
    display.handle(TOPIC_THUMB, thumb_message(0, 0, "lymphocyte"))
    display.decide(RUN, 0, 0, "accept")
    display.handle(TOPIC_THUMB, thumb_message(0, 1, "lymphocyte"))  # oldest undecided
    for i in range(2, MAX_QUEUE + 2):
        display.handle(TOPIC_THUMB, thumb_message(0, i, "lymphocyte"))
    kept = {item.key[2] for item in display.queue}
    assert len(display.queue) == MAX_QUEUE
    assert 0 not in kept and 1 not in kept  # decided one went first, then the oldest


def test_status_fills_the_health_panel_and_the_latest_cells_set_the_domain_alarm(display: DisplayState) -> None:
    display.handle(TOPIC_STATUS, status_message())
    message = cells_message(0, [cell(0, "wbc", "neutrophil", review=True)])
    message["domain_alarm"] = True
    display.handle(TOPIC_CELLS, message)
    health = display.snapshot()["health"]
    assert health["fps"] == 24.5
    assert (health["latency_p50_ms"], health["latency_p99_ms"]) == (30.0, 80.0)
    assert health["dropped"] == 3
    assert health["source_state"] == "streaming"
    assert health["model"] == "baseline-cnn-1@abc"
    assert health["domain_alarm"] is True
    assert health["warnings"] == ["1 unreadable frame(s) skipped"]
    display.handle(TOPIC_CELLS, cells_message(1, [cell(0, "wbc", "neutrophil")]))
    assert display.snapshot()["health"]["domain_alarm"] is False


def test_health_shows_rejected_frames_by_reason_most_frequent_first(display: DisplayState) -> None:
    frames = {"read": 20, "published": 4, "dropped": 0, "skipped": 0, "rejected": 16,
              "rejected_by_reason": {"no_cells": 1, "out_of_focus": 12, "too_dark": 3}}
    display.handle(TOPIC_STATUS, status_message(frames=frames))
    health = display.snapshot()["health"]
    assert health["rejected"] == 16
    assert list(health["rejected_by_reason"].items()) == [("out_of_focus", 12), ("too_dark", 3), ("no_cells", 1)]
    display.handle(TOPIC_STATUS, status_message())  # an older publisher: no breakdown, still a valid status
    assert json.loads(json.dumps(display.snapshot()))["health"]["rejected_by_reason"] == {}  # as the page gets it


def test_health_shows_when_the_alarm_has_not_yet_judged_the_first_cells(display: DisplayState) -> None:
    message = cells_message(0, [cell(0, "wbc", "neutrophil", review=True)])
    message["domain_checked"] = False
    display.handle(TOPIC_CELLS, message)
    assert display.snapshot()["health"]["domain_checked"] is False
    display.handle(TOPIC_CELLS, cells_message(1, [cell(0, "wbc", "neutrophil")]))  # an older service: no field
    assert display.snapshot()["health"]["domain_checked"] is True


def test_preview_keeps_only_the_latest_jpeg(display: DisplayState) -> None:
    for seq in range(3):
        payload = {
            "schema": "cytoedge.preview/1",
            "run": RUN,
            "seq": seq,
            "published_at": 1.0,
            "frame_id": seq * 10,
            "jpeg": bytes([seq]),
            "width": 480,
            "height": 360,
            "scale": 0.75,
        }
        display.handle(TOPIC_PREVIEW, payload)
    assert display.preview_jpeg == bytes([2])
    assert display.snapshot()["preview"] == {"run": RUN, "seq": 2, "frame_id": 20, "width": 480, "height": 360}


@pytest.mark.parametrize(
    ("topic", "data"),
    [
        (TOPIC_CELLS, b"\xc1 not msgpack"),
        (TOPIC_CELLS, encode({"schema": "cytoedge.cells/2", "run": RUN})),
        (TOPIC_CELLS, encode({**cells_message(0, []), "cells": [{"id": 0}]})),
        (TOPIC_CELLS, encode(cells_message(0, [cell(0, "wbc", "neutrophil"), {**cell(1, "wbc"), "label": None}]))),
        (TOPIC_CELLS, encode({**cells_message(0, []), "frame_id": "zero"})),
        (TOPIC_STATUS, encode(status_message(frames="lots"))),
        (TOPIC_THUMB, encode({**thumb_message(0, 0, "neutrophil"), "jpeg": "not bytes"})),
        (TOPIC_PREVIEW, encode({"schema": "cytoedge.preview/1", "run": RUN, "seq": 0})),
        (b"gossip", encode({"schema": "x"})),
    ],
)
def test_malformed_messages_are_counted_and_skipped(display: DisplayState, topic: bytes, data: bytes) -> None:
    feed_frame(display)
    before = display.snapshot()
    assert display.handle_raw(topic, data) is False
    after = display.snapshot()
    assert after["health"]["malformed"] == 1
    assert (after["white_total"], after["platelets"], after["red_cells"]) == (
        before["white_total"],
        before["platelets"],
        before["red_cells"],
    )


def test_well_formed_raw_messages_are_applied(display: DisplayState) -> None:
    assert display.handle_raw(TOPIC_CELLS, encode(cells_message(0, [cell(0, "wbc", "ig")]))) is True
    assert counts(display) == {"ig": 1}
    assert display.snapshot()["health"]["malformed"] == 0


def test_stale_after_no_message_for_the_configured_time(display: DisplayState, clock: FakeClock) -> None:
    assert display.snapshot()["stale"] is True  # nothing yet
    feed_frame(display)
    clock.now += 2.9
    assert display.snapshot()["stale"] is False
    clock.now += 0.2
    snap = display.snapshot()
    assert snap["stale"] is True and snap["last_message_age_s"] == pytest.approx(3.1)


def test_only_targets_of_100_or_200_are_accepted(tmp_path: Path) -> None:
    assert DisplayState(tmp_path, target=200).snapshot()["target"] == 200
    with pytest.raises(ValueError, match="target"):
        DisplayState(tmp_path, target=150)


def test_two_new_slides_within_one_second_get_different_session_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from edge.display.state import DisplayState

    state = DisplayState(tmp_path, clock=lambda: 1_800_000_000.0)
    first = state.slide.session.path
    state.new_slide()
    second = state.slide.session.path
    state.new_slide()
    assert len({first, second, state.slide.session.path}) == 3
