"""Finding and opening model files: a path from config or --model, else the store's active site model,
else the bundled default."""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from edge.classifier import Classifier
from edge.errors import ConfigError, ModelError
from edge.modelstore import ModelStore, store_dir


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


def resolve_model_path(configured: str | Path | None, store: str | Path | None = None) -> Path:
    """``store``: the model store folder (``model.store``; empty = the default store). An active site model
    that has gone missing is an error, not a silent fallback: the lab must know its site model is gone."""
    if configured not in (None, ""):
        return Path(configured).expanduser()
    return ModelStore(store_dir(store)).active_model_path() or default_model_path()


def open_classifier(
    configured: str | Path | None,
    backend: str = "onnxruntime",
    threads: int = 2,
    tensorrt: dict[str, Any] | None = None,
    store: str | Path | None = None,
) -> Classifier:
    path = resolve_model_path(configured, store)
    if backend == "onnxruntime":
        from edge.onnx_backend import OnnxRuntimeClassifier

        return OnnxRuntimeClassifier(path, threads)
    if backend == "tensorrt":
        from edge.trt.backend import open_tensorrt

        return open_tensorrt(path, tensorrt)
    raise ConfigError(f"model.backend = {backend!r} is not allowed; expected 'onnxruntime' or 'tensorrt'")


def open_configured_classifier(config: Mapping[str, Any]) -> Classifier:
    """The classifier a config's ``[model]`` (and ``[tensorrt]``) sections name: the one way the service,
    `annotate` and `classify` open it, so they can never run different models from the same config."""
    model = config["model"]
    return open_classifier(model["path"], model["backend"], model["threads"], config["tensorrt"], store=model["store"])
