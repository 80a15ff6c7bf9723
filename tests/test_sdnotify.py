"""edge.sdnotify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.sdnotify import Notifier, notify_address, watchdog_interval

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs AF_UNIX sockets")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def systemd(clean_env: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket in a short temp dir, advertised in $NOTIFY_SOCKET."""
    # sun_path is limited to 107 bytes; pytest's tmp_path can be longer than that.
    directory = Path("/tmp") / f"sdn-{uuid.uuid4().hex[:12]}"
    directory.mkdir(mode=0o700)
    path = directory / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    clean_env.setenv("NOTIFY_SOCKET", str(path))
    try:
        yield sock
    finally:
        sock.close()
        path.unlink(missing_ok=True)
        directory.rmdir()


def receive(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    assert data.endswith("\n")
    return dict(line.split("=", 1) for line in data.splitlines())


def nothing_pending(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        sock.recv(4096)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(2.0)
    return False


def test_ready_sends_ready_1(systemd: socket.socket) -> None:
    with Notifier() as notifier:
        assert notifier.enabled
        assert notifier.ready() is True
    assert receive(systemd) == {"READY": "1"}


def test_status_sends_one_line_of_text(systemd: socket.socket) -> None:
    with Notifier() as notifier:
        assert notifier.status("warming up: building engine\nstep 2") is True
    assert receive(systemd) == {"STATUS": "warming up: building engine step 2"}


def test_stopping_sends_stopping_1(systemd: socket.socket) -> None:
    with Notifier() as notifier:
        assert notifier.stopping() is True
    assert receive(systemd) == {"STOPPING": "1"}


def test_reloading_sends_monotonic_timestamp_for_notify_reload(systemd: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    with Notifier() as notifier:
        assert notifier.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = receive(systemd)
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after


def test_notify_sends_several_fields_in_one_datagram(systemd: socket.socket) -> None:
    with Notifier() as notifier:
        assert notifier.notify(READY=1, status="serving", extend_timeout_usec=60_000_000) is True
    assert receive(systemd) == {"READY": "1", "STATUS": "serving", "EXTEND_TIMEOUT_USEC": "60000000"}


def test_watchdog_sends_keepalive_when_watchdog_enabled(systemd: socket.socket,
                                                        clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WATCHDOG_USEC", "10000000")
    clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    with Notifier() as notifier:
        assert notifier.watchdog() is True
    assert receive(systemd) == {"WATCHDOG": "1"}


def test_watchdog_sends_at_most_once_per_quarter_interval(systemd: socket.socket,
                                                          clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WATCHDOG_USEC", "800000")  # 0.8 s -> at most one keep-alive per 0.2 s
    with Notifier() as notifier:
        sent = [notifier.watchdog() for _ in range(1000)]
        assert sent[0] is True
        assert sum(sent) == 1
        assert receive(systemd) == {"WATCHDOG": "1"}
        assert nothing_pending(systemd)
        time.sleep(0.25)
        assert notifier.watchdog() is True
        assert notifier.watchdog() is False
    assert receive(systemd) == {"WATCHDOG": "1"}
    assert nothing_pending(systemd)


def test_watchdog_is_cheap_enough_for_the_per_frame_path(systemd: socket.socket,
                                                        clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WATCHDOG_USEC", "10000000")
    with Notifier() as notifier:
        start = time.perf_counter()
        for _ in range(100_000):
            notifier.watchdog()
        elapsed = time.perf_counter() - start
    assert elapsed < 1.0  # about 0.05 s on a laptop: a monotonic clock read and a comparison
    assert receive(systemd) == {"WATCHDOG": "1"}
    assert nothing_pending(systemd)


def test_watchdog_is_silent_when_systemd_set_no_watchdog(systemd: socket.socket) -> None:
    with Notifier() as notifier:
        assert notifier.watchdog_interval() is None
        assert notifier.watchdog() is False
    assert nothing_pending(systemd)


def test_watchdog_is_silent_when_watchdog_belongs_to_another_pid(systemd: socket.socket,
                                                                 clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WATCHDOG_USEC", "10000000")
    clean_env.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    with Notifier() as notifier:
        assert notifier.watchdog_interval() is None
        assert notifier.watchdog() is False
    assert nothing_pending(systemd)


def test_abstract_socket_address_is_used_for_at_prefix(clean_env: pytest.MonkeyPatch) -> None:
    name = f"cytoedge-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2.0)
    clean_env.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        with Notifier() as notifier:
            assert notifier.ready() is True
        assert receive(sock) == {"READY": "1"}
    finally:
        sock.close()


def test_inert_without_notify_socket(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WATCHDOG_USEC", "10000000")
    notifier = Notifier()
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.status("x") is False
    assert notifier.stopping() is False
    assert notifier.reloading() is False
    assert notifier.watchdog() is False
    assert notifier.notify(READY=1) is False
    notifier.close()


def test_send_to_vanished_socket_returns_false_without_raising(systemd: socket.socket,
                                                               clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("NOTIFY_SOCKET", os.environ["NOTIFY_SOCKET"] + "-gone")
    with Notifier() as notifier:
        assert notifier.enabled
        assert notifier.ready() is False
        assert notifier.status("still fine") is False


def test_send_failures_are_logged_once_at_debug(systemd: socket.socket, clean_env: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    clean_env.setenv("NOTIFY_SOCKET", os.environ["NOTIFY_SOCKET"] + "-gone")
    with caplog.at_level(logging.DEBUG, logger="edge.sdnotify"), Notifier() as notifier:
        for _ in range(5):
            notifier.status("x")
    records = [r for r in caplog.records if r.name == "edge.sdnotify"]
    assert len(records) == 1
    assert records[0].levelno == logging.DEBUG


def test_unsupported_notify_socket_form_is_inert(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    with Notifier() as notifier:
        assert not notifier.enabled
        assert notifier.ready() is False


def test_notify_address_maps_at_prefix_to_abstract_namespace() -> None:
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@foo/bar") == b"\0foo/bar"
    assert notify_address("@") is None
    assert notify_address("") is None
    assert notify_address(None) is None
    assert notify_address("relative/path") is None


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "10000000"}, 10.0),
        ({"WATCHDOG_USEC": "2500000", "WATCHDOG_PID": "SELF"}, 2.5),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "OTHER"}, None),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "nonsense"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "ten"}, None),
        ({"WATCHDOG_USEC": ""}, None),
    ],
)
def test_watchdog_interval_parses_usec_and_honours_watchdog_pid(env: dict[str, str],
                                                                expected: float | None) -> None:
    pid = os.getpid()
    env = {k: {"SELF": str(pid), "OTHER": str(pid + 1)}.get(v, v) for k, v in env.items()}
    assert watchdog_interval(env) == expected


def test_watchdog_interval_reads_process_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WATCHDOG_USEC", "10000000")
    clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 10.0
    assert Notifier().watchdog_interval() == 10.0
