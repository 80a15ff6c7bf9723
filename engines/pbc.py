"""The PBC single-cell dataset: manifest, the one shared train/val/test split, and cached decoding.

Every model in ``engines/`` must use :func:`split_pbc` with :data:`SPLIT_SEED` so that figures are
comparable, and must decode crops with :func:`load_crop_bgr`, which is the runtime's preprocessing
(``cv2.imread`` -> ``cv2.resize(INTER_AREA)``); the BGR->RGB swap and normalisation then happen in
``edge.classifier.preprocess`` (or its torch twin in training).
"""

from __future__ import annotations

import csv
import hashlib
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Re-exported: the engines write through the one atomic writer (edge/fileutil.py).
from edge.fileutil import atomic_write_bytes as atomic_write_bytes
from edge.fileutil import atomic_write_json as atomic_write_json
from edge.fileutil import atomic_write_text as atomic_write_text

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".cache" / "pbc"
CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
SPLIT_SEED = 20240601
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
SPLITS = ("train", "val", "test")
# Bump when the decoding below changes, so stale caches are never reused.
PREPROCESS_VERSION = "imread-bgr/resize-inter-area/v1"


@dataclass(frozen=True)
class Sample:
    path: str  # relative to the data folder, e.g. "basophil/BA_102039.jpg"
    label: str
    subtype: str = ""


def shared_dataset(name: str, env_var: str, explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where a data set of ../shared/data lives: argument, $<env_var>, $CYTOEDGE_SHARED_DATA/<name>
    (as the tests' conftest), then ../shared/data/<name> next to the repository."""
    if explicit:
        return Path(explicit)
    if os.environ.get(env_var):
        return Path(os.environ[env_var])
    if os.environ.get("CYTOEDGE_SHARED_DATA"):
        return Path(os.environ["CYTOEDGE_SHARED_DATA"]) / name
    return REPO_ROOT.parent / "shared" / "data" / name


def portable_path(value: str) -> str:
    """An argument as a card should record it: paths inside the repository or the shared data folder
    relative to the repository root (``../shared/data/...``), so no card names one machine's folders."""
    path = Path(value)
    if not path.is_absolute():
        return value
    resolved = path.resolve()
    for base, prefix in ((REPO_ROOT, ""), (REPO_ROOT.parent / "shared", "../shared/")):
        try:
            return prefix + resolved.relative_to(base.resolve()).as_posix()
        except ValueError:
            continue
    return "$" + "PATH_GIVEN_" + path.name.upper().replace("-", "_").replace(".", "_")


def portable_command(module: str, argv: list[str]) -> str:
    """The command that rebuilds a model, with every path made portable (see :func:`portable_path`)."""
    return " ".join([f"python -m {module}", *(portable_path(a) for a in argv)])


def data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where the PBC data lives ($CYTOEDGE_PBC overrides)."""
    return shared_dataset("pbc", "CYTOEDGE_PBC", explicit)


def read_manifest(root: Path) -> list[Sample]:
    """Read manifest.csv; refuse unknown labels early rather than training on a typo."""
    with open(Path(root) / "manifest.csv", newline="") as handle:
        rows = [Sample(r["path"], r["label"], r.get("subtype", "")) for r in csv.DictReader(handle)]
    unknown = sorted({s.label for s in rows} - set(CLASSES))
    if unknown:
        raise ValueError(f"manifest has labels outside {CLASSES}: {unknown}")
    return rows


def _rank(seed: int, path: str) -> str:
    return hashlib.sha256(f"{seed}:{path}".encode()).hexdigest()


def split_pbc(manifest: Iterable[Sample | tuple[str, str]], seed: int = SPLIT_SEED) -> dict[str, str]:
    """Deterministic stratified 70/15/15 split keyed by file path.

    Within each class, paths are ordered by sha256(seed:path), so the result depends only on the set
    of (path, label) pairs and the seed, not on manifest order, and adding a file moves no other file.
    """
    by_label: dict[str, list[str]] = {}
    for item in manifest:
        path, label = (item.path, item.label) if isinstance(item, Sample) else (item[0], item[1])
        by_label.setdefault(label, []).append(path)
    result: dict[str, str] = {}
    for label in sorted(by_label):
        paths = sorted(by_label[label], key=lambda p: _rank(seed, p))
        n = len(paths)
        n_train = round(n * SPLIT_FRACTIONS[0])
        n_val = round(n * SPLIT_FRACTIONS[1])
        for i, path in enumerate(paths):
            result[path] = "train" if i < n_train else "val" if i < n_train + n_val else "test"
    return result


def split_digest(split: dict[str, str]) -> str:
    """A short fingerprint of a split, stored in cards so later models can prove they used the same one."""
    text = "\n".join(f"{p}\t{split[p]}" for p in sorted(split))
    return hashlib.sha256(text.encode()).hexdigest()


def split_summary(samples: Sequence[Sample], split: dict[str, str], seed: int = SPLIT_SEED) -> dict:
    """Counts per split and class plus the digest: small enough to commit next to a model."""
    counts = Counter((split[s.path], s.label) for s in samples)
    return {
        "seed": seed,
        "method": "per class, order by sha256(f'{seed}:{path}'), first 70% train, next 15% val, rest test",
        "function": "engines.pbc.split_pbc",
        "sha256": split_digest(split),
        "counts": {k: {c: counts[(k, c)] for c in CLASSES} for k in SPLITS},
        "totals": {k: sum(counts[(k, c)] for c in CLASSES) for k in SPLITS},
    }


def load_crop_bgr(path: Path, size: int) -> np.ndarray:
    """Exactly the runtime's decoding: cv2.imread (BGR) then cv2.resize with INTER_AREA."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise OSError(f"cannot decode {path}")
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)



def load_images(root: Path, samples: Sequence[Sample], size: int, cache_dir: Path | None = CACHE_DIR) -> np.ndarray:
    """Decode crops to (N, size, size, 3) uint8 BGR, cached on disk keyed by the file list and decoding."""
    key_text = f"{PREPROCESS_VERSION}|{size}|{Path(root).resolve()}|" + "|".join(s.path for s in samples)
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"bgr{size}-{key}.npy" if cache_dir else None
    if cache is not None and cache.is_file():
        array = np.load(cache)
        if array.shape == (len(samples), size, size, 3):
            return array
    array = np.empty((len(samples), size, size, 3), np.uint8)
    for i, sample in enumerate(samples):
        array[i] = load_crop_bgr(Path(root) / sample.path, size)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".npy")
        os.close(fd)
        np.save(tmp, array)
        os.replace(tmp, cache)
    return array


def measure_red_cell_px(root: Path, samples: Sequence[Sample], limit: int = 60) -> dict[str, float]:
    """Rough scale check: median width (px) of isolated, round, dark-in-green blobs (red cells) in the
    144 px crops. A red cell is about 7.5 µm, so µm/px ~= 7.5 / median. Touching cells inflate the
    upper quartile; the median is what we use."""
    import cv2

    widths: list[float] = []
    for sample in list(samples)[:limit]:
        image = cv2.imread(str(Path(root) / sample.path))
        green = cv2.GaussianBlur(image[..., 1], (5, 5), 0)
        _, mask = cv2.threshold(green, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
        count, _, stats, _ = cv2.connectedComponentsWithStats(mask)
        height_img, width_img = mask.shape
        for x, y, w, h, area in stats[1:count]:
            inside = x > 0 and y > 0 and x + w < width_img and y + h < height_img
            round_enough = 0.8 < w / h < 1.25 and area > 0.6 * w * h * np.pi / 4
            if inside and round_enough and 15 < w < 45:
                widths.append((w + h) / 2)
    values = np.array(widths) if widths else np.array([np.nan])
    median = float(np.median(values))
    return {
        "n": len(widths),
        "median_px": median,
        "q25_px": float(np.percentile(values, 25)),
        "q75_px": float(np.percentile(values, 75)),
        "um_per_px": 7.5 / median,
        "field_um_144px": 144 * 7.5 / median,
    }
