"""The bench display end to end: a real ZeroMQ publisher on loopback, the real display server, and
the real page in headless Chromium (driven by playwright). Also the HTTP side without a browser:
coalesced Server-Sent Events and the 400 answers for impossible decisions."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import msgpack
import pytest
import zmq
from conftest import REPO, SAMPLES, free_port, run_cli

from edge.display.server import DisplayServer
from edge.messages import SCHEMA_BY_TOPIC, TOPIC_CELLS, TOPIC_PREVIEW, TOPIC_STATUS, TOPIC_THUMB, TOPICS

CHROMIUM = Path(os.environ.get("CYTOEDGE_CHROMIUM", "/usr/bin/chromium"))
FRAME = SAMPLES / "BloodImage_00007.jpg"
CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
ARTIFACTS = REPO / "artifacts"
STALE_AFTER_S = 1.5

ANNOTATION = SAMPLES / "annotations" / "BloodImage_00007.xml"
# The frame's one white cell is given these labels in turn (frame_id % 3), so the differential has
# three classes; the lymphocyte calls are the uncertain ones that go to review.
WBC_LABELS = ("neutrophil", "lymphocyte", "monocyte")
FLAGGED_LABEL = "lymphocyte"
PLATELET_BOX = [425, 272, 24, 24]  # the small dark body right of the white cell (not in the annotation)


def frame_boxes() -> list[tuple[list[int], str]]:
    """The cells of the sample frame from its BCCD annotation (VOC xmin..ymax -> [x, y, w, h])."""
    kinds = {"WBC": "wbc", "RBC": "rbc", "Platelets": "platelet"}
    boxes = []
    for obj in ET.parse(ANNOTATION).getroot().iter("object"):
        box = obj.find("bndbox")
        assert box is not None
        x0, y0, x1, y1 = (int(box.findtext(k) or 0) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append(([x0, y0, x1 - x0, y1 - y0], kinds[obj.findtext("name") or ""]))
    return [*boxes, (PLATELET_BOX, "platelet")]


# -- the publisher side, in one fixture ---------------------------------------------------------
class HandPublisher:
    """Publishes contract-conforming messages built from the real sample frame on an XPUB socket.

    XPUB (a PUB that also sees subscriptions) lets the burst wait until the display has subscribed
    to every topic, so nothing is lost to ZeroMQ's slow-joiner window and the expected counts are
    exact. One thread owns the socket; status goes out every 0.25 s until `stop()`.
    """

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.run = f"test-{os.getpid()}-{time.monotonic_ns()}"
        self.sent_cells: list[dict[str, Any]] = []
        self._seq: Counter[bytes] = Counter()
        self._commands: queue.Queue[tuple[int, float, threading.Event]] = queue.Queue()
        self._subscribed: set[bytes] = set()
        self._all_subscribed = threading.Event()
        self._stop = threading.Event()
        image = cv2.imread(str(FRAME))
        assert image is not None, FRAME
        self._image = image
        self._boxes = frame_boxes()
        self._frames_sent = 0
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.XPUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, 100_000)
        self._socket.bind(endpoint)
        self._thread = threading.Thread(target=self._loop, name="hand-publisher", daemon=True)
        self._thread.start()

    # API the test uses (a replacement fixture, e.g. the real `cytoedge replay`, provides the same)
    def publish_frames(self, count: int, fps: float = 0.0, timeout: float = 30.0) -> None:
        """Send `count` frames (0 fps: as fast as possible) once the display has subscribed; blocks."""
        assert self._all_subscribed.wait(timeout), "the display never subscribed"
        done = threading.Event()
        self._commands.put((count, fps, done))
        assert done.wait(timeout), "publishing took too long"

    def published_cells(self) -> list[dict[str, Any]]:
        return list(self.sent_cells)

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close(linger=0)
        self._context.term()

    # the socket's thread
    def _loop(self) -> None:
        last_status = 0.0
        while not self._stop.is_set():
            while self._socket.poll(0, zmq.POLLIN):
                event = self._socket.recv()
                if event[:1] == b"\x01":
                    self._subscribed.add(event[1:])
                    if self._subscribed >= set(TOPICS):
                        self._all_subscribed.set()
            try:
                count, fps, done = self._commands.get(timeout=0.02)
            except queue.Empty:
                pass
            else:
                for _ in range(count):
                    self._send_frame()
                    if fps:
                        time.sleep(1.0 / fps)
                    if time.monotonic() - last_status > 0.25:
                        self._send_status()
                        last_status = time.monotonic()
                done.set()
            if time.monotonic() - last_status > 0.25:
                self._send_status()
                last_status = time.monotonic()

    def _send(self, topic: bytes, payload: dict[str, Any]) -> dict[str, Any]:
        message = {
            "schema": SCHEMA_BY_TOPIC[topic],
            "run": self.run,
            "seq": self._seq[topic],
            "published_at": time.time(),
            **payload,
        }
        self._seq[topic] += 1
        self._socket.send_multipart([topic, msgpack.packb(message, use_bin_type=True)])
        return message

    def _send_frame(self) -> None:
        frame_id = self._frames_sent
        self._frames_sent += 1
        cells = []
        for cell_id, (bbox, kind) in enumerate(self._boxes):
            classified = kind != "rbc"
            label = {"wbc": WBC_LABELS[frame_id % len(WBC_LABELS)], "platelet": "platelet"}.get(kind)
            review = label == FLAGGED_LABEL
            probs = None
            if classified:
                runner_up = "monocyte" if label != "monocyte" else "lymphocyte"
                probs = {name: 0.2 / (len(CLASSES) - 2) for name in CLASSES}
                probs.update({label: 0.55, runner_up: 0.25})
            cells.append(
                {
                    "id": cell_id,
                    "bbox": bbox,
                    "kind": kind,
                    "label": label,
                    "probs": probs,
                    "uncertainty": (0.7 if review else 0.1) if classified else None,
                    "anomaly": 0.05 if classified else None,
                    "review": review,
                }
            )
        height, width = self._image.shape[:2]
        message = self._send(
            TOPIC_CELLS,
            {
                "frame_id": frame_id,
                "captured_at": time.time(),
                "source": str(FRAME),
                "model": "baseline-cnn-1.0@6531d5388013",
                "frame_size": [width, height],
                "latency_ms": {"queue": 1.0, "detect": 8.0, "classify": 12.0, "publish": 0.5, "total": 22.0},
                "domain_alarm": False,
                "cells": cells,
            },
        )
        self.sent_cells.append(message)
        for cell in cells:
            if cell["review"]:
                x, y, w, h = cell["bbox"]
                crop = cv2.resize(self._image[y : y + h, x : x + w], (64, 64), interpolation=cv2.INTER_AREA)
                top = sorted(cell["probs"].items(), key=lambda item: -item[1])[:3]
                self._send(
                    TOPIC_THUMB,
                    {
                        "frame_id": frame_id,
                        "cell_id": cell["id"],
                        "cells_seq": message["seq"],
                        "label": cell["label"],
                        "top": [[name, p] for name, p in top],
                        "uncertainty": cell["uncertainty"],
                        "anomaly": cell["anomaly"],
                        "jpeg": _jpeg(crop),
                    },
                )
        if frame_id % 5 == 0:
            preview = self._image.copy()
            for cell in cells:
                x, y, w, h = cell["bbox"]
                colour = (0, 0, 255) if cell["review"] else (0, 200, 0) if cell["kind"] != "rbc" else (90, 90, 220)
                cv2.rectangle(preview, (x, y), (x + w, y + h), colour, 3 if cell["review"] else 2)
                if cell["label"]:
                    cv2.putText(preview, cell["label"], (x, max(14, y - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.6, colour, 2)
            small = cv2.resize(preview, (480, round(480 * height / width)), interpolation=cv2.INTER_AREA)
            self._send(
                TOPIC_PREVIEW,
                {
                    "frame_id": frame_id,
                    "jpeg": _jpeg(small),
                    "width": small.shape[1],
                    "height": small.shape[0],
                    "scale": round(480 / width, 5),
                },
            )

    def _send_status(self) -> None:
        self._send(
            TOPIC_STATUS,
            {
                "state": "running",
                "source_state": "streaming",
                "source": str(SAMPLES),
                "fps": 42.0,
                "frames": {"read": self._frames_sent, "published": self._frames_sent, "dropped": 2, "skipped": 0},
                "latency_ms": {"total": {"p50": 21.5, "p99": 48.5}},
                "queue_depth": 0,
                "model": "baseline-cnn-1.0@6531d5388013",
                "uptime_s": 3.0,
                "warnings": ["test publisher: <b>not</b> a real pipeline"],
                "final": False,
            },
        )


def _jpeg(image: Any) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    return data.tobytes()


@pytest.fixture
def publisher() -> Iterator[HandPublisher]:
    """The publisher under the display. To drive the test with the real pipeline instead, yield an
    object with the same `endpoint`, `publish_frames(n)` (e.g. start `cytoedge replay samples/bccd
    --publish ENDPOINT --pace max --audit FILE` and wait for n frames), `published_cells()` (read the
    audit file) and `stop()`."""
    pub = HandPublisher(f"tcp://127.0.0.1:{free_port()}")
    yield pub
    pub.stop()


@pytest.fixture
def display(publisher: HandPublisher, tmp_path: Path) -> Iterator[DisplayServer]:
    server = DisplayServer(
        publisher.endpoint,
        ("127.0.0.1", free_port()),
        tmp_path / "sessions",
        target=100,
        stale_after_s=STALE_AFTER_S,
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def page() -> Iterator[Any]:
    """A fresh headless Chromium page at 1280x800 (the bench monitor)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (browser tests)")
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CYTOEDGE_CHROMIUM)")
    profile = tempfile.mkdtemp(prefix="cytoedge-chromium-")
    try:
        with sync_api.sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile,
                executable_path=str(CHROMIUM),
                headless=True,
                viewport={"width": 1280, "height": 800},
                args=[
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                ],
            )
            errors: list[str] = []
            try:
                browser_page = context.pages[0] if context.pages else context.new_page()
                browser_page.set_default_timeout(15_000)
                browser_page.on("pageerror", lambda error: errors.append(str(error)))
                yield browser_page
            finally:
                context.close()
            assert not errors, f"the page's script failed: {errors}"
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def tally(cells_messages: list[dict[str, Any]]) -> tuple[Counter[str], int, int]:
    """What a haematologist's tally of the published messages gives (independent of edge.display)."""
    white: Counter[str] = Counter()
    platelets = red = 0
    for message in cells_messages:
        for cell in message["cells"]:
            if cell["kind"] == "wbc":
                white[cell["label"]] += 1
            elif cell["kind"] == "platelet":
                platelets += 1
            else:
                red += 1
    return white, platelets, red


def page_counts(page: Any) -> dict[str, int]:
    rows = page.locator("#diff-body tr")
    counts = {}
    for i in range(rows.count()):
        row = rows.nth(i)
        count = int(row.locator("td.count").inner_text())
        if count:
            counts[row.get_attribute("data-class")] = count
    return counts


def wait_for_text(page: Any, selector: str, text: str, timeout_s: float = 15) -> None:
    """Wait until the element's whole text is `text` (has_text alone would match "30" for "0")."""
    page.locator(selector).filter(has_text=re.compile(rf"^\s*{re.escape(text)}\s*$")).wait_for(timeout=timeout_s * 1000)
    assert page.locator(selector).inner_text().strip() == text


def save_screenshot(page: Any, name: str) -> list[Path]:
    ARTIFACTS.mkdir(exist_ok=True)
    paths = [ARTIFACTS / name, Path(tempfile.gettempdir()) / f"cytoedge-{name}"]
    page.screenshot(path=str(paths[0]))
    shutil.copyfile(paths[0], paths[1])
    return paths


# -- the browser tests --------------------------------------------------------------------------
def test_page_shows_the_published_differential_takes_a_correction_and_warns_when_the_stream_stops(
    publisher: HandPublisher, display: DisplayServer, page: Any
) -> None:
    page.goto(display.url)
    publisher.publish_frames(105)  # full rate: no pacing at all
    white, platelets, red = tally(publisher.published_cells())
    total = sum(white.values())
    assert (total, platelets, red) == (105, 105, 17 * 105)

    # The differential on the page is what was published.
    wait_for_text(page, "#white-total", str(total))
    assert page_counts(page) == dict(white)
    assert page.locator('#diff-body tr[data-class="neutrophil"] td.percent').inner_text() == "33.3"
    assert page.locator("#platelets").inner_text() == str(platelets)
    assert page.locator("#red-cells").inner_text() == str(red)
    assert page.locator("#target").inner_text() == "100"
    assert page.locator("#target-reached").is_visible()

    # Health comes from `status`; message text is shown as text, never parsed as markup.
    wait_for_text(page, "#h-fps", "42.0")
    assert page.locator("#h-latency").inner_text() == "21.5 / 48.5 ms"
    assert page.locator("#h-dropped").inner_text() == "2"
    assert page.locator("#h-source-state").inner_text() == "streaming"
    assert page.locator("#h-model").inner_text() == "baseline-cnn-1.0@6531d5388013"
    assert page.locator("#h-malformed").inner_text() == "0"
    assert page.locator("#h-domain-alarm").inner_text() == "off"
    assert "<b>not</b>" in page.locator("#warnings").inner_text()
    assert page.locator("#warnings b").count() == 0

    # The preview and the flagged cells (newest first) with their thumbnails.
    page.wait_for_function("document.getElementById('preview').naturalWidth > 0")
    newest = f"{publisher.run}/103/0"
    card = page.locator(f'#queue li.card[data-key="{newest}"]')
    card.wait_for()
    assert page.locator("#queue li.card").first.get_attribute("data-key") == newest
    page.wait_for_function(
        "[...document.querySelectorAll('#queue li.card img')].slice(0, 3).every(i => i.naturalWidth > 0)"
    )
    assert card.locator(".top li").first.inner_text() == "lymphocyte 55%"
    assert not page.locator("#stale-banner").is_visible()

    # A correction by click moves one count and lands in the session file; an accept changes nothing.
    card.locator("button.other", has_text="monocyte").click()
    wait_for_text(page, '#diff-body tr[data-class="monocyte"] td.count', str(white["monocyte"] + 1))
    assert page_counts(page) == {**white, "lymphocyte": white["lymphocyte"] - 1, "monocyte": white["monocyte"] + 1}
    assert page.locator("#white-total").inner_text() == str(total)
    assert "corrected to monocyte" in card.locator(".decision").inner_text()
    older = page.locator(f'#queue li.card[data-key="{publisher.run}/100/0"]')
    older.locator("button.accept").click()
    older.locator(".decision", has_text="accepted lymphocyte").wait_for()
    wait_for_text(page, "#reviewed", "2")
    assert page_counts(page)["lymphocyte"] == white["lymphocyte"] - 1
    session_file = display.state.slide.session.path
    decisions = [json.loads(line) for line in session_file.read_text().splitlines()]
    assert [(d["frame_id"], d["cell_id"], d["model_label"], d["reviewer_label"], d["action"]) for d in decisions] == [
        (103, 0, "lymphocyte", "monocyte", "correct"),
        (100, 0, "lymphocyte", "lymphocyte", "accept"),
    ]
    assert all(d["run"] == publisher.run and isinstance(d["time"], float) for d in decisions)

    save_screenshot(page, "display-hand-publisher.png")

    # The publisher goes away: the page says so within --stale-after.
    publisher.stop()
    banner = page.locator("#stale-banner")
    banner.filter(has_text="No data for").wait_for(timeout=(STALE_AFTER_S + 5) * 1000)
    assert banner.is_visible()
    save_screenshot(page, "display-stale.png")


def test_new_slide_zeroes_the_page_and_export_downloads_the_slide_csv(
    publisher: HandPublisher, display: DisplayServer, page: Any
) -> None:
    page.goto(display.url)
    publisher.publish_frames(10)
    wait_for_text(page, "#white-total", "10")
    first_file = page.locator("#session-file").inner_text()

    page.locator("#new-slide").click()
    assert page.locator("#new-slide").inner_text() == "Confirm new slide"  # a single touch does nothing yet
    assert page.locator("#white-total").inner_text() == "10"
    page.locator("#new-slide").click()
    wait_for_text(page, "#white-total", "0")
    assert page.locator("#platelets").inner_text() == "0"
    assert page.locator("#queue li.card").count() == 0
    assert page.locator("#session-file").inner_text() != first_file

    publisher.publish_frames(5)
    wait_for_text(page, "#white-total", "5")  # frames 10..14: lymphocyte, monocyte, neutrophil, ...
    with page.expect_download() as download_info:
        page.locator("#export-csv").click()
    download = download_info.value
    assert download.suggested_filename == f"{display.state.slide.slide_id}.csv"
    rows = Path(download.path()).read_text().splitlines()
    assert rows[0] == "class,count,percent"
    assert "neutrophil,1,20.0" in rows and "lymphocyte,2,40.0" in rows and "monocyte,2,40.0" in rows
    assert "white_cells_total,5,100.0" in rows
    assert "platelets,5," in rows and "red_cells,85," in rows


def test_page_fits_a_portrait_tablet_without_sideways_scrolling(
    publisher: HandPublisher, display: DisplayServer, page: Any
) -> None:
    page.set_viewport_size({"width": 800, "height": 1280})
    page.goto(display.url)
    publisher.publish_frames(3)
    wait_for_text(page, "#white-total", "3")
    page.locator("#queue li.card").first.wait_for()
    assert page.evaluate("document.documentElement.scrollWidth") <= 800
    accept = page.locator("#queue li.card button.accept").first.bounding_box()
    assert accept is not None and accept["height"] >= 36  # big enough for a finger
    save_screenshot(page, "display-tablet.png")


def test_keyboard_decides_on_the_focused_card_and_h_holds_the_queue(
    publisher: HandPublisher, display: DisplayServer, page: Any
) -> None:
    page.goto(display.url)
    publisher.publish_frames(5)  # frames 1 and 4 carry a flagged lymphocyte
    wait_for_text(page, "#white-total", "5")
    card = page.locator(f'#queue li.card[data-key="{publisher.run}/4/0"]')
    card.focus()
    page.keyboard.press("ArrowDown")  # to the older card (frame 1)
    older = page.locator(f'#queue li.card[data-key="{publisher.run}/1/0"]')
    assert older.evaluate("node => node === document.activeElement")
    page.keyboard.press(str(CLASSES.index("eosinophil") + 1))
    older.locator(".decision", has_text="corrected to eosinophil").wait_for()
    wait_for_text(page, '#diff-body tr[data-class="eosinophil"] td.count', "1")
    card.focus()
    page.keyboard.press("a")
    card.locator(".decision", has_text="accepted lymphocyte").wait_for()
    page.keyboard.press("h")
    assert page.locator("#hold").get_attribute("aria-pressed") == "true"
    publisher.publish_frames(3)  # frame 7 is flagged but the held queue does not move
    wait_for_text(page, "#white-total", "8")
    assert page.locator(f'#queue li.card[data-key="{publisher.run}/7/0"]').count() == 0
    page.locator("#hold").click()
    page.locator(f'#queue li.card[data-key="{publisher.run}/7/0"]').wait_for()
    lines = display.state.slide.session.path.read_text().splitlines()
    assert [json.loads(line)["reviewer_label"] for line in lines] == ["eosinophil", "lymphocyte"]


# -- the HTTP side, no browser needed ------------------------------------------------------------
def test_events_are_coalesced_to_about_five_a_second_under_a_full_rate_stream(
    publisher: HandPublisher, display: DisplayServer
) -> None:
    events = 0
    last: dict[str, Any] = {}
    sender = threading.Thread(target=publisher.publish_frames, args=(150, 75.0), daemon=True)
    with urllib.request.urlopen(display.url + "events", timeout=10) as stream:
        sender.start()
        started = time.monotonic()
        while time.monotonic() - started < 2.0:
            line = stream.readline()
            if line.startswith(b"data: "):
                events += 1
                last = json.loads(line[6:])
    sender.join(timeout=30)
    assert 4 <= events <= 12, events  # ~75 messages/s in, at most 5 snapshots/s (+1 at connect) out
    assert last["white_total"] > 0


def post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_decisions_for_unknown_cells_or_classes_get_400_with_the_reason(
    publisher: HandPublisher, display: DisplayServer
) -> None:
    publisher.publish_frames(1)
    deadline = time.monotonic() + 10
    while display.state.slide.frames < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    url = display.url + "api/decision"
    cell = {"run": publisher.run, "frame_id": 0, "cell_id": 0}  # the white cell, a neutrophil

    status, reply = post(url, {**cell, "cell_id": 99, "action": "correct", "label": "monocyte"})
    assert status == 400 and "unknown cell" in reply["error"]
    status, reply = post(url, {**cell, "action": "correct", "label": "myeloblast"})
    assert status == 400 and "unknown class 'myeloblast'" in reply["error"]
    status, reply = post(url, [1, 2])
    assert status == 400 and "JSON object" in reply["error"]
    status, reply = post(url, {**cell, "action": "correct", "label": "monocyte"}, {"Origin": "http://evil.example"})
    assert status == 403
    assert not display.state.slide.session.path.exists()

    status, reply = post(url, {**cell, "action": "correct", "label": "monocyte"})
    assert status == 200 and reply["reviewer_label"] == "monocyte"
    assert dict(display.state.slide.white) == {"monocyte": 1}


def test_page_script_never_writes_message_data_as_html() -> None:
    script = (REPO / "edge" / "display" / "static" / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script


# -- the same page fed by the real pipeline ------------------------------------------------------
def test_real_pipeline_replay_drives_the_page_end_to_end(tmp_path: Path, page: Any) -> None:
    """`cytoedge replay` of the BCCD frames -> the display -> Chromium: the page's differential equals
    the tally of the published messages (each cell counted on its first sighting), a flagged cell is in
    the review queue, a correction moves a count and is saved, and the end of the stream is shown."""

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = DisplayServer(endpoint, ("127.0.0.1", free_port()), tmp_path / "sessions", target=100, stale_after_s=5.0)
    server.start()
    config = tmp_path / "replay.toml"
    config.write_text("[review]\nuncertainty = 0.3\n[publish]\npreview_interval_s = 0.2\n")
    audit = tmp_path / "audit.jsonl"
    try:
        page.goto(server.url)
        replay = run_cli(
            "-q",
            "replay",
            str(SAMPLES),
            "--publish",
            endpoint,
            "--fps",
            "8",
            "--audit",
            str(audit),
            "--config",
            str(config),
        )
        assert replay.returncode == 0, replay.stderr
        published = [json.loads(line) for line in audit.read_text().splitlines()]
        assert len(published) == 20
        first_sightings = [{**m, "cells": [c for c in m["cells"] if c["first_seen"]]} for m in published]
        white, platelets, red = tally(first_sightings)
        wait_for_text(page, "#frames", "20")
        wait_for_text(page, "#white-total", str(sum(white.values())))
        assert page_counts(page) == dict(white)
        assert page.locator("#platelets").inner_text() == str(platelets)
        assert page.locator("#red-cells").inner_text() == str(red)
        assert page.locator("#h-model").inner_text() == published[0]["model"]

        flagged = [
            (m["frame_id"], c["id"], c["kind"])
            for m in first_sightings
            for c in m["cells"]
            if c["review"] and c["label"]
        ]
        flagged_white = [f"{published[0]['run']}/{frame}/{cell}" for frame, cell, kind in flagged if kind == "wbc"]
        assert flagged_white, "the review threshold in this test flags at least one white cell"
        page.wait_for_function(f"document.querySelectorAll('#queue li.card').length === {min(len(flagged), 24)}")
        key = flagged_white[-1]  # newest first on the page; a white cell, so the correction moves a white count
        card = page.locator(f'#queue li.card[data-key="{key}"]')
        model_label = card.locator("button.accept").inner_text().removeprefix("Accept ").strip()
        # A white class the model did not give: "platelet" would move the cell out of the white differential.
        others = card.locator("button.other")
        choice = next(others.nth(i) for i in range(others.count())
                      if others.nth(i).get_attribute("data-label") not in ("platelet", model_label))
        new_label = choice.get_attribute("data-label")
        before = page_counts(page)
        choice.click()
        card.locator(".decision", has_text=f"corrected to {new_label}").wait_for()
        deadline = time.monotonic() + 10  # the counts arrive with the next pushed snapshot
        while page_counts(page) == before and time.monotonic() < deadline:
            time.sleep(0.1)
        after = page_counts(page)
        assert after.get(new_label, 0) == before.get(new_label, 0) + 1
        assert after.get(model_label, 0) == before.get(model_label, 0) - 1
        decisions = [json.loads(line) for line in server.state.slide.session.path.read_text().splitlines()]
        assert [(d["model_label"], d["reviewer_label"], d["action"]) for d in decisions] == [
            (model_label, new_label, "correct")
        ]
        page.locator("#message").evaluate("toast => { toast.hidden = true; }")  # a clean picture for the docs
        paths = save_screenshot(page, "display.png")
        (REPO / "docs" / "img").mkdir(exist_ok=True)
        shutil.copyfile(paths[0], REPO / "docs" / "img" / "display.png")

        banner = page.locator("#stale-banner")  # the replay has ended: no more messages
        banner.filter(has_text="No data for").wait_for(timeout=15_000)
        assert banner.is_visible()
    finally:
        server.stop()
