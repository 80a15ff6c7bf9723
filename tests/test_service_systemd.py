"""The service under systemd's eyes: a real NOTIFY_SOCKET, real signals, real ZeroMQ subscribers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SAMPLES

from edge import config as cfg
from edge.client import Subscriber
from edge.errors import ModelError
from edge.messages import TOPIC_CELLS
from edge.models import bundled_models_dir, default_model_path, open_classifier
from edge.pipeline import Pipeline, Settings
from edge.publisher import Publisher
from edge.replay import ReplaySource
from edge.sdnotify import Notifier
from edge.service import Reloader, run_pipeline


class SystemdSide:
    """Plays systemd: owns the notify socket and timestamps every datagram it receives."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "notify.sock"
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(self.path))
        self.socket.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.socket.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def wait_for(self, key: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for stamp, fields in list(self.messages):
                if key in fields:
                    return stamp
            time.sleep(0.02)
        pytest.fail(f"systemd never received {key}")

    def times(self, key: str) -> list[float]:
        return [stamp for stamp, fields in self.messages if key in fields]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.socket.close()


@pytest.fixture
def systemd(tmp_path: Path):  # type: ignore[no-untyped-def]
    side = SystemdSide(tmp_path)
    yield side
    side.close()


def write_config(path: Path, endpoint: str, source: Path, audit: Path, **extra: str) -> None:
    lines = [
        "[source]",
        f'path = "{source}"',
        "fps = 10.0",
        "loop = true",
        "[publish]",
        f'endpoint = "{endpoint}"',
        "[audit]",
        f'path = "{audit}"',
    ]
    sections: dict[str, list[str]] = {}
    for section_key, value in extra.items():
        section, key = section_key.split("__")
        sections.setdefault(section, []).append(f"{key} = {value}")
    for section, keys in sections.items():
        lines += [f"[{section}]", *keys]
    path.write_text("\n".join(lines) + "\n")


def start_service(config: Path, systemd: SystemdSide, watchdog_usec: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": str(watchdog_usec)}
    env.pop("WATCHDOG_PID", None)
    return subprocess.Popen(
        [sys.executable, "-m", "edge", "run", "--config", str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )


def test_ready_after_first_frame_watchdog_cadence_and_clean_stop(
    tmp_path: Path, endpoint: str, systemd: SystemdSide
) -> None:
    config, audit = tmp_path / "c.toml", tmp_path / "audit.jsonl"
    write_config(config, endpoint, SAMPLES, audit)
    process = start_service(config, systemd, watchdog_usec=1_000_000, log=tmp_path / "log")
    try:
        systemd.wait_for("READY", timeout=60)
        assert audit.exists() and len(audit.read_text().splitlines()) >= 1, "READY before any frame was classified"
        time.sleep(3.0)
        process.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        process.wait(timeout=15)
    finally:
        process.kill()
    assert process.returncode == 0, (tmp_path / "log").read_text()
    assert time.monotonic() - stopped_at < 15  # TimeoutStopSec in deploy/cytoedge.service
    assert systemd.times("STOPPING")
    ready = systemd.times("READY")[0]
    pings = [t for t in systemd.times("WATCHDOG") if t >= ready and t < systemd.times("STOPPING")[0]]
    assert len(pings) >= 6, pings
    gaps = np.diff(pings)
    assert gaps.max() < 1.0, f"watchdog gaps up to {gaps.max():.2f} s exceed WATCHDOG_USEC"
    assert gaps.min() >= 0.2, "watchdog not rate-limited to interval/4"
    assert any(fields.get("STATUS", "").startswith("running") for _t, fields in systemd.messages)


def test_watchdog_pings_stop_while_the_source_stalls_and_resume_after(
    tmp_path: Path, endpoint: str, systemd: SystemdSide
) -> None:
    session = tmp_path / "session"
    (session / "frames").mkdir(parents=True)
    lines = []
    for index in range(8):
        shutil.copy(SAMPLES / "BloodImage_00007.jpg", session / "frames" / f"{index}.jpg")
        stamp = 1000.0 + 0.1 * index + (3.0 if index >= 4 else 0.0)  # a 3 s hole after the 4th frame
        lines.append(json.dumps({"frame": f"frames/{index}.jpg", "t": stamp}))
    (session / "index.jsonl").write_text("\n".join(lines) + "\n")
    config = tmp_path / "c.toml"
    write_config(config, endpoint, session, tmp_path / "audit.jsonl")
    config.write_text(config.read_text().replace("loop = true", "loop = false"))
    process = start_service(config, systemd, watchdog_usec=400_000, log=tmp_path / "log")
    try:
        process.wait(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, (tmp_path / "log").read_text()
    pings = systemd.times("WATCHDOG")
    gaps = np.diff(pings)
    assert gaps.max() > 2.0, "pings went on while nothing made progress"
    stall_end = pings[int(np.argmax(gaps)) + 1]
    assert any(t >= stall_end for t in pings), "pings did not resume after the stall"


class StallingClassifier:
    """The real model, wrapped so a test can freeze inference mid-run (fault injection, not a fake)."""

    def __init__(self) -> None:
        self.inner = open_classifier(None, "onnxruntime", 1)
        self.metadata = self.inner.metadata
        self.model_id = self.inner.model_id
        self.path = self.inner.path
        self.calls = 0
        self.release = threading.Event()

    def classify(self, crops: np.ndarray):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls == 5:
            self.release.wait(10)
        return self.inner.classify(crops)


def test_watchdog_pings_stop_while_inference_hangs(
    tmp_path: Path, endpoint: str, systemd: SystemdSide, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(systemd.path))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    classifier = StallingClassifier()
    settings = Settings.from_config(cfg.load(None))
    source = ReplaySource(SAMPLES, pace="recorded", fps=20, loop=False)
    pipeline = Pipeline(source, classifier, Publisher(endpoint), settings, notifier=Notifier())
    runner = threading.Thread(target=pipeline.run)
    runner.start()
    while classifier.calls < 5:
        time.sleep(0.01)
    hang_started = time.monotonic()
    time.sleep(1.5)
    classifier.release.set()
    runner.join(30)
    pipeline.publisher.close()
    during = [t for t in systemd.times("WATCHDOG") if hang_started + 0.05 < t < hang_started + 1.5]
    after = [t for t in systemd.times("WATCHDOG") if t > hang_started + 1.5]
    assert during == [], "a hung inference must not be reported as alive"
    assert after, "pings resume once inference does"


def test_sighup_swaps_config_without_a_seq_gap_and_rejects_a_bad_one(
    tmp_path: Path, endpoint: str, systemd: SystemdSide
) -> None:
    config, audit = tmp_path / "c.toml", tmp_path / "audit.jsonl"
    # The domain alarm (which flags every cell on these foreign frames) is off, so only the review
    # thresholds decide; cells where the finder and the model disagree are flagged either way.
    write_config(
        config, endpoint, SAMPLES, audit, review__uncertainty="1.0", review__anomaly="1.0", drift__enabled="false"
    )
    log = tmp_path / "log"
    received: list[dict] = []
    with Subscriber(endpoint, topics=(TOPIC_CELLS,)) as subscriber:
        process = start_service(config, systemd, watchdog_usec=5_000_000, log=log)
        try:

            def collect(seconds: float) -> None:
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    message = subscriber.receive(0.2)
                    if message is not None:
                        received.append(message.payload)

            collect(6.0)
            assert received, "no cells before reload"
            write_config(
                config,
                endpoint,
                SAMPLES,
                audit,
                review__uncertainty="0.0",
                review__anomaly="0.0",
                drift__enabled="false",
            )
            process.send_signal(signal.SIGHUP)
            collect(3.0)
            config.write_text(config.read_text() + "[pipeline]\nqueue_size = -4\n")
            process.send_signal(signal.SIGHUP)
            collect(3.0)
            assert process.poll() is None, "a bad reload must not stop the service"
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=15)
        finally:
            process.kill()
    text = log.read_text()
    assert "reload rejected" in text and "pipeline.queue_size = -4" in text
    seqs = [m["seq"] for m in received]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "subscribers saw a gap in seq"

    def agrees(cell: dict) -> bool:
        return (cell["kind"] == "wbc") != (cell["label"] == "platelet")

    classified = [[c["review"] for c in m["cells"] if c["label"] and agrees(c)] for m in received]
    assert not any(any(flags) for flags in classified[:5]), "thresholds of 1.0 send nothing to review"
    assert all(all(flags) for flags in classified[-5:] if flags), "new thresholds of 0.0 send every cell to review"
    assert systemd.times("RELOADING")


def closed(classifier: object) -> bool:
    """True when a classifier was closed (its classify refuses): the service releases what it holds."""
    size = classifier.metadata.input_size  # type: ignore[attr-defined]
    try:
        classifier.classify(np.zeros((1, size, size, 3), np.uint8))  # type: ignore[attr-defined]
    except ModelError as exc:
        return "closed" in str(exc)
    return False


def test_shutdown_closes_the_classifier_after_the_last_frame(endpoint: str) -> None:
    classifier = open_classifier(None, "onnxruntime", 1)
    source = ReplaySource(SAMPLES, pace="max", loop=False)
    pipeline = Pipeline(source, classifier, Publisher(endpoint), Settings.from_config(cfg.load(None)))
    assert run_pipeline(pipeline) == 0  # on this (the main) thread, as in the service
    assert pipeline.counters.published > 0 and pipeline.counters.errors == 0
    assert closed(classifier)


def test_reload_ready_after_the_swap_one_at_a_time_latest_wins_old_classifier_closed(
    tmp_path: Path, endpoint: str, systemd: SystemdSide, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(systemd.path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    other_model = next(p for p in sorted(bundled_models_dir().glob("*/model.onnx")) if p != default_model_path())
    path = tmp_path / "c.toml"
    path.write_text("[review]\nuncertainty = 0.5\n[drift]\nenabled = false\n")
    config = cfg.load(path)
    first = open_classifier(None, "onnxruntime", 1)
    source = ReplaySource(SAMPLES, pace="recorded", fps=20, loop=True)
    # The pipeline itself gets no notifier: every READY seen here is the reload's.
    pipeline = Pipeline(source, first, Publisher(endpoint), Settings.from_config(config))
    runner = threading.Thread(target=pipeline.run)
    reloader = Reloader(pipeline, path, config, Notifier())
    try:
        path.write_text(f'[review]\nuncertainty = 0.25\n[drift]\nenabled = false\n[model]\npath = "{other_model}"\n')
        reloader.request()
        systemd.wait_for("RELOADING", timeout=10)
        time.sleep(0.5)  # reload 1 read the file and now waits for the loop
        path.write_text("[review]\nuncertainty = 0.75\n[drift]\nenabled = false\n")
        reloader.request()
        reloader.request()
        time.sleep(1.0)
        assert systemd.times("READY") == [], "READY=1 before the loop thread applied the swap"
        assert len(systemd.times("RELOADING")) == 1, "a second reload started while the first was running"
        assert not closed(first)
        runner.start()
        deadline = time.monotonic() + 60
        while (reloader.completed < 2 or len(systemd.times("READY")) < 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reloader.completed == 2
        ready, reloading = systemd.times("READY"), systemd.times("RELOADING")
        assert len(ready) == 2 and len(reloading) == 2
        assert reloading[0] < ready[0] < reloading[1] < ready[1], "reloads overlapped"
        # The latest file wins: v2's thresholds and model, although reload 1 (v1) opened its model first.
        assert pipeline.settings.review_uncertainty == 0.75
        assert pipeline.classifier.path == first.path and pipeline.classifier is not first
        assert closed(first), "the classifier replaced by reload 1 was not closed"
    finally:
        reloader.close()
        pipeline.request_stop()
        runner.join(30)
        pipeline.publisher.close()


def test_sighup_applies_what_it_can_and_refuses_loudly_what_needs_a_restart(
    tmp_path: Path, endpoint: str, systemd: SystemdSide
) -> None:
    config, audit, other_audit = tmp_path / "c.toml", tmp_path / "audit.jsonl", tmp_path / "other.jsonl"
    write_config(config, endpoint, SAMPLES, audit, review__uncertainty="1.0", review__anomaly="1.0",
                 drift__enabled="false")
    log = tmp_path / "log"
    after: list[dict] = []
    with Subscriber(endpoint, topics=(TOPIC_CELLS,)) as subscriber:
        process = start_service(config, systemd, watchdog_usec=5_000_000, log=log)
        try:
            systemd.wait_for("READY", timeout=60)
            # Thresholds can change between frames; CURVE, the audit file, the camera and the queue cannot.
            write_config(config, endpoint, SAMPLES, other_audit, review__uncertainty="0.0", review__anomaly="0.0",
                         drift__enabled="false", pipeline__queue_size="3", camera__fps="15.0",
                         security__curve="true", security__server_key='"publisher.key_secret"',
                         security__authorized_keys='"subscribers"')
            process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while len(systemd.times("READY")) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(systemd.times("READY")) == 2, "no READY=1 after the reload"
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                message = subscriber.receive(0.2)
                if message is not None:
                    after.append(message.payload)
            assert process.poll() is None
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=15)
        finally:
            process.kill()
    text = log.read_text()
    refused = [line for line in text.splitlines() if "NOT applied, these need a restart" in line]
    assert len(refused) == 1 and " ERROR " in refused[0], text[-3000:]
    needs_restart, applied = refused[0].split("need a restart")[1].split("; applied: ")
    for key in ("audit.path", "camera.fps", "pipeline.queue_size", "security.curve", "security.server_key"):
        assert key in needs_restart, key
    assert "review.uncertainty" in applied and "review.anomaly" in applied
    assert "configuration from" not in text, "the log claims the whole configuration was applied"
    # Still the plain socket (a plain subscriber still receives) and the old audit file, as the log says.
    assert after, "the publisher changed although the reload refused to touch it"
    assert not other_audit.exists()
    flagged = [c["review"] for m in after[-5:] for c in m["cells"] if c["label"]]
    assert flagged and all(flagged), "the thresholds that can change were not applied"
