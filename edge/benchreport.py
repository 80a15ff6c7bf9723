"""The benchmark tables of docs/benchmarks.md, from one command:

    python -m edge.benchreport [--runs 3] [--models baseline-cnn student-v1] [--threads N] [--finder learned]

Runs `cytoedge bench` over 640x480 (the bundled frames) and 1920x1080 (tiled from them, as JPEG files,
and in memory as a raw camera offers them), at full speed and at an offered 30 frames/s, for each
model, several times; prints Markdown with the median of each figure over the runs and the machine's
load average, because on a shared machine one run proves little.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from edge import config as cfg
from edge.benchinput import write_tiled
from edge.commands.bench import run_bench
from edge.models import bundled_models_dir
from edge.pipeline import BREAKDOWN
from edge.sources import bundled_samples

# (label, frame size or None for the bundled frames, in memory, offered fps or None, frames)
CASES = (
    ("640×480", None, False, None, 300),
    ("640×480", None, False, 30.0, 300),
    ("1920×1080 JPEG", (1920, 1080), False, None, 120),
    ("1920×1080 JPEG", (1920, 1080), False, 30.0, 300),
    ("1920×1080 raw", (1920, 1080), True, None, 120),
    ("1920×1080 raw", (1920, 1080), True, 30.0, 300),
)


def _median(results: list[dict[str, Any]], *keys: str) -> float:
    values = []
    for result in results:
        value: Any = result
        for key in keys:
            value = value[key]
        values.append(float(value))
    return statistics.median(values)


def table(model: str, rows: list[tuple[str, float | None, list[dict[str, Any]], list[float]]]) -> str:
    head = (
        "| input | offered | frames/s | end to end p50 / p99 ms | dropped | "
        + " | ".join(["decode", *BREAKDOWN])
        + " | CPU ms/frame | frames per model call | load avg |"
    )
    lines = [f"**{model}** (medians of {len(rows[0][2])} runs; per-stage columns: p50 ms of each frame's work)", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for label, fps, results, loads in rows:
        stages = " | ".join(f"{_median(results, 'breakdown_ms', s, 'p50'):.1f}" for s in ("decode", *BREAKDOWN))
        lines.append(
            f"| {label} | {'max' if fps is None else f'{fps:g}/s'} | {_median(results, 'fps'):.1f} | "
            f"{_median(results, 'latency_ms', 'p50'):.0f} / {_median(results, 'latency_ms', 'p99'):.0f} | "
            f"{_median(results, 'dropped'):.0f} | {stages} | {_median(results, 'cpu_ms_per_frame'):.0f} | "
            f"{_median(results, 'frames_per_model_call'):.2f} | {min(loads):.1f}–{max(loads):.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge.benchreport", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["baseline-cnn", "student-v1"],
                        help="bundled model names (engines/models/NAME) or .onnx paths")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every run's frame count (e.g. 0.1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="ONNX Runtime threads (default: the config's); the model's answers are the same")
    parser.add_argument("--finder", choices=("classic", "learned"), default=None,
                        help="cell finder ([detector] method; default: the config's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    base = cfg.load(None)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"Machine: {platform.machine()}, {len(os.sched_getaffinity(0))} CPUs, {when}")
    with tempfile.TemporaryDirectory(prefix="cytoedge-benchreport-") as scratch:
        tiled = Path(scratch) / "1080p"
        write_tiled(bundled_samples(), tiled, (1920, 1080))
        for model in args.models:
            model_path = Path(model) if model.endswith(".onnx") else bundled_models_dir() / model / "model.onnx"
            config = cfg.with_overrides(base, "benchreport", model__path=str(model_path))
            if args.threads:
                config = cfg.with_overrides(config, "benchreport", model__threads=args.threads)
            if args.finder:
                config = cfg.with_overrides(config, "benchreport", detector__method=args.finder)
            rows = []
            for label, size, in_memory, fps, frames in CASES:
                path = tiled if size else bundled_samples()
                results, loads = [], []
                for _ in range(args.runs):
                    loads.append(os.getloadavg()[0])
                    results.append(run_bench(config, path, max(4, round(frames * args.scale)), fps, in_memory))
                rows.append((label, fps, results, loads))
            print()
            finder = config["detector"]["method"]
            print(table(f"{model} ({results[-1]['model']}, ONNX Runtime, {results[-1]['threads']} threads, "
                        f"{finder} cell finder)", rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
