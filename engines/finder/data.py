"""The shared frames with boxes, per microscope, for the finder / scale / quality benchmarks.

Sources: TXL-PBC's three microscopes (``bccd``, ``bcd``, ``raabin``; YOLO labels, the authors'
train/val/test split) and BCCD's own Pascal VOC boxes (``bccd-voc``; ImageSets train/val/test).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from engines.finder.bccd import read_voc

Box = tuple[int, int, int, int]
SOURCES = ("bccd", "bcd", "raabin", "bccd-voc")
KIND_OF_YOLO = {"0": "wbc", "1": "rbc", "2": "platelet"}


def shared_data() -> Path:
    default = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
    return Path(os.environ.get("CYTOEDGE_SHARED_DATA", default)).resolve()


@dataclass(frozen=True)
class Frame:
    source: str
    split: str  # train | val | test
    image: Path
    labels: Path

    def boxes(self, size: tuple[int, int]) -> dict[str, list[Box]]:
        """Ground-truth (x, y, w, h) boxes per kind, in frame pixels (``size`` = width, height)."""
        if self.labels.suffix == ".xml":
            return read_voc(self.labels)
        width, height = size
        out: dict[str, list[Box]] = {kind: [] for kind in KIND_OF_YOLO.values()}
        for line in self.labels.read_text().splitlines():
            parts = line.split()
            if len(parts) != 5 or parts[0] not in KIND_OF_YOLO:
                continue
            x, y, w, h = (float(v) for v in parts[1:])
            box = (round((x - w / 2) * width), round((y - h / 2) * height), round(w * width), round(h * height))
            if box[2] >= 2 and box[3] >= 2:
                out[KIND_OF_YOLO[parts[0]]].append(box)
        return out


def frames(source: str, root: Path | None = None) -> list[Frame]:
    """Every frame of one source, sorted by split then name."""
    root = root or shared_data()
    if source == "bccd-voc":
        base = root / "bccd" / "BCCD"
        split_of: dict[str, str] = {}
        for split in ("train", "val", "test"):
            path = base / "ImageSets" / "Main" / f"{split}.txt"
            if path.is_file():
                split_of.update({n.strip(): split for n in path.read_text().splitlines() if n.strip()})
        return sorted(
            (Frame(source, split_of.get(p.stem, "train"), base / "JPEGImages" / f"{p.stem}.jpg", p)
             for p in (base / "Annotations").glob("*.xml")),
            key=lambda f: (f.split, f.image.name),
        )
    txl = root / "txl-pbc"
    with open(txl / "manifest.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["source"] == source]
    return sorted((Frame(source, row["split"], txl / row["image"], txl / row["labels"]) for row in rows),
                  key=lambda f: (f.split, f.image.name))


def available(root: Path | None = None) -> bool:
    root = root or shared_data()
    return (root / "txl-pbc" / "manifest.csv").is_file() and (root / "bccd" / "BCCD" / "Annotations").is_dir()
