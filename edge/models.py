"""Finding and opening model files: a path from config or --model, else the store's active site model,
else the bundled default."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from edge.classifier import Classifier
from edge.errors import ConfigError, ModelError
from edge.modelstore import ModelStore, store_dir

log = logging.getLogger(__name__)


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
    """The one place a configured classifier is opened (the service, its reloads and the commands)."""
    path = resolve_model_path(configured, store)
    if backend == "onnxruntime":
        from edge.onnx_backend import OnnxRuntimeClassifier

        return OnnxRuntimeClassifier(path, threads)
    if backend == "tensorrt":
        return open_tensorrt_building(path, tensorrt)
    raise ConfigError(f"model.backend = {backend!r} is not allowed; expected 'onnxruntime' or 'tensorrt'")


def open_tensorrt_building(path: Path, section: dict[str, Any] | None) -> Classifier:
    """The TensorRT engine for ``path``; with ``build_if_missing``, an engine that is missing, stale or that
    TensorRT cannot deserialise is built (minutes) and opened. The runtime and the builder never import each
    other: this is where the two meet."""
    from edge.trt.backend import open_tensorrt
    from edge.trt.plan import EngineNeeded, settings_from

    settings = settings_from(section)
    try:
        return open_tensorrt(path, settings)
    except EngineNeeded as exc:
        if not settings["build_if_missing"]:
            raise
        log.warning("%s; building it now (minutes)", exc)
        from edge.trt.builder import build_engine

        build_engine(path, settings["engine_dir"], settings["precision"], settings["opt_batch"],
                     settings["max_batch"], settings["workspace_mb"], settings["timing_cache"], settings["int8_onnx"],
                     say=log.info, force=exc.force)
    return open_tensorrt(path, settings)


def close_classifier(classifier: object) -> None:
    """Release what a classifier holds (TensorRT: device and pinned memory, the CUDA context; ONNX Runtime:
    its session). Backends without ``close`` need nothing; errors are logged, never raised, because this
    runs on the way out of a swap or a shutdown."""
    close = getattr(classifier, "close", None)
    if close is None:
        return
    try:
        close()
    except Exception:
        log.exception("closing classifier %s failed", getattr(classifier, "model_id", classifier))


def open_configured_classifier(config: Mapping[str, Any]) -> Classifier:
    """The classifier a config's ``[model]`` (and ``[tensorrt]``) sections name: the one way the service,
    `annotate` and `classify` open it, so they can never run different models from the same config."""
    model = config["model"]
    return open_classifier(model["path"], model["backend"], model["threads"], config["tensorrt"], store=model["store"])
