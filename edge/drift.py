"""Domain alarm: notice when the cells look unlike the data the model was trained on.

A model trained on one microscope and stain can be confidently wrong on another, so per-cell
confidence alone cannot be trusted to raise the flag. The alarm compares the *distribution* of a
rolling window of recent cells with the in-domain reference distribution stored with the model,
on several features at once: the model's anomaly and uncertainty scores and the mean colour of each
crop as the model sees it (stain and white balance move these first). A Kolmogorov–Smirnov
two-sample test per feature, Bonferroni-corrected, decides; hysteresis keeps it from flickering.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FEATURES = ("anomaly", "uncertainty", "colour_0", "colour_1", "colour_2")
ALARM_TEXT = "images unlike the training data: results unreliable, check stain/focus/scale or adapt the model"


def crop_colour_means(crops_bgr: np.ndarray) -> np.ndarray:
    """(N, 3) mean B, G, R of the central half of each crop, where the cell is, in 0..1."""
    if len(crops_bgr) == 0:
        return np.zeros((0, 3), np.float32)
    size = crops_bgr.shape[1]
    lo, hi = size // 4, size - size // 4
    return crops_bgr[:, lo:hi, lo:hi, :].reshape(len(crops_bgr), -1, 3).mean(axis=1).astype(np.float32) / 255.0


def features(anomaly: np.ndarray, uncertainty: np.ndarray, crops_bgr: np.ndarray) -> dict[str, np.ndarray]:
    colours = crop_colour_means(crops_bgr)
    return {
        "anomaly": np.asarray(anomaly, np.float32),
        "uncertainty": np.asarray(uncertainty, np.float32),
        **{f"colour_{i}": colours[:, i] for i in range(3)},
    }


def ks_critical(alpha: float, n: int, m: int) -> float:
    """Asymptotic two-sample KS critical distance at level ``alpha``."""
    return math.sqrt(-0.5 * math.log(alpha / 2.0)) * math.sqrt((n + m) / (n * m))


def ks_distance(sample: np.ndarray, reference_cdf: Callable[[np.ndarray], np.ndarray]) -> float:
    """sup |F_sample - F_reference| over the sample's points (both sides of each step)."""
    points = np.sort(sample)
    n = len(points)
    reference = reference_cdf(points)
    above = np.arange(1, n + 1) / n - reference
    below = reference - np.arange(0, n) / n
    return float(max(above.max(), below.max()))


def _quantile_cdf(quantiles: np.ndarray, points: np.ndarray) -> np.ndarray:
    probs = np.linspace(0.0, 1.0, len(quantiles))
    return np.interp(points, quantiles, probs, left=0.0, right=1.0)


@dataclass
class Reference:
    """In-domain distributions per predicted class: for each class and feature, quantiles at evenly
    spaced probabilities, and how many cells they were measured on. Comparing a window with the
    mixture of these, weighted by the window's own class mix, keeps a slide that is simply rich in
    neutrophils from looking 'foreign'."""

    quantiles: dict[str, dict[str, np.ndarray]]  # class -> feature -> quantiles
    counts: dict[str, int]

    @property
    def count(self) -> int:
        return sum(self.counts.values())

    @property
    def features(self) -> list[str]:
        return sorted({f for per_class in self.quantiles.values() for f in per_class})

    @classmethod
    def from_samples(cls, samples: dict[str, np.ndarray], labels: np.ndarray, points: int = 101) -> Reference:
        probs = np.linspace(0, 1, points)
        quantiles, counts = {}, {}
        for label in sorted(set(labels.tolist())):
            mask = labels == label
            if mask.sum() < 5:
                continue
            counts[label] = int(mask.sum())
            quantiles[label] = {
                name: np.quantile(values[mask], probs).astype(np.float32) for name, values in samples.items()
            }
        return cls(quantiles, counts)

    def mixture_cdf(self, feature: str, weights: dict[str, float]) -> Callable[[np.ndarray], np.ndarray]:
        def cdf(points: np.ndarray) -> np.ndarray:
            total = np.zeros(len(points))
            for label, weight in weights.items():
                total += weight * _quantile_cdf(self.quantiles[label][feature], points)
            return total

        return cdf

    def to_json(self) -> dict[str, Any]:
        return {
            "counts": self.counts,
            "quantiles": {
                label: {k: [round(float(x), 6) for x in v] for k, v in per_class.items()}
                for label, per_class in self.quantiles.items()
            },
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Reference:
        quantiles = {
            label: {k: np.asarray(v, np.float32) for k, v in per_class.items() if k in FEATURES}
            for label, per_class in data["quantiles"].items()
        }
        counts = {label: int(n) for label, n in data["counts"].items() if label in quantiles}
        if not quantiles or sum(counts.values()) < 10:
            raise ValueError("reference needs per-class quantiles and at least 10 cells")
        return cls(quantiles, counts)


def load_reference(model_path: Path, metadata_reference: dict[str, Any], model_sha256: str) -> Reference | None:
    """The model's own reference (metadata), else ``reference.json`` beside the model file, if it was
    measured on this very file (a retrained model with an old reference would alarm on the wrong thing)."""
    if metadata_reference:
        return Reference.from_json(metadata_reference)
    beside = Path(model_path).with_name("reference.json")
    if not beside.is_file():
        return None
    data = json.loads(beside.read_text(encoding="utf-8"))
    if data.get("model_sha256") not in (None, model_sha256):
        raise ValueError(f"{beside} was measured on another model file (sha256 {data['model_sha256'][:12]})")
    return Reference.from_json(data)


@dataclass
class DomainAlarm:
    """Rolling-window drift test. ``alpha`` is the per-check false-alarm level (Bonferroni over the
    features); the alarm clears only when every feature is back under the critical distance at
    ``clear_alpha`` (a looser level), so it does not flicker at the boundary. Cells whose predicted
    class has no reference are compared with the whole reference. A new run starts *unchecked*: until
    a full window has looked like the reference at the loose level (every feature under the
    ``clear_alpha`` distance), there is no verdict that the images are familiar, and
    (``flag_until_checked``) every cell goes to review meanwhile; an alarm makes the run unchecked
    again. A foreign microscope whose windows are ambiguous (between the two levels) never passes
    unflagged."""

    reference: Reference
    window: int = 60
    min_cells: int = 30
    alpha: float = 1e-4
    clear_alpha: float = 0.05
    flag_until_checked: bool = True  # cells go to review until the images have been found familiar
    active: bool = False
    # Whether the images have been found familiar: a full window (``window`` cells) under the loose level
    # since the start or the last alarm. Before that a foreign microscope's first cells would otherwise pass
    # unflagged (the alarm cannot fire on fewer than ``min_cells``, and an ambiguous window raises nothing).
    checked: bool = False
    last_distances: dict[str, float] = field(default_factory=dict)
    _recent: deque[tuple[str, dict[str, float]]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self._recent = deque(maxlen=self.window)

    @property
    def cells(self) -> int:
        return len(self._recent)

    @property
    def flags_cells(self) -> bool:
        """Whether the service must send every cell to review now."""
        return self.active or (self.flag_until_checked and not self.checked)

    def update(self, labels: list[str], values: dict[str, np.ndarray]) -> bool:
        """Add one frame's cells (predicted labels and their features); returns whether the alarm is on."""
        names = self.reference.features
        for index, label in enumerate(labels):
            self._recent.append((label, {name: float(values[name][index]) for name in names if name in values}))
        n = len(self._recent)
        if n < self.min_cells:
            return self.active
        counts: dict[str, int] = {}
        for label, _ in self._recent:
            key = label if label in self.reference.quantiles else "*"
            counts[key] = counts.get(key, 0) + 1
        weights = {label: counts.get(label, 0) / n for label in self.reference.quantiles}
        if "*" in counts:  # unknown classes: spread their share over the reference's own class mix
            total = self.reference.count
            for label, count in self.reference.counts.items():
                weights[label] += counts["*"] / n * count / total
        m = self.reference.count
        k = len(names)
        on_level = ks_critical(self.alpha / k, n, m)
        off_level = ks_critical(self.clear_alpha / k, n, m)
        self.last_distances = {
            name: ks_distance(
                np.array([v[name] for _, v in self._recent], np.float32), self.reference.mixture_cdf(name, weights)
            )
            for name in names
        }
        worst = max(self.last_distances.values())
        if not self.active and worst > on_level:
            self.active = True
            self.checked = False
        elif worst < off_level:
            self.active = False
            # "Familiar" is a verdict on a full window: with fewer cells the loose level is too loose
            # (at 30 cells a 0.6-sd shift still passes it about half the time).
            self.checked = self.checked or n >= self.window
        return self.active

    def reset(self) -> None:
        self._recent.clear()
        self.active = False
        self.checked = False


def stream(alarm: DomainAlarm, labels: Sequence[str], values: dict[str, np.ndarray],
           order: Iterable[int]) -> Iterator[int]:
    """Feed cells to ``alarm`` one at a time in ``order``, as the service meets them (offline
    measurements of the alarm); yields each cell's index once the alarm has seen it."""
    for index in order:
        alarm.update([str(labels[index])], {k: v[index:index + 1] for k, v in values.items()})
        yield index


def checks_with_alarm(alarm: DomainAlarm, labels: Sequence[str], values: dict[str, np.ndarray],
                      order: Iterable[int]) -> tuple[int, int]:
    """(checks, checks with the alarm on) over a stream; a check is every cell from ``min_cells`` on."""
    checks = alarms = 0
    for _ in stream(alarm, labels, values, order):
        if alarm.cells >= alarm.min_cells:
            checks += 1
            alarms += alarm.active
    return checks, alarms
