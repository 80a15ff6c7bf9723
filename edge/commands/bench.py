"""`cytoedge bench`: the whole pipeline over a replay, with a subscriber-free publisher, and where
each frame's milliseconds go.

Full speed (no ``--fps``) replays as fast as the pipeline takes frames: throughput. ``--fps N`` offers
frames at a camera's rate and behaves like a camera (the oldest waiting frame is dropped when the
pipeline falls behind), so "dropped" and end-to-end latency are what a live microscope would see.
``--tiled 1920x1080`` benchmarks camera-sized frames tiled from the bundled ones (edge/benchinput.py);
``--in-memory`` offers decoded frames, as a raw (CSI) camera does, instead of decoding JPEG files.
Figures printed here are the ones recorded in docs/benchmarks.md; a benchmark is a measurement to
read, not a test that passes or fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edge import config as cfg
from edge.benchinput import parse_size, write_tiled
from edge.errors import SourceError
from edge.frames import IMAGE_SUFFIXES, BadImage, Frame, read_image
from edge.pipeline import BREAKDOWN
from edge.replay import ReplaySource
from edge.service import build_pipeline
from edge.sources import bundled_samples
from edge.stats import STAGES


class LimitedReplay:
    """Loops a replay until ``limit`` frames were produced, so short inputs give stable percentiles.
    ``live``: drop the oldest waiting frame when behind, as a camera source does."""

    def __init__(self, inner: ReplaySource, limit: int, live: bool) -> None:
        self.inner = inner
        self.limit = limit
        self.live = live

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        for count, frame in enumerate(self.inner.frames(stop)):
            if count >= self.limit:
                return
            yield frame


class InMemoryReplay:
    """The input's frames decoded once and then offered from memory, as a camera that delivers raw
    frames (a Jetson's CSI sensor) offers them: no decode in the capture thread. Loops until ``limit``
    frames; ``fps`` paces them like a camera (None: as fast as taken); ``live`` as for LimitedReplay."""

    def __init__(self, inner: ReplaySource, limit: int, fps: float | None, live: bool) -> None:
        self.inner = inner
        self.limit = limit
        self.fps = fps
        self.live = live
        never = threading.Event()
        self.images = [(f.image, f.source) for f in inner.frames(never)]  # inner does not loop here
        if not self.images:
            raise SourceError(f"no readable frames in {inner.path}")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        started = time.monotonic()
        for count in range(self.limit):
            if self.fps:
                delay = started + count / self.fps - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    return
            if stop.is_set():
                return
            image, origin = self.images[count % len(self.images)]
            yield Frame(image, count, time.time(), origin)


def decode_ms(path: Path, max_pixels: int) -> float:
    """Median time to read and decode one of the input's image files (the capture thread's cost per
    frame for a file replay or an MJPEG camera); 0 for a video or session input."""
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:20] if path.is_dir() else []
    times = []
    for file in files:
        started = time.perf_counter()
        try:
            read_image(file, max_pixels)
        except BadImage:
            continue
        times.append((time.perf_counter() - started) * 1000.0)
    return round(statistics.median(times), 3) if times else 0.0


def run_bench(
    config: cfg.Config, path: Path, frames: int, fps: float | None, in_memory: bool = False
) -> dict[str, Any]:
    """One benchmark run; the result `--json` prints."""
    config = cfg.with_overrides(
        config,
        "command line",
        source__path=str(path),
        source__pace="recorded" if fps else "max",
        source__loop=True,
        publish__endpoint="tcp://127.0.0.1:*",
    )
    max_pixels = config["pipeline"]["max_frame_pixels"]
    source: LimitedReplay | InMemoryReplay
    if in_memory:
        replay = ReplaySource(path, pace="max", loop=False, max_pixels=max_pixels)
        source = InMemoryReplay(replay, frames, fps, live=bool(fps))
    else:
        replay = ReplaySource(path, pace="recorded" if fps else "max", fps=fps or 5.0, loop=True, max_pixels=max_pixels)
        source = LimitedReplay(replay, frames, live=bool(fps))
    # Keep every sample, so the percentiles cover the whole run.
    pipeline = build_pipeline(config, source=source, latency_window=max(frames, 1000))
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        pipeline.run()
    finally:
        pipeline.publisher.close()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    published = pipeline.counters.published
    summary = pipeline.latency.summary()
    breakdown = pipeline.breakdown.summary()
    frame_size = _frame_size(path, max_pixels)
    return {
        "frames": published,
        "seconds": round(elapsed, 3),
        "fps": round(published / elapsed, 2) if elapsed > 0 else 0.0,
        "latency_ms": summary["total"],
        "stages_ms": {stage: summary[stage] for stage in STAGES},
        "breakdown_ms": {"decode": {"p50": 0.0 if in_memory else decode_ms(path, max_pixels)}, **breakdown},
        # CPU time of all threads per published frame: what the frame costs, however busy the machine is
        "cpu_ms_per_frame": round(cpu * 1000.0 / published, 2) if published else 0.0,
        "frames_per_model_call": round(pipeline.frames_classified / max(1, pipeline.model_calls), 2),
        "dropped": pipeline.queue.dropped,
        "skipped": replay.stats.skipped,
        "rejected": pipeline.counters.rejected,
        "model": pipeline.classifier.model_id,
        "threads": config["model"]["threads"],
        "machine": f"{platform.machine()} {platform.processor() or ''} {_cpu_count()} CPUs".strip(),
        "input": str(path),
        "in_memory": in_memory,
        "frame_size": frame_size,
        "offered_fps": fps or "max",
    }


def main(args: argparse.Namespace) -> int:
    config = cfg.with_overrides(cfg.load(args.config), "command line", model__path=args.model)
    with tempfile.TemporaryDirectory(prefix="cytoedge-bench-") as scratch:
        if args.tiled:
            path = Path(scratch) / "tiled"
            write_tiled(Path(args.path) if args.path else bundled_samples(), path, parse_size(args.tiled))
        else:
            path = Path(args.path) if args.path else bundled_samples()
        result = run_bench(config, path, args.frames, args.fps, args.in_memory)
    if args.tiled:
        result["input"] = f"{args.path or 'bundled samples'} tiled to {args.tiled}"
    if args.json:
        print(json.dumps(result))
    else:
        print(report(result))
    return 0


def report(result: dict[str, Any]) -> str:
    """The human-readable form: throughput, latency per stage, and where each frame's time goes."""
    lines = [
        f"{result['frames']} frames of {result['frame_size']} in {result['seconds']:.2f} s: {result['fps']:.1f} "
        f"frames/s (offered: {result['offered_fps']}), dropped {result['dropped']}, "
        f"rejected by the quality gate {result['rejected']}",
        "latency per frame (ms):",
    ]
    for stage in STAGES:
        p = result["stages_ms"][stage]
        lines.append(f"  {stage:<9} p50 {p['p50']:7.2f}   p99 {p['p99']:7.2f}")
    lines.append("work per frame (ms; decode runs in the capture thread, gate/finder/crop in the finder thread):")
    for stage in ("decode", *BREAKDOWN):
        p = result["breakdown_ms"][stage]
        p99 = f"   p99 {p['p99']:7.2f}" if "p99" in p else ""
        lines.append(f"  {stage:<9} p50 {p['p50']:7.2f}{p99}")
    lines.append(
        f"CPU per frame (all threads): {result['cpu_ms_per_frame']:.1f} ms; "
        f"frames per model call: {result['frames_per_model_call']}"
    )
    lines.append(f"model {result['model']} ({result['threads']} threads) on {result['machine']}")
    return "\n".join(lines)


def _frame_size(path: Path, max_pixels: int) -> str:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:1] if path.is_dir() else []
    if not files:
        return "unknown size"
    height, width = read_image(files[0], max_pixels).shape[:2]
    return f"{width}x{height}"


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
