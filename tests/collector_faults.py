"""Fault run: simulated microscopes (real replays of the bundled frames, each with its shipper) feed the
collector through NATS JetStream into PostgreSQL while

* the collector is killed (SIGKILL) for ``down`` seconds, then restarted;
* one device's link is cut: its shipper is frozen (SIGSTOP) for ``down`` seconds, overlapping the outage;
* one edge restarts (SIGKILL mid-run, started again: a new run, appending to the same audit log);
* one shipper crashes (SIGKILL) and restarts, re-sending what was not yet acknowledged.

Afterwards the database must hold exactly the cells in the edges' audit logs: none lost, none doubled.
The test runs it scaled down (tests/test_collector_faults.py); the full version:

    python tests/collector_faults.py --down 60
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import collector_rig as rig

SAMPLES = rig.REPO / "samples" / "bccd"


def run_faults(folder: Path, database: str, nats_url: str, microscopes: int = 5, down: float = 6.0,
               fps: float = 3.0, log=print) -> dict:
    """The whole scenario; returns per-microscope counts (audit cells, stored, lost, extra, duplicated)."""
    names = [f"scope-{i}" for i in range(microscopes)]
    audits = {name: folder / f"{name}.jsonl" for name in names}
    config = rig.write_collector_config(folder / "collector.toml", database, nats_url, f"127.0.0.1:{rig.free_port()}")

    def edge(name: str):
        return rig.cli("-q", "replay", str(SAMPLES), "--loop", "--fps", str(fps), "--audit", str(audits[name]),
                       "--publish", f"tcp://127.0.0.1:{rig.free_port()}", log=folder / f"{name}-edge.log")

    def shipper(name: str):
        return rig.cli("ship", "--microscope", name, "--audit", str(audits[name]), "--nats", nats_url,
                       "--state", str(folder / f"{name}-offsets.json"), log=folder / f"{name}-ship.log")

    def collector():
        return rig.cli("collect", "--config", str(config), log=folder / "collector.log")

    edges = {name: edge(name) for name in names}
    ships = {name: shipper(name) for name in names}
    collect = collector()
    cut, restarted_edge, crashed_shipper = names[1 % microscopes], names[2 % microscopes], names[3 % microscopes]
    try:
        assert rig.wait_until(lambda: all(len(rig.stored_cells(database, n)) > 0 for n in names), 120), \
            "the collector stored nothing: see collector.log"
        log(f"all {microscopes} microscopes stored; killing the collector for {down:.0f} s")
        collect.send_signal(signal.SIGKILL)
        collect.wait()
        time.sleep(down / 3)
        log(f"cutting {cut}'s link (shipper stopped) for {down:.0f} s")
        os.kill(ships[cut].pid, signal.SIGSTOP)
        log(f"restarting edge {restarted_edge} (SIGKILL, then a new run)")
        edges[restarted_edge].send_signal(signal.SIGKILL)
        edges[restarted_edge].wait()
        edges[restarted_edge] = edge(restarted_edge)
        log(f"crashing shipper {crashed_shipper} (SIGKILL) and starting it again")
        ships[crashed_shipper].send_signal(signal.SIGKILL)
        ships[crashed_shipper].wait()
        ships[crashed_shipper] = shipper(crashed_shipper)
        time.sleep(down * 2 / 3)
        log("collector back")
        collect = collector()
        time.sleep(down / 3)
        log(f"{cut}'s link back")
        os.kill(ships[cut].pid, signal.SIGCONT)
        time.sleep(down / 3)
        for process in edges.values():
            process.terminate()
        for process in edges.values():
            process.wait(60)
        want = {name: rig.audit_cells(audits[name]) for name in names}
        log(f"edges stopped; waiting for {sum(map(len, want.values()))} cells")
        rig.wait_until(lambda: all(len(rig.stored_cells(database, n)) >= len(want[n]) for n in names), 120, every=1)
        time.sleep(2.0)  # anything doubled or late would land now
        result = {}
        for name in names:
            stored = rig.stored_cells(database, name)
            result[name] = {"audit_cells": len(want[name]), "stored": len(stored),
                            "lost": len(want[name] - set(stored)), "extra": len(set(stored) - want[name]),
                            "duplicated": len(stored) - len(set(stored)),
                            "runs": len({run for run, _, _ in want[name]})}
        return result
    finally:
        for process in [*edges.values(), *ships.values(), collect]:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
                process.terminate()
                try:
                    process.wait(30)
                except Exception:
                    process.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--down", type=float, default=60.0, help="seconds the collector is down and the link cut")
    parser.add_argument("--microscopes", type=int, default=5)
    parser.add_argument("--fps", type=float, default=3.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cytoedge-faults-") as tmp, rig.fresh_postgres() as database, \
            rig.nats_server(Path(tmp) / "nats") as (_, url):
        started = time.time()
        result = run_faults(Path(tmp), database, url, args.microscopes, args.down, args.fps,
                            log=lambda text: print(f"[{time.time() - started:6.1f} s] {text}", file=sys.stderr))
    total = {key: sum(r[key] for r in result.values()) for key in ("audit_cells", "stored", "lost", "extra",
                                                                     "duplicated")}
    print(json.dumps({"down_s": args.down, "microscopes": result, "total": total}))
    return 0 if total["lost"] == total["extra"] == total["duplicated"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
