"""Real servers for the collector tests and benchmarks: a private NATS JetStream server (so a test can
stop it and owns its stream) and a fresh PostgreSQL database per test on the machine's server."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("CYTOEDGE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def nats_server_binary() -> str | None:
    return shutil.which("nats-server") or next(
        (p for p in ("/usr/sbin/nats-server", "/usr/bin/nats-server") if Path(p).exists()), None)


@contextlib.contextmanager
def nats_server(store: Path, port: int | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """nats-server -js on a free loopback port, its store in ``store``; stopped at exit."""
    binary = nats_server_binary()
    if binary is None:
        raise RuntimeError("nats-server not installed")
    port = port or free_port()
    process = start_nats(binary, store, port)
    try:
        yield process, f"nats://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def start_nats(binary: str, store: Path, port: int) -> subprocess.Popen:
    store.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([binary, "-js", "-sd", str(store), "-a", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return process
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("nats-server did not start")


def postgres_unreachable() -> str | None:
    """Why PostgreSQL cannot be used here, or None."""
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(PG_ADMIN)
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
        return None
    except Exception as exc:
        return f"PostgreSQL at {PG_ADMIN} unreachable: {str(exc).splitlines()[0]}"


@contextlib.contextmanager
def fresh_postgres() -> Iterator[str]:
    """A new database for one test (dropped after), so tests never see each other's rows."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    name = f"cytoedge_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_ADMIN).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def cli(*args: str, log: Path | None = None) -> subprocess.Popen:
    """The real `cytoedge` command as a child process (stderr to ``log``)."""
    handle = log.open("ab") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "edge", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=handle, env={**os.environ, "PYTHONPATH": str(REPO)})


def write_collector_config(path: Path, database: str, nats_url: str, listen: str,
                           microscopes: list[tuple[str, str]] = ()) -> Path:
    lines = [f'[database]\nurl = "{database}"\n', f'[nats]\nurl = "{nats_url}"\n', f'[web]\nlisten = "{listen}"\n']
    for name, endpoint in microscopes:
        lines.append(f'[[microscope]]\nid = "{name}"\nendpoint = "{endpoint}"\n')
    path.write_text("\n".join(lines))
    return path


def audit_cells(path: Path) -> set[tuple[str, int, int]]:
    """Every (run, seq, cell id) in an audit log's whole lines: what the database must hold."""
    found: set[tuple[str, int, int]] = set()
    for line in path.read_bytes().split(b"\n")[:-1]:
        try:
            message = json.loads(line)
        except ValueError:
            continue  # a line torn by a crash: never shipped either
        found.update((message["run"], message["seq"], cell["id"]) for cell in message["cells"])
    return found


def stored_cells(database: str, microscope: str) -> list[tuple[str, int, int]]:
    import sqlalchemy as sa

    engine = sa.create_engine(database)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("cells"):
                return []  # the collector has not created its schema yet
            rows = conn.execute(sa.text("select run, seq, cell_id from cells where microscope = :m"),
                                {"m": microscope}).all()
    finally:
        engine.dispose()
    return [tuple(r) for r in rows]


def wait_until(check, timeout: float, every: float = 0.2) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return True
        time.sleep(every)
    return bool(check())
