"""ONNX Runtime backend: the CPU default on every device, and the reference the others must match."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edge.classifier import Predictions, check_batch, preprocess, scores_from_outputs
from edge.errors import ModelError
from edge.modelmeta import METADATA_KEY, ModelMetadata, file_sha256, parse_metadata

log = logging.getLogger(__name__)


def read_onnx_metadata(session: object, path: Path) -> ModelMetadata:
    custom = session.get_modelmeta().custom_metadata_map  # type: ignore[attr-defined]
    if METADATA_KEY not in custom:
        raise ModelError(f"{path}: not a cytoedge model (no '{METADATA_KEY}' metadata; export it with engines/)")
    return parse_metadata(custom[METADATA_KEY], str(path))


def model_id(meta: ModelMetadata, sha256: str) -> str:
    return f"{meta.name}-{meta.version}@{sha256[:12]}"


def open_session(path: Path, threads: int, spin: bool = False, what: str = "model") -> object:
    """A CPU ONNX Runtime session with bounded threads; ``what`` names the file in errors ("model",
    "detector"). A missing or unreadable file is a ModelError with the reason, never ORT's traceback."""
    import onnxruntime as ort

    if not path.is_file():
        raise ModelError(f"{what} file not found: {path}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Idle ONNX Runtime threads spin for a while waiting for work by default; on a 2-core device
    # that steals the core the capture and finder threads need between model calls.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0" if not spin else "1")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for unreadable models
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load {what} {path}: {first_line[:300]}") from None


class OnnxRuntimeClassifier:
    """Runs a whole frame's crops as one batch; thread count is bounded so capture keeps a core."""

    def __init__(self, path: Path, threads: int = 2, spin: bool = False) -> None:
        self.path = Path(path)
        self._session = open_session(self.path, threads, spin)
        self.metadata = read_onnx_metadata(self._session, self.path)
        self.sha256 = file_sha256(self.path)
        self.model_id = model_id(self.metadata, self.sha256)
        names = {o.name for o in self._session.get_outputs()}
        wanted = [
            n
            for n in (self.metadata.logits_output, self.metadata.uncertainty_output, self.metadata.anomaly_output)
            if n
        ]
        missing = [n for n in wanted if n not in names]
        if missing:
            raise ModelError(f"{self.path}: metadata names outputs {missing} that the network does not have")
        self._outputs = wanted
        log.info("loaded model %s (%s)", self.model_id, self.path)

    def classify(self, crops_bgr: np.ndarray) -> Predictions:
        size = self.metadata.input_size
        check_batch(crops_bgr, size)
        if len(crops_bgr) == 0:
            return Predictions.empty(len(self.metadata.classes))
        session = self._session
        if session is None:
            raise ModelError(f"classifier for {self.path} is closed")
        feed = {self.metadata.input_name: preprocess(crops_bgr, self.metadata)}
        values = session.run(self._outputs, feed)
        return scores_from_outputs(dict(zip(self._outputs, values, strict=True)), self.metadata)

    def close(self) -> None:
        """Drop the session (its memory and thread pool) now rather than at garbage collection; the service
        calls this on the classifier a reload replaced and at shutdown, as for every backend."""
        self._session = None
