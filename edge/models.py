"""Finding and opening model files: the bundled default, or a path from config or --model."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from edge.classifier import Classifier
from edge.errors import ConfigError, ModelError


def bundled_models_dir() -> Path:
    return Path(str(resources.files("engines").joinpath("models")))


def default_model_path() -> Path:
    """The model named in engines/models/DEFAULT, so switching the shipped model is a one-line change."""
    models = bundled_models_dir()
    pointer = models / "DEFAULT"
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except OSError:
        raise ModelError(f"no default model: {pointer} is missing; pass --model PATH") from None
    return models / name / "model.onnx"


def resolve_model_path(configured: str | Path | None) -> Path:
    if configured in (None, ""):
        return default_model_path()
    return Path(configured).expanduser()


def open_classifier(
    configured: str | Path | None,
    backend: str = "onnxruntime",
    threads: int = 2,
    tensorrt: dict[str, Any] | None = None,
) -> Classifier:
    path = resolve_model_path(configured)
    if backend == "onnxruntime":
        from edge.onnx_backend import OnnxRuntimeClassifier

        return OnnxRuntimeClassifier(path, threads)
    if backend == "tensorrt":
        from edge.trt.backend import open_tensorrt

        return open_tensorrt(path, tensorrt)
    raise ConfigError(f"model.backend = {backend!r} is not allowed; expected 'onnxruntime' or 'tensorrt'")
