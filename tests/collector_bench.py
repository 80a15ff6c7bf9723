"""Collector throughput: N simulated microscopes at F frames/s through the real durable path.

A writer process appends recorded `cells` messages (a real replay of the bundled frames) to one audit log
per microscope at F lines/s each, stamping `published_at` as it writes; a second process runs one
`edge.collector.ship.Shipper` per log (the code `cytoedge ship` runs) into a private NATS JetStream
server; the real `cytoedge collect` stores them in PostgreSQL. Ingest lag = stored_at - published_at of
every message, read back from the database. Prints one JSON object.

    python tests/collector_bench.py --microscopes 50 --fps 30 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import collector_rig as rig

SAMPLES = rig.REPO / "samples" / "bccd"


def recorded(folder: Path) -> list[dict]:
    audit = folder / "recorded.jsonl"
    subprocess.run([sys.executable, "-m", "edge", "-q", "replay", str(SAMPLES), "--pace", "max", "--audit", str(audit),
                    "--publish", f"tcp://127.0.0.1:{rig.free_port()}"], cwd=rig.REPO, check=True)
    return [json.loads(line) for line in audit.read_text().splitlines()]


def writer(logs: list[Path], messages: list[dict], fps: float, seconds: float) -> None:
    """Append at ``fps`` lines/s per log, in 100 ms ticks, as edges flush one line per frame."""
    handles = [path.open("a", encoding="utf-8") for path in logs]
    start, tick, written = time.time(), 0.1, [0] * len(logs)
    while time.time() - start < seconds:
        due = int((time.time() - start) * fps)
        for index, handle in enumerate(handles):
            while written[index] < due:
                seq = written[index]
                message = dict(messages[seq % len(messages)], run=f"bench-{index}", seq=seq, frame_id=seq,
                               published_at=time.time())
                handle.write(json.dumps(message, separators=(",", ":")) + "\n")
                written[index] += 1
            handle.flush()
        time.sleep(max(0.0, tick - (time.time() - start) % tick))
    for handle in handles:
        handle.close()


def shippers(logs: list[Path], state_dir: Path, url: str, stop_after: float) -> None:
    from edge.collector.ship import Shipper
    from edge.collector.stream import NatsOptions

    async def main() -> None:
        ships = [Shipper(f"scope-{i}", path, None, state_dir / f"s{i}.json", NatsOptions(url), poll_s=0.05)
                 for i, path in enumerate(logs)]
        tasks = [asyncio.create_task(s.run()) for s in ships]
        await asyncio.sleep(stop_after)
        for s in ships:
            s.stop.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())


def cpu_seconds(pid: int) -> float:
    """user + system CPU of a process and its waited-for children, from /proc (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--microscopes", type=int, default=50)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--drain", type=float, default=120.0, help="seconds allowed to catch up after the load")
    args = parser.parse_args()
    import sqlalchemy as sa

    with tempfile.TemporaryDirectory(prefix="cytoedge-bench-") as tmp, rig.fresh_postgres() as database, \
            rig.nats_server(Path(tmp) / "nats") as (nats_process, url):
        folder = Path(tmp)
        messages = recorded(folder)
        logs = [folder / f"audit-{i}.jsonl" for i in range(args.microscopes)]
        for path in logs:
            path.touch()
        config = rig.write_collector_config(folder / "c.toml", database, url, f"127.0.0.1:{rig.free_port()}")
        collector = rig.cli("-q", "collect", "--config", str(config), log=folder / "collect.log")
        time.sleep(2.0)
        expected = int(args.seconds * args.fps) * args.microscopes
        ship = multiprocessing.Process(target=shippers, args=(logs, folder, url, args.seconds + args.drain))
        write = multiprocessing.Process(target=writer, args=(logs, messages, args.fps, args.seconds))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.time()
        ship.start()
        write.start()
        write.join()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        writer_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        written = sum(len(p.read_bytes().split(b"\n")) - 1 for p in logs)
        engine = sa.create_engine(database)

        def stored() -> int:
            with engine.connect() as conn:
                return int(conn.execute(sa.text("select count(*) from messages")).scalar())

        at_end_of_load = stored()
        caught_up = rig.wait_until(lambda: stored() >= written, args.drain, every=0.5)
        drained_at = time.time()
        with engine.connect() as conn:
            backends = [r[0] for r in conn.execute(sa.text(
                "select pid from pg_stat_activity where datname = current_database() and pid <> pg_backend_pid()"))]
            lags = [r[0] for r in conn.execute(sa.text("select stored_at - published_at from messages"))]
            cells = int(conn.execute(sa.text("select count(*) from cells")).scalar())
        cpu = {"collector": cpu_seconds(collector.pid), "shippers": cpu_seconds(ship.pid),
               "nats_server": cpu_seconds(nats_process.pid), "writer": writer_cpu,
               "postgres_backends": sum(cpu_seconds(pid) for pid in backends)}
        ship.terminate()
        ship.join(10)
        collector.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            collector.wait(20)
        result = {
            "microscopes": args.microscopes, "fps_each": args.fps, "seconds": args.seconds,
            "offered_msgs_per_s": args.microscopes * args.fps, "written": written, "expected_about": expected,
            "stored": len(lags), "cells_stored": cells, "stored_when_load_ended": at_end_of_load,
            "caught_up": caught_up, "drain_s": round(drained_at - started - args.seconds, 1),
            "ingest_msgs_per_s": round(len(lags) / max(1e-9, drained_at - started), 1),
            "lag_p50_s": round(percentile(lags, 0.5), 3), "lag_p99_s": round(percentile(lags, 0.99), 3),
            "lag_max_s": round(max(lags), 3) if lags else None,
            "cpu_s": {name: round(value, 1) for name, value in cpu.items()},
            "load_average_1min_at_end": os.getloadavg()[0],
        }
        print(json.dumps(result))
        return 0 if caught_up else 1


if __name__ == "__main__":
    sys.exit(main())
