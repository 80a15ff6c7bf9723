"""CURVE on real loopback sockets: listed subscribers get everything, others nothing."""

from __future__ import annotations

import logging
import stat
import time
from pathlib import Path

import pytest
from conftest import SAMPLES, run_cli

from edge import config as cfg
from edge.client import Subscriber
from edge.errors import ConfigError
from edge.messages import TOPIC_STATUS
from edge.publisher import Publisher
from edge.security import ClientKeys, new_keypair


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    allowed = tmp_path / "authorized"
    allowed.mkdir()
    server_public, server_secret = new_keypair(tmp_path, "publisher")
    display_public, display_secret = new_keypair(tmp_path, "display")
    _stranger_public, stranger_secret = new_keypair(tmp_path, "stranger")
    display_public.rename(allowed / display_public.name)
    return {
        "server_public": server_public,
        "server_secret": server_secret,
        "allowed": allowed,
        "display_secret": display_secret,
        "stranger_secret": stranger_secret,
    }


def status_stream(publisher: Publisher, seconds: float) -> int:
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        publisher.publish(
            TOPIC_STATUS,
            {"state": "running", "source_state": "streaming", "fps": 1.0, "frames": {}, "latency_ms": {}, "model": "m"},
        )
        sent += 1
        time.sleep(0.02)
    return sent


def test_key_files_are_written_with_owner_only_secret(tmp_path: Path) -> None:
    public, secret = new_keypair(tmp_path / "keys", "publisher")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert "secret-key" in secret.read_text() and "secret-key" not in public.read_text()
    with pytest.raises(ConfigError, match="already exists"):
        new_keypair(tmp_path / "keys", "publisher")


def test_listed_subscriber_gets_everything_and_an_unlisted_one_nothing(
    keys: dict[str, Path], endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edge.security")
    publisher = Publisher(endpoint, curve=(keys["server_secret"], keys["allowed"]))
    listed = Subscriber(endpoint, (TOPIC_STATUS,), curve=ClientKeys(keys["display_secret"], keys["server_public"]))
    unlisted = Subscriber(endpoint, (TOPIC_STATUS,), curve=ClientKeys(keys["stranger_secret"], keys["server_public"]))
    # A listed subscriber that trusts the wrong server key (its own) must not get through either.
    wrong_server = Subscriber(
        endpoint, (TOPIC_STATUS,), curve=ClientKeys(keys["display_secret"], keys["allowed"] / "display.key")
    )
    plain = Subscriber(endpoint, (TOPIC_STATUS,))
    try:
        time.sleep(0.5)  # let the handshakes finish before counting
        sent = status_stream(publisher, 1.0)
        got = {name: 0 for name in ("listed", "unlisted", "wrong_server", "plain")}
        for name, subscriber in (
            ("listed", listed),
            ("unlisted", unlisted),
            ("wrong_server", wrong_server),
            ("plain", plain),
        ):
            while subscriber.receive(0.2) is not None:
                got[name] += 1
    finally:
        for subscriber in (listed, unlisted, wrong_server, plain):
            subscriber.close()
        publisher.close()
    assert got["listed"] == sent
    assert got["unlisted"] == got["wrong_server"] == got["plain"] == 0
    rejections = [r for r in caplog.records if "rejected subscriber" in r.getMessage()]
    assert len(rejections) == 1, "each rejected key is logged exactly once"


def test_binding_to_the_network_without_curve_needs_explicit_consent(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text('[publish]\nendpoint = "tcp://0.0.0.0:5599"\n')
    with pytest.raises(ConfigError, match=r"reachable from the network but security\.curve = false"):
        cfg.load(file)
    file.write_text('[publish]\nendpoint = "tcp://0.0.0.0:5599"\n[security]\nallow_insecure = true\n')
    assert cfg.load(file)["security"]["allow_insecure"] is True


def test_insecure_network_bind_warns_at_every_start(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edge.publisher")
    publisher = Publisher("tcp://0.0.0.0:*")
    publisher.close()
    assert any("WITHOUT encryption" in r.getMessage() for r in caplog.records)


def test_curve_without_keys_is_a_config_error(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text("[security]\ncurve = true\n")
    with pytest.raises(ConfigError, match=r"security\.server_key must be set"):
        cfg.load(file)


def test_status_command_reads_a_curve_publisher_only_with_keys(
    keys: dict[str, Path], tmp_path: Path, endpoint: str
) -> None:
    import subprocess
    import sys

    from conftest import REPO

    config = tmp_path / "c.toml"
    config.write_text(
        f'[source]\npath = "{SAMPLES}"\nfps = 5.0\nloop = true\n[publish]\nendpoint = "{endpoint}"\n'
        f'[security]\ncurve = true\nserver_key = "{keys["server_secret"]}"\n'
        f'authorized_keys = "{keys["allowed"]}"\n'
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "edge", "-q", "run", "--config", str(config)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(3)
        with_keys = run_cli(
            "status", endpoint, "--server-key", str(keys["server_public"]), "--client-key", str(keys["display_secret"])
        )
        without = run_cli("status", endpoint, "--timeout", "1.5")
    finally:
        process.terminate()
        process.communicate(timeout=20)
    assert with_keys.returncode == 0, with_keys.stdout + with_keys.stderr
    assert with_keys.stdout.startswith("HEALTHY")
    assert without.returncode == 3
    assert "UNREACHABLE" in without.stderr
