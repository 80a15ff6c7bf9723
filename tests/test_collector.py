"""The lab collector against real servers: a private NATS JetStream server and the machine's PostgreSQL
(a fresh database per test), with SQLite through the same code. Skips with the reason when absent."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from tests import collector_rig as rig
from tests.conftest import SAMPLES, run_cli

sa = pytest.importorskip("sqlalchemy", reason="the collector needs sqlalchemy (pip install -e .[collector])")
pytest.importorskip("nats", reason="the collector needs nats-py (pip install -e .[collector])")
PG_MISSING = rig.postgres_unreachable()
NATS_MISSING = None if rig.nats_server_binary() else "nats-server is not installed"
needs_pg = pytest.mark.skipif(PG_MISSING is not None, reason=PG_MISSING or "")
needs_nats = pytest.mark.skipif(NATS_MISSING is not None, reason=NATS_MISSING or "")


def recorded_messages() -> list[dict]:
    """cells messages as an edge writes them (a fixed recorded run: no pipeline needed for the DB tests)."""
    cells = [{"id": i, "bbox": [i, i, 10, 10], "kind": ("wbc", "rbc", "platelet")[i % 3],
              "label": None if i % 3 == 1 else "lymphocyte", "probs": None, "uncertainty": 0.1, "anomaly": 0.1,
              "review": i == 0, "track": i, "first_seen": True} for i in range(6)]
    return [{"schema": "cytoedge.cells/1", "run": "R1", "seq": seq, "published_at": 1.0 + seq, "frame_id": seq,
             "model": "m@abc", "source": "x.jpg", "domain_alarm": False, "domain_checked": True, "cells": cells}
            for seq in range(25)]


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'lab.db'}"
        return
    if PG_MISSING:
        pytest.skip(PG_MISSING)
    with rig.fresh_postgres() as url:
        yield url


def test_storing_the_same_messages_twice_keeps_one_row_per_cell(database: str) -> None:
    from edge.collector import db

    engine = db.connect(database)
    items = [("bench-1", "cells", m) for m in recorded_messages()]
    for _ in range(2):
        with engine.begin() as conn:
            db.store(conn, items[:15])
    with engine.begin() as conn:
        db.store(conn, items[10:])  # overlapping redelivery
    with engine.connect() as conn:
        assert conn.execute(sa.text("select count(*) from messages")).scalar() == 25
        assert conn.execute(sa.text("select count(*) from cells")).scalar() == 25 * 6
        assert conn.execute(sa.text("select count(distinct run || '/' || seq || '/' || cell_id) from cells")
                            ).scalar() == 25 * 6
    engine.dispose()


def test_schema_is_versioned_and_a_newer_database_is_refused(database: str) -> None:
    from edge.collector import db
    from edge.errors import ConfigError

    engine = db.connect(database)
    assert db.connect(database) is not None  # migrating an up-to-date database is a no-op
    with engine.begin() as conn:
        assert db.version(conn) == len(db.MIGRATIONS)
        conn.execute(db.schema_version.update().values(version=99))
    with pytest.raises(ConfigError, match="newer than this cytoedge"):
        db.connect(database)
    engine.dispose()


@needs_nats
def test_shipping_a_log_twice_from_scratch_stores_each_cell_once(tmp_path: Path, database: str) -> None:
    audit = tmp_path / "audit.jsonl"
    audit.write_text("".join(json.dumps(m) + "\n" for m in recorded_messages()))
    with rig.nats_server(tmp_path / "nats") as (_, url):
        config = rig.write_collector_config(tmp_path / "c.toml", database, url, f"127.0.0.1:{rig.free_port()}")
        collector = rig.cli("collect", "--config", str(config), log=tmp_path / "collect.log")
        try:
            for attempt in range(2):  # the second time the offsets are lost: everything is sent again
                (tmp_path / "state.json").unlink(missing_ok=True)
                shipper = rig.cli("ship", "--microscope", "bench-1", "--audit", str(audit), "--state",
                                  str(tmp_path / "state.json"), "--nats", url, log=tmp_path / f"ship{attempt}.log")
                assert rig.wait_until(lambda: (tmp_path / "state.json").exists() and json.loads(
                    (tmp_path / "state.json").read_text())["files"], 30)
                shipper.terminate()
                assert shipper.wait(10) == 0
            want = rig.audit_cells(audit)
            assert rig.wait_until(lambda: len(rig.stored_cells(database, "bench-1")) >= len(want), 30)
            time.sleep(1.0)  # anything doubled would arrive now
            stored = rig.stored_cells(database, "bench-1")
            assert len(stored) == len(set(stored)) == len(want) and set(stored) == want
        finally:
            collector.terminate()
            assert collector.wait(10) == 0, (tmp_path / "collect.log").read_text()


@needs_nats
@needs_pg
def test_lab_page_lists_live_microscopes_and_signed_slides_with_their_report(tmp_path: Path) -> None:
    """A real edge (replay of the bundled frames) with its shipper, a reviewer's session, a sign-off by
    `cytoedge report --sign`; the lab page shows the microscope online and the slide signed, with a PDF."""
    endpoint = f"tcp://127.0.0.1:{rig.free_port()}"
    audit, sessions = tmp_path / "audit.jsonl", tmp_path / "sessions"
    sessions.mkdir()
    with rig.fresh_postgres() as database, rig.nats_server(tmp_path / "nats") as (_, url):
        listen = f"127.0.0.1:{rig.free_port()}"
        config = rig.write_collector_config(tmp_path / "c.toml", database, url, listen, [("bench-7", endpoint)])
        collector = rig.cli("collect", "--config", str(config), "--frames-root", str(rig.REPO),
                            log=tmp_path / "collect.log")
        edge = rig.cli("replay", str(SAMPLES), "--loop", "--fps", "10", "--publish", endpoint, "--audit", str(audit),
                       log=tmp_path / "edge.log")
        shipper = rig.cli("ship", "--microscope", "bench-7", "--audit", str(audit), "--sessions", str(sessions),
                          "--state", str(tmp_path / "state.json"), "--nats", url, log=tmp_path / "ship.log")
        try:
            assert rig.wait_until(lambda: audit.exists() and len(audit.read_text().splitlines()) >= 20, 60)
            first = [json.loads(line) for line in audit.read_text().splitlines()[:20]]
            session = sessions / "slide-20261130-090000.jsonl"
            with session.open("w") as out:
                for message in first:
                    for cell in message["cells"]:
                        if cell["review"] and cell["kind"] != "rbc":
                            out.write(json.dumps({"run": message["run"], "frame_id": message["frame_id"],
                                                  "cell_id": cell["id"], "model_label": cell["label"],
                                                  "reviewer_label": cell["label"], "action": "accept",
                                                  "time": 2.0}) + "\n")
                # "new slide" on the display closes the session with the frames the slide counted
                out.write(json.dumps({"event": "slide-end", "slide": session.stem, "started_at": 1.0,
                                      "ended_at": 3.0, "target": 100,
                                      "frames": {first[0]["run"]: [first[0]["frame_id"], first[-1]["frame_id"]]}})
                          + "\n")
            page = f"http://{listen}"

            def state() -> dict:
                with urllib.request.urlopen(f"{page}/api/state", timeout=5) as response:
                    return json.loads(response.read())

            def online() -> bool:
                try:
                    scopes = {m["microscope"]: m for m in state()["microscopes"]}
                except OSError:
                    return False
                return scopes.get("bench-7", {}).get("online") is True and scopes["bench-7"]["messages"] > 0

            assert rig.wait_until(online, 60), (tmp_path / "collect.log").read_text()
            assert state()["microscopes"][0]["state"] == "running"
            # the run goes on (loop); the slide is its first 20 frames, signed at the bench
            signed = run_cli("report", str(session), "--audit", str(audit), "--out", str(tmp_path / "s.pdf"),
                             "--sign", "Dr Lab")
            assert signed.returncode == 0, signed.stderr

            def slide_signed() -> dict | None:
                slides = {s["slide"]: s for s in state()["slides"]}
                row = slides.get(session.stem)
                return row if row and row["signoff"] else None

            assert rig.wait_until(lambda: slide_signed() is not None, 30), state()
            row = slide_signed()
            assert row["signoff"]["name"] == "Dr Lab" and row["review"]["unreviewed"] == 0
            flagged = sum(c["review"] and c["kind"] != "rbc" for m in first for c in m["cells"])
            assert row["review"]["flagged"] == flagged
            with urllib.request.urlopen(page + "/", timeout=5) as response:
                html = response.read().decode()
            assert "bench-7" in html and "signed by Dr Lab" in html and row["report"] in html
            with urllib.request.urlopen(page + row["report"], timeout=30) as response:
                assert response.headers["Content-Type"] == "application/pdf"
                assert response.read().startswith(b"%PDF")
            with urllib.request.urlopen(page + row["report"][:-4] + ".fhir.json", timeout=30) as response:
                bundle = json.loads(response.read())
            assert bundle["entry"][0]["resource"]["status"] == "final"
            edge.terminate()
            assert edge.wait(30) == 0
            assert rig.wait_until(lambda: not {m["microscope"]: m for m in state()["microscopes"]}["bench-7"]["online"],
                                  30)
        finally:
            for process in (shipper, edge, collector):
                if process.poll() is None:
                    process.terminate()
                    process.wait(30)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[database]\nurl = 3\n", "database.url must be a string"),
        ("[nope]\n", "unknown section [nope]"),
        ("[[microscope]]\nendpoint = \"tcp://x:1\"\n", "needs an id"),
        ("[web]\ntarget = 150\n", "web.target must be 100 or 200"),
        ("not toml [", "c.toml"),
        ("[database]\nurl = \"mysql://lab/db\"\n", "mysql is not supported (PostgreSQL or SQLite)"),
        ("[database]\nurl = \"not a url\"\n", "Could not parse"),
    ],
)
def test_bad_collector_config_ends_in_one_line_and_exit_2(tmp_path: Path, text: str, words: str) -> None:
    (tmp_path / "c.toml").write_text(text)
    done = run_cli("collect", "--config", str(tmp_path / "c.toml"))
    assert done.returncode == 2
    assert words in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_collector_without_its_nats_server_says_so_and_exits_1(tmp_path: Path) -> None:
    config = rig.write_collector_config(tmp_path / "c.toml", f"sqlite:///{tmp_path / 'lab.db'}",
                                        f"nats://127.0.0.1:{rig.free_port()}", f"127.0.0.1:{rig.free_port()}")
    done = run_cli("collect", "--config", str(config), timeout=60)
    assert done.returncode == 1
    assert "NATS at nats://127.0.0.1:" in done.stderr and "Traceback" not in done.stderr


@needs_nats
def test_malformed_messages_on_the_stream_are_dropped_and_the_rest_of_their_batch_stored(
    tmp_path: Path, database: str
) -> None:
    import asyncio

    import nats

    from edge.collector import db, stream
    from edge.collector.ingest import Collector

    good = recorded_messages()[:4]
    bad_cell = dict(good[0], seq=100, cells=[{"kind": "wbc"}])  # a cell without its id
    bodies = [json.dumps(good[0]).encode(), b"{not json", json.dumps(bad_cell).encode(),
              json.dumps(dict(good[1], seq="x")).encode(), *(json.dumps(m).encode() for m in good[1:])]

    async def scenario(url: str) -> Collector:
        client = await nats.connect(url)
        js = client.jetstream()
        await stream.ensure_stream(js)
        for body in bodies:
            await js.publish(stream.subject("bench-9", "cells"), body)
        await client.close()
        collector = Collector(db.connect(database), stream.NatsOptions(url))
        task = asyncio.create_task(collector.run())
        for _ in range(100):
            await asyncio.sleep(0.1)
            if collector.stats.stored + collector.stats.malformed >= len(bodies) - 1:
                break
        collector.stop.set()
        await task
        return collector

    with rig.nats_server(tmp_path / "nats") as (_, url):
        collector = asyncio.run(scenario(url))
    assert collector.stats.malformed == 3
    assert sorted(rig.stored_cells(database, "bench-9")) == sorted(("R1", m["seq"], i) for m in good for i in range(6))


@needs_nats
def test_a_batch_left_unacknowledged_by_a_killed_collector_is_stored_by_the_next_one(
    tmp_path: Path, database: str
) -> None:
    """The dead collector's batch must come back although the new one acknowledges later messages first
    (the loss AckPolicy.ALL caused in a fault run)."""
    import asyncio

    import nats

    from edge.collector import db, stream
    from edge.collector.ingest import DURABLE, Collector

    messages = recorded_messages()

    async def scenario(url: str) -> None:
        engine = db.connect(database)
        first = Collector(engine, stream.NatsOptions(url), ack_wait_s=2.0)
        task = asyncio.create_task(first.run())  # creates the durable consumer
        await asyncio.wait_for(first.ready.wait(), 10)
        first.stop.set()
        await task
        client = await nats.connect(url)
        js = client.jetstream()
        for m in messages[:10]:
            await js.publish(stream.subject("bench-5", "cells"), json.dumps(m).encode())
        dead = await js.pull_subscribe(stream.SUBJECTS, durable=DURABLE, stream=stream.STREAM)
        taken = await dead.fetch(10, timeout=5)  # a collector that fetched, then died before storing
        assert len(taken) == 10
        for m in messages[10:]:
            await js.publish(stream.subject("bench-5", "cells"), json.dumps(m).encode())
        await client.close()
        second = Collector(engine, stream.NatsOptions(url), ack_wait_s=2.0)
        task = asyncio.create_task(second.run())
        for _ in range(150):
            await asyncio.sleep(0.1)
            if len(rig.stored_cells(database, "bench-5")) >= len(messages) * 6:
                break
        second.stop.set()
        await task

    with rig.nats_server(tmp_path / "nats") as (_, url):
        asyncio.run(scenario(url))
    assert sorted(rig.stored_cells(database, "bench-5")) == sorted(
        ("R1", m["seq"], i) for m in messages for i in range(6))
