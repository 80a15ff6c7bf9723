"""Soak run: the whole service path for a long time, recording what would show a leak or a drift.

Starts `cytoedge run` (replaying frames in a loop), a subscriber, and the bench display (when
installed) in their own processes; every SAMPLE seconds writes one CSV row with the service's RSS,
open file descriptors and threads, the display's RSS, the queue depth and latency from the `status`
topic, and the subscriber's counts. At the end it prints the figures docs/hardening.md records and
draws a plot (matplotlib, if installed).

    python tests/soak.py --duration 3600 --out artifacts/soak
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge.client import Subscriber  # noqa: E402
from edge.messages import TOPIC_CELLS, TOPIC_STATUS  # noqa: E402

FIELDS = [
    "t_s",
    "service_rss_mb",
    "service_fds",
    "service_threads",
    "display_rss_mb",
    "queue_depth",
    "fps",
    "latency_p50_ms",
    "latency_p99_ms",
    "dropped",
    "published",
    "received",
    "gaps",
    "malformed",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def proc_stats(pid: int) -> tuple[float, int, int]:
    """RSS in MB, open fds and threads, read from /proc (Linux)."""
    rss_kb = threads = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return rss_kb / 1024.0, len(os.listdir(f"/proc/{pid}/fd")), threads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3600.0, help="seconds (default 3600)")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between rows (default 10)")
    parser.add_argument("--fps", type=float, default=15.0, help="replay pace in frames/s (default 15)")
    parser.add_argument("--source", default=str(REPO / "samples" / "bccd"))
    parser.add_argument("--out", default=str(REPO / "artifacts" / "soak"))
    parser.add_argument("--no-display", action="store_true")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = out / "soak.toml"
    config.write_text(
        f'[source]\npath = "{args.source}"\nfps = {args.fps}\nloop = true\n[publish]\nendpoint = "{endpoint}"\n'
    )
    service = subprocess.Popen(
        [sys.executable, "-m", "edge", "-q", "run", "--config", str(config)],
        cwd=REPO,
        stderr=(out / "service.log").open("w"),
    )
    display = None
    if not args.no_display:
        try:
            import edge.display.server  # noqa: F401

            display = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "edge",
                    "-q",
                    "display",
                    "--connect",
                    endpoint,
                    "--listen",
                    f"127.0.0.1:{free_port()}",
                    "--sessions",
                    str(out / "sessions"),
                ],
                cwd=REPO,
                stderr=(out / "display.log").open("w"),
            )
        except ImportError:
            print("display not installed: soaking without it", file=sys.stderr)
    rows = []
    started = time.monotonic()
    next_sample = started + args.sample
    status: dict = {}
    received = 0
    try:
        with Subscriber(endpoint, topics=(TOPIC_CELLS, TOPIC_STATUS)) as subscriber:
            while time.monotonic() - started < args.duration:
                message = subscriber.receive(0.1)
                if message is not None:
                    if message.topic == TOPIC_STATUS:
                        status = message.payload
                    else:
                        received += 1
                if time.monotonic() >= next_sample:
                    next_sample += args.sample
                    if service.poll() is not None:
                        print(f"service exited with {service.returncode}", file=sys.stderr)
                        break
                    rss, fds, threads = proc_stats(service.pid)
                    display_rss = proc_stats(display.pid)[0] if display and display.poll() is None else 0.0
                    latency = status.get("latency_ms", {}).get("total", {})
                    row = [
                        round(time.monotonic() - started, 1),
                        round(rss, 2),
                        fds,
                        threads,
                        round(display_rss, 2),
                        status.get("queue_depth", 0),
                        status.get("fps", 0.0),
                        latency.get("p50", 0.0),
                        latency.get("p99", 0.0),
                        status.get("frames", {}).get("dropped", 0),
                        status.get("frames", {}).get("published", 0),
                        received,
                        subscriber.stats.gaps,
                        subscriber.stats.malformed,
                    ]
                    rows.append(row)
                    with (out / "soak.csv").open("w", newline="") as handle:
                        writer = csv.writer(handle)
                        writer.writerow(FIELDS)
                        writer.writerows(rows)
    finally:
        for process in (service, display):
            if process is not None:
                process.terminate()
                process.wait(timeout=30)
    summary = summarise(rows)
    summary["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}"
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    plot(rows, out / "soak.png")
    return 0


def summarise(rows: list[list]) -> dict:
    """Growth is measured from the end of warm-up (the first 10% of the run) to the end."""
    if len(rows) < 4:
        return {"rows": len(rows)}
    warm = rows[max(1, len(rows) // 10)]
    last = rows[-1]
    index = {name: i for i, name in enumerate(FIELDS)}

    def growth(name: str) -> float:
        start = warm[index[name]]
        return round(100.0 * (last[index[name]] - start) / start, 2) if start else 0.0

    p99 = [r[index["latency_p99_ms"]] for r in rows[rows.index(warm) :]]
    return {
        "rows": len(rows),
        "duration_s": last[0],
        "rss_mb_after_warmup": warm[index["service_rss_mb"]],
        "rss_mb_end": last[index["service_rss_mb"]],
        "rss_growth_pct": growth("service_rss_mb"),
        "display_rss_growth_pct": growth("display_rss_mb"),
        "fds_start": warm[index["service_fds"]],
        "fds_end": last[index["service_fds"]],
        "threads_start": warm[index["service_threads"]],
        "threads_end": last[index["service_threads"]],
        "latency_p99_ms_min": min(p99),
        "latency_p99_ms_max": max(p99),
        "published": last[index["published"]],
        "received": last[index["received"]],
        "gaps": last[index["gaps"]],
        "dropped": last[index["dropped"]],
    }


def plot(rows: list[list], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (the CSV has every figure)", file=sys.stderr)
        return
    t = [r[0] / 60 for r in rows]
    figure, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].plot(t, [r[1] for r in rows], label="service RSS (MB)")
    axes[0].plot(t, [r[4] for r in rows], label="display RSS (MB)")
    axes[0].set_ylim(bottom=0)
    axes[0].legend()
    axes[1].plot(t, [r[2] for r in rows], label="open fds")
    axes[1].plot(t, [r[3] for r in rows], label="threads")
    axes[1].plot(t, [r[5] for r in rows], label="queue depth")
    axes[1].set_ylim(bottom=0)
    axes[1].legend()
    axes[2].plot(t, [r[7] for r in rows], label="latency p50 (ms)")
    axes[2].plot(t, [r[8] for r in rows], label="latency p99 (ms)")
    axes[2].set_ylim(bottom=0)
    axes[2].set_xlabel("minutes")
    axes[2].legend()
    figure.suptitle("cytoedge soak: replay loop with a subscriber and the display attached")
    figure.tight_layout()
    figure.savefig(path, dpi=90)


if __name__ == "__main__":
    sys.exit(main())
