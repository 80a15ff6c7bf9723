"""Shared fixtures: real files, real sockets on loopback, the real `cytoedge` command."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "bccd"
SHARED_DATA = Path(os.environ.get("CYTOEDGE_SHARED_DATA", REPO.parent / "shared" / "data"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real command in a child process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "edge", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def replay_and_collect(frames: Path, config: Path, endpoint: str, *extra: str, topics: tuple[bytes, ...] = (),
                       on_message: Callable[[bytes, dict], None] | None = None, timeout: float = 180) -> list[dict]:
    """Run `cytoedge replay` in a child process publishing on ``endpoint`` and collect what a real
    subscriber receives (each message as its payload plus ``topic``) until the final status."""
    from edge.client import Subscriber
    from edge.messages import TOPIC_CELLS, TOPIC_STATUS

    messages: list[dict] = []
    with Subscriber(endpoint, topics=topics or (TOPIC_CELLS, TOPIC_STATUS)) as subscriber:
        process = subprocess.Popen(
            [sys.executable, "-m", "edge", "-q", "replay", str(frames), "--publish", endpoint, "--config", str(config),
             *extra],
            cwd=REPO, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            received = subscriber.receive(0.5)
            if received is None:
                if process.poll() is not None:
                    break
                continue
            messages.append({"topic": received.topic, **received.payload})
            if on_message is not None:
                on_message(received.topic, received.payload)
            if received.topic == TOPIC_STATUS and received.payload.get("final"):
                break
        process.terminate()
        _, stderr = process.communicate(timeout=20)
    assert any(m.get("final") for m in messages), stderr[-2000:]
    return messages


@pytest.fixture(scope="session", autouse=True)
def empty_model_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """No test may pick up a site model from the developer's own store: the default store is an empty
    folder for this session, for child processes (run_cli) too."""
    previous = os.environ.get("CYTOEDGE_MODEL_STORE")
    store = tmp_path_factory.mktemp("model-store")
    os.environ["CYTOEDGE_MODEL_STORE"] = str(store)
    yield store
    if previous is None:
        os.environ.pop("CYTOEDGE_MODEL_STORE", None)
    else:
        os.environ["CYTOEDGE_MODEL_STORE"] = previous


@pytest.fixture
def endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture(scope="session")
def bccd_dir() -> Path:
    path = SHARED_DATA / "bccd" / "BCCD"
    if not path.is_dir():
        pytest.skip(f"full BCCD data not found at {path} (set CYTOEDGE_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def pbc_dir() -> Path:
    path = SHARED_DATA / "pbc"
    if not path.is_dir():
        pytest.skip(f"PBC data not found at {path} (set CYTOEDGE_SHARED_DATA)")
    return path


PBC_MINI = REPO / "tests" / "data" / "pbc-mini"


def smoke_pbc_root() -> Path:
    """The full PBC data when present, else the bundled 96-crop mini set: the training smoke chains
    must run in CI on any machine, and measure nothing either way."""
    from engines import pbc

    root = pbc.data_dir()
    return root if (root / "manifest.csv").is_file() else PBC_MINI


# ------------------------------------------------------------------------------------------- tiers
# Every test gets exactly one tier marker, from what its module needs, so a developer can run the
# fast tier alone (`pytest -m unit`) and CI runs them all:
#   browser     drives a real headless Chromium
#   data        reads ../shared/data (skips with the reason when it is absent)
#   integration starts real processes or sockets (the `cytoedge` command, ZeroMQ, systemd, databases)
#   unit        in-process only, seconds
TIERS = ("browser", "data", "integration", "unit")
_TIER_SIGNS = {
    "browser": ("playwright", "chromium"),
    "data": ("SHARED_DATA", "bccd_dir", "pbc_dir", "PBC_MINI", "../shared/data", "CYTOEDGE_PBC", "CYTOEDGE_WBC_SHIFT"),
    "integration": ("run_cli", "subprocess", "Popen", "replay_and_collect", "free_port", "endpoint", "Subscriber",
                    "zmq", "psycopg", "postgresql", "NOTIFY_SOCKET", "socket."),
}
_module_tiers: dict[str, str] = {}


def module_tier(path: Path) -> str:
    """The tier of a test module, from what its source uses (browser > data > integration > unit)."""
    key = str(path)
    if key not in _module_tiers:
        source = path.read_text(encoding="utf-8")
        _module_tiers[key] = next((tier for tier, signs in _TIER_SIGNS.items() if any(s in source for s in signs)),
                                  "unit")
    return _module_tiers[key]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if not any(item.get_closest_marker(tier) for tier in TIERS):
            item.add_marker(getattr(pytest.mark, module_tier(Path(str(item.fspath)))))
