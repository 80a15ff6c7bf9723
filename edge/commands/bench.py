"""`cytoedge bench`: the whole pipeline at full speed over a replay, with a subscriber-free publisher.

Figures printed here are the ones recorded in docs/benchmarks.md; a benchmark is a measurement
to read, not a test that passes or fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edge import config as cfg
from edge.frames import Frame
from edge.replay import ReplaySource
from edge.service import build_pipeline
from edge.sources import bundled_samples
from edge.stats import STAGES


class LimitedReplay:
    """Loops a replay until ``limit`` frames were produced, so short inputs give stable percentiles."""

    live = False

    def __init__(self, inner: ReplaySource, limit: int) -> None:
        self.inner = inner
        self.limit = limit

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        for count, frame in enumerate(self.inner.frames(stop)):
            if count >= self.limit:
                return
            yield frame


def main(args: argparse.Namespace) -> int:
    config = cfg.load(args.config)
    path = Path(args.path) if args.path else bundled_samples()
    config = cfg.with_overrides(
        config,
        "command line",
        source__path=str(path),
        source__pace="recorded" if args.fps else "max",
        source__loop=True,
        model__path=args.model,
        publish__endpoint="tcp://127.0.0.1:*",
    )
    source = LimitedReplay(
        ReplaySource(
            path,
            pace="recorded" if args.fps else "max",
            fps=args.fps or 5.0,
            loop=True,
            max_pixels=config["pipeline"]["max_frame_pixels"],
        ),
        args.frames,
    )
    # Keep every sample, so the percentiles cover the whole run.
    pipeline = build_pipeline(config, source=source, latency_window=max(args.frames, 1000))
    started = time.perf_counter()
    try:
        pipeline.run()
    finally:
        pipeline.publisher.close()
    elapsed = time.perf_counter() - started
    frames = pipeline.counters.published
    summary = pipeline.latency.summary()
    result = {
        "frames": frames,
        "seconds": round(elapsed, 3),
        "fps": round(frames / elapsed, 2) if elapsed > 0 else 0.0,
        "latency_ms": summary["total"],
        "stages_ms": {stage: summary[stage] for stage in STAGES},
        "dropped": pipeline.queue.dropped,
        "skipped": source.inner.stats.skipped,
        "model": pipeline.classifier.model_id,
        "machine": f"{platform.machine()} {platform.processor() or ''} {_cpu_count()} CPUs".strip(),
        "input": str(path),
        "offered_fps": args.fps or "max",
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{frames} frames in {elapsed:.2f} s: {result['fps']:.1f} frames/s, dropped {result['dropped']}")
        for stage in STAGES:
            print(f"  {stage:<9} p50 {summary[stage]['p50']:7.2f} ms   p99 {summary[stage]['p99']:7.2f} ms")
        print(f"model {result['model']} on {result['machine']}")
    return 0


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
