"""Measure the cell finder (`edge.cellfinder.find_cells`) against BCCD's Pascal VOC boxes.

    python -m engines.finder.bccd [--bccd DIR] [--out docs/cellfinder.md]

Greedy matching per class at IoU >= 0.5 (detections in score order, each takes the unmatched
ground-truth box it overlaps most). Red cells are under-annotated in BCCD, so only their recall
is reported. Figures are given for all frames, for train+val (where the parameters were tuned)
and for the test list. With --out, the table replaces the block between the ``eval:begin`` and
``eval:end`` markers of that Markdown file (appended if the markers are missing).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from edge.cellfinder import Detection, FinderParams, find_cells
from edge.fileutil import atomic_write_bytes

BCCD_UM_PER_PX = 0.075
VOC_KINDS = {"WBC": "wbc", "RBC": "rbc", "Platelets": "platelet"}
IOU_MIN = 0.5
BEGIN, END = "<!-- eval:begin -->", "<!-- eval:end -->"
Box = tuple[int, int, int, int]


def default_bccd() -> Path:
    shared = Path(os.environ.get("CYTOEDGE_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
    return shared / "bccd" / "BCCD"


def read_voc(path: Path) -> dict[str, list[Box]]:
    """VOC corners -> (x, y, w, h) per kind; degenerate boxes (a side < 2 px) are dropped."""
    boxes: dict[str, list[Box]] = {kind: [] for kind in VOC_KINDS.values()}
    for obj in ET.parse(path).getroot().iter("object"):
        kind = VOC_KINDS.get((obj.findtext("name") or "").strip())
        bnd = obj.find("bndbox")
        if kind is None or bnd is None:
            continue
        x0, y0, x1, y1 = (round(float(bnd.findtext(k) or 0)) for k in ("xmin", "ymin", "xmax", "ymax"))
        if x1 - x0 >= 2 and y1 - y0 >= 2:
            boxes[kind].append((x0, y0, x1 - x0, y1 - y0))
    return boxes


def iou(a: Box, b: Box) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def match(found: list[Detection], truth: list[Box]) -> int:
    """Greedy matching at IoU >= 0.5; returns the number of true positives."""
    taken = [False] * len(truth)
    hits = 0
    for det in sorted(found, key=lambda d: -d.score):
        best, best_iou = -1, IOU_MIN
        for j, box in enumerate(truth):
            if not taken[j]:
                value = iou(det.bbox, box)
                if value >= best_iou:
                    best, best_iou = j, value
        if best >= 0:
            taken[best] = True
            hits += 1
    return hits


@dataclass
class Tally:
    """True positives, detections and ground truth per kind, over a set of frames."""

    tp: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VOC_KINDS.values(), 0))
    found: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VOC_KINDS.values(), 0))
    truth: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VOC_KINDS.values(), 0))
    frames: int = 0
    ms: list[float] = field(default_factory=list)

    def recall(self, kind: str) -> float:
        return self.tp[kind] / self.truth[kind] if self.truth[kind] else float("nan")

    def precision(self, kind: str) -> float:
        return self.tp[kind] / self.found[kind] if self.found[kind] else float("nan")


@dataclass
class FrameResult:
    name: str
    tp: dict[str, int]
    found: dict[str, int]
    truth: dict[str, int]
    ms: float


def evaluate_frame(bccd: Path, name: str, params: FinderParams) -> FrameResult:
    image = cv2.imread(str(bccd / "JPEGImages" / f"{name}.jpg"))
    if image is None:
        raise FileNotFoundError(bccd / "JPEGImages" / f"{name}.jpg")
    truth = read_voc(bccd / "Annotations" / f"{name}.xml")
    start = time.perf_counter()
    found = find_cells(image, BCCD_UM_PER_PX, params)
    ms = (time.perf_counter() - start) * 1000
    by_kind = {kind: [d for d in found if d.kind == kind] for kind in truth}
    return FrameResult(name, {k: match(by_kind[k], truth[k]) for k in truth}, {k: len(v) for k, v in by_kind.items()},
                       {k: len(v) for k, v in truth.items()}, ms)


def tally(results: Iterable[FrameResult]) -> Tally:
    total = Tally()
    for r in results:
        total.frames += 1
        total.ms.append(r.ms)
        for kind in r.tp:
            total.tp[kind] += r.tp[kind]
            total.found[kind] += r.found[kind]
            total.truth[kind] += r.truth[kind]
    return total


def read_list(bccd: Path, name: str) -> list[str]:
    path = bccd / "ImageSets" / "Main" / f"{name}.txt"
    return [line.strip() for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def table(rows: dict[str, Tally]) -> str:
    head = ("| frames | n | WBC recall | WBC precision | platelet recall | platelet precision | RBC recall "
            "| ms/frame (mean / p95) |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for label, t in rows.items():
        lines.append(
            f"| {label} | {t.frames} | {t.recall('wbc'):.3f} ({t.tp['wbc']}/{t.truth['wbc']}) "
            f"| {t.precision('wbc'):.3f} ({t.tp['wbc']}/{t.found['wbc']}) "
            f"| {t.recall('platelet'):.3f} ({t.tp['platelet']}/{t.truth['platelet']}) "
            f"| {t.precision('platelet'):.3f} ({t.tp['platelet']}/{t.found['platelet']}) "
            f"| {t.recall('rbc'):.3f} ({t.tp['rbc']}/{t.truth['rbc']}) "
            f"| {np.mean(t.ms):.2f} / {np.percentile(t.ms, 95):.2f} |")
    return "\n".join(lines)


def write_block(path: Path, block: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the measured block of a Markdown file, keeping the hand-written text around it."""
    text = path.read_text() if path.is_file() else "# Cell finder\n"
    new = f"{begin}\n{block}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + new + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + new + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bccd", type=Path, default=default_bccd(), help="BCCD folder (JPEGImages, Annotations)")
    parser.add_argument("--out", type=Path, help="Markdown file whose eval block is replaced with the table")
    parser.add_argument("--misses", action="store_true", help="list frames with a missed or extra white cell")
    args = parser.parse_args(argv)
    if not (args.bccd / "Annotations").is_dir():
        print(f"no BCCD annotations under {args.bccd}", file=sys.stderr)
        return 2
    cv2.setNumThreads(1)  # the figure is per core; the service runs frames in parallel
    params = FinderParams()
    names = sorted(p.stem for p in (args.bccd / "Annotations").glob("*.xml"))
    results = {name: evaluate_frame(args.bccd, name, params) for name in names}
    trainval = set(read_list(args.bccd, "train") + read_list(args.bccd, "val"))
    test = set(read_list(args.bccd, "test"))
    rows = {"all": tally(results.values())}
    if trainval:
        rows["train+val (tuned on)"] = tally(r for n, r in results.items() if n in trainval)
    if test:
        rows["test"] = tally(r for n, r in results.items() if n in test)
    text = table(rows)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, OpenCV {cv2.__version__}, one thread"
    block = f"{text}\n\nMeasured by `python -m engines.finder.bccd` ({machine}), default `FinderParams`."
    print(block)
    if args.misses:
        for r in results.values():
            if r.tp["wbc"] != r.truth["wbc"] or r.tp["wbc"] != r.found["wbc"]:
                print(f"{r.name}: wbc truth {r.truth['wbc']} found {r.found['wbc']} matched {r.tp['wbc']}")
    if args.out:
        write_block(args.out, block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
