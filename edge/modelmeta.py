"""The metadata every cytoedge model file carries, so the runtime needs no hard-coded constants.

Stored as one JSON string under the ONNX ``metadata_props`` key ``cytoedge``. The exporter in
``engines/`` writes it; every backend reads it through :func:`parse_metadata`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge.errors import ModelError

METADATA_KEY = "cytoedge"
FORMAT = "cytoedge-model/1"


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    version: str
    classes: list[str]
    input_size: int
    # Per-channel mean/std applied to pixel values scaled to [0, 1], in ``channel_order``.
    mean: list[float]
    std: list[float]
    # Physical scale of the model's input: a crop covers ``field_um`` micrometres at ``um_per_px``.
    um_per_px: float
    field_um: float
    channel_order: str = "RGB"
    input_name: str = "image"
    # Output tensor names; ``uncertainty``/``anomaly`` are None for models without those heads.
    logits_output: str = "logits"
    uncertainty_output: str | None = None
    anomaly_output: str | None = None
    # Divide logits by this before the softmax (fitted on validation data; 1.0 = uncalibrated).
    temperature: float = 1.0
    # > 0: the crop outside a centred disc of this radius (fraction of the side) is painted with the
    # plasma colour before the network sees it (edge.classifier.hide_context); 0 = the whole crop.
    context_radius: float = 0.0
    kind: str = "baseline"
    uncertainty_measure: str = "normalised entropy of the calibrated softmax"
    anomaly_measure: str = "1 - max calibrated probability"
    # Reference distribution of in-domain scores, e.g. for a drift alarm; optional.
    reference: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


_REQUIRED = ("name", "version", "classes", "input_size", "mean", "std", "um_per_px", "field_um")


def parse_metadata(text: str, source: str = "model") -> ModelMetadata:
    """Validate the JSON metadata; a broken model must be refused with a reason, not half-loaded."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{source}: cytoedge metadata is not valid JSON ({exc.msg})") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{source}: cytoedge metadata must be a JSON object")
    missing = [key for key in _REQUIRED if key not in raw]
    if missing:
        raise ModelError(f"{source}: cytoedge metadata lacks {', '.join(missing)}")
    if raw.get("format", FORMAT) != FORMAT:
        raise ModelError(f"{source}: metadata format {raw.get('format')!r} is not {FORMAT!r}")
    known = {f for f in ModelMetadata.__dataclass_fields__}
    meta = ModelMetadata(**{k: v for k, v in raw.items() if k in known})
    _check(meta, source)
    return meta


def _check(meta: ModelMetadata, source: str) -> None:
    problems = []
    if not (isinstance(meta.classes, list) and meta.classes and all(isinstance(c, str) for c in meta.classes)):
        problems.append("classes must be a non-empty list of names")
    if not (isinstance(meta.input_size, int) and 8 <= meta.input_size <= 1024):
        problems.append("input_size must be an integer in 8..1024")
    for name in ("mean", "std"):
        values = getattr(meta, name)
        if not (isinstance(values, list) and len(values) == 3 and all(isinstance(v, (int, float)) for v in values)):
            problems.append(f"{name} must be three numbers")
    if isinstance(meta.std, list) and any(isinstance(v, (int, float)) and v <= 0 for v in meta.std):
        problems.append("std must be positive")
    for name in ("um_per_px", "field_um", "temperature"):
        value = getattr(meta, name)
        if not (isinstance(value, (int, float)) and value > 0):
            problems.append(f"{name} must be a positive number")
    if meta.channel_order not in ("RGB", "BGR"):
        problems.append("channel_order must be RGB or BGR")
    radius = meta.context_radius
    if isinstance(radius, bool) or not (isinstance(radius, (int, float)) and 0 <= radius <= 0.75):
        problems.append("context_radius must be a number from 0 to 0.75")
    if problems:
        raise ModelError(f"{source}: bad cytoedge metadata: " + "; ".join(problems))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
