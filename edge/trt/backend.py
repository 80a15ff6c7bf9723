"""TensorRT runtime backend (Jetson GPU): same Classifier protocol and same answers as ONNX Runtime.

NOT RUN on the development machine (no GPU, TensorRT or pycuda there). Written against the TensorRT 10
name-based I/O API (``num_io_tensors``, ``get_tensor_name/mode/dtype``, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``) and pycuda; verified on a device by
``deploy/jetson-selftest.sh`` (contract suite + bench per precision).

Threading rule (pycuda): a CUDA context is current on one thread at a time. This class uses the
device's *primary* context, pushes it onto the calling thread's context stack at the start of every
call that touches the GPU and pops it in ``finally``; a lock serialises calls. So the classifier may be
built on the main thread and used from the pipeline's inference thread, but never concurrently.
Buffers (pinned host, device) are allocated once, for ``max_batch``; larger batches are split.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from edge.classifier import Predictions, check_batch, preprocess, scores_from_outputs
from edge.errors import ConfigError, ModelError
from edge.modelmeta import file_sha256
from edge.onnx_backend import model_id
from edge.trt import builder, cache

log = logging.getLogger(__name__)

# The [tensorrt] section's keys and defaults (the lead mirrors these in edge/defaults.toml).
DEFAULTS: dict[str, Any] = {
    "engine_dir": "",  # "" = $CYTOEDGE_STATE_DIR/engines, else ~/.cache/cytoedge/engines
    "precision": "fp16",
    "opt_batch": builder.DEFAULT_OPT_BATCH,
    "max_batch": builder.DEFAULT_MAX_BATCH,
    "build_if_missing": False,
    "timing_cache": "",  # "" = <engine_dir>/timing-<trt+gpu hash>.cache
    "workspace_mb": builder.DEFAULT_WORKSPACE_MB,
    "int8_onnx": "",  # Q/DQ model; "" = TRT 10 entropy calibrator (TRT >= 11: calibration/int8's Q/DQ model)
}
# Used only when no [tensorrt] section is passed (the contract suite and the self-test open the backend
# through open_classifier(None, "tensorrt")): lets the self-test pick the engine per run.
ENV_OVERRIDES = {"precision": "CYTOEDGE_TRT_PRECISION", "engine_dir": "CYTOEDGE_TRT_ENGINE_DIR",
                 "build_if_missing": "CYTOEDGE_TRT_BUILD", "int8_onnx": "CYTOEDGE_TRT_INT8_ONNX"}


def settings_from(section: dict[str, Any] | None) -> dict[str, Any]:
    """Typed settings from a validated [tensorrt] section (None = defaults + CYTOEDGE_TRT_* variables)."""
    raw = dict(DEFAULTS)
    if section is None:
        for key, variable in ENV_OVERRIDES.items():
            value = os.environ.get(variable)
            if value is not None:
                raw[key] = value.lower() in ("1", "true", "yes") if key == "build_if_missing" else value
    else:
        unknown = sorted(set(section) - set(DEFAULTS))
        if unknown:
            raise ConfigError(f"[tensorrt]: unknown keys {unknown}; known: {sorted(DEFAULTS)}")
        raw.update(section)
    if raw["precision"] not in cache.PRECISIONS:
        raise ConfigError(
            f"tensorrt.precision = {raw['precision']!r} is not allowed; expected one of {cache.PRECISIONS}"
        )
    opt_batch, max_batch = int(raw["opt_batch"]), int(raw["max_batch"])
    if not 1 <= opt_batch <= max_batch <= 4096:
        raise ConfigError(f"tensorrt: need 1 <= opt_batch ({opt_batch}) <= max_batch ({max_batch}) <= 4096")
    return {
        "engine_dir": Path(raw["engine_dir"]).expanduser() if raw["engine_dir"] else cache.default_engine_dir(),
        "precision": raw["precision"],
        "opt_batch": opt_batch,
        "max_batch": max_batch,
        "build_if_missing": bool(raw["build_if_missing"]),
        "timing_cache": Path(raw["timing_cache"]).expanduser() if raw["timing_cache"] else None,
        "workspace_mb": int(raw["workspace_mb"]),
        "int8_onnx": Path(raw["int8_onnx"]).expanduser() if raw["int8_onnx"] else None,
    }


def open_tensorrt(path: Path, section: dict[str, Any] | None = None) -> TensorRTClassifier:
    """What edge.models.open_classifier calls for backend = "tensorrt"."""
    settings = settings_from(section)
    return TensorRTClassifier(Path(path), **settings)


class TensorRTClassifier:
    """One engine, one execution context, one stream, buffers for ``max_batch`` crops."""

    def __init__(self, onnx_path: Path, engine_dir: Path | None = None, precision: str = "fp16",
                 opt_batch: int = builder.DEFAULT_OPT_BATCH, max_batch: int = builder.DEFAULT_MAX_BATCH,
                 build_if_missing: bool = False, int8_onnx: Path | None = None, timing_cache: Path | None = None,
                 workspace_mb: int = builder.DEFAULT_WORKSPACE_MB, device_index: int = 0) -> None:
        self.path = Path(onnx_path)
        self.metadata = builder.model_metadata(self.path)  # the ONNX file stays the model's identity
        self.sha256 = file_sha256(self.path)
        self.model_id = model_id(self.metadata, self.sha256)
        self.precision = precision
        trt = builder.import_tensorrt()
        cuda = builder.import_pycuda()
        engine_dir = Path(engine_dir) if engine_dir else cache.default_engine_dir()
        facts = builder.device_facts(device_index)
        plan = builder.make_key(self.path, precision, opt_batch, max_batch, facts, int8_onnx)
        command = cache.rebuild_command(self.path, plan.key, engine_dir, int8_onnx)
        state = cache.find(engine_dir, plan.key, command)
        if not state.ok:
            if not build_if_missing:
                raise ModelError(state.message)
            log.warning("%s; building it now (minutes)", state.message)
            builder.build_engine(self.path, engine_dir, precision, opt_batch, max_batch, workspace_mb, timing_cache,
                                 int8_onnx, say=log.info, device_index=device_index)
        self.engine_path = cache.engine_path(engine_dir, plan.key)
        try:
            blob = cache.read_engine(self.engine_path, plan.key)
        except ValueError as exc:
            raise ModelError(str(exc)) from None
        self._cuda = cuda
        self._lock = threading.Lock()
        self._ctx = cuda.Device(device_index).retain_primary_context()
        self._ctx.push()
        try:
            self._setup(trt, cuda, blob, command)
        except BaseException:
            self._ctx.pop()
            self._ctx.detach()  # release the primary context we retained; nothing else holds it
            raise
        self._ctx.pop()
        log.info("loaded TensorRT %s engine %s for %s", precision, self.engine_path, self.model_id)

    def _setup(self, trt: Any, cuda: Any, blob: bytes, command: str) -> None:
        meta = self.metadata
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(blob)
        if self._engine is None:
            raise ModelError(f"TensorRT cannot deserialise {self.engine_path}; rebuild with: {command}")
        self._context = self._engine.create_execution_context()
        self._stream = cuda.Stream()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if inputs != [meta.input_name]:
            raise ModelError(f"{self.engine_path}: engine inputs {inputs}, metadata expects [{meta.input_name!r}]")
        wanted = [n for n in (meta.logits_output, meta.uncertainty_output, meta.anomaly_output) if n]
        missing = [n for n in wanted if n not in outputs]
        if missing:
            raise ModelError(f"{self.engine_path}: engine lacks outputs {missing} named in the model metadata")
        self._wanted = wanted
        # The engine's own profile bounds the batch, whatever the config says now.
        self.max_batch = int(self._engine.get_tensor_profile_shape(meta.input_name, 0)[2][0])
        size = meta.input_size
        full = (self.max_batch, 3, size, size)
        self._context.set_input_shape(meta.input_name, full)
        self._buffers: dict[str, tuple[np.ndarray, Any]] = {}
        for name in names:
            shape = full if name in inputs else tuple(self._context.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            if name in inputs and dtype != np.float32:
                raise ModelError(f"{self.engine_path}: input {name} is {dtype}, expected float32 I/O")
            host = cuda.pagelocked_empty(shape, dtype)
            device = cuda.mem_alloc(max(host.nbytes, 1))
            self._context.set_tensor_address(name, int(device))
            self._buffers[name] = (host, device)
        self._outputs = outputs

    def classify(self, crops_bgr: np.ndarray) -> Predictions:
        check_batch(crops_bgr, self.metadata.input_size)
        if len(crops_bgr) == 0:
            return Predictions.empty(len(self.metadata.classes))
        parts = [self._run(preprocess(crops_bgr[i : i + self.max_batch], self.metadata))
                 for i in range(0, len(crops_bgr), self.max_batch)]
        merged = {name: np.concatenate([p[name] for p in parts]) for name in self._wanted}
        return scores_from_outputs(merged, self.metadata)

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """One chunk of at most max_batch through the engine, with the context current on this thread."""
        cuda = self._cuda
        n = len(batch)
        name = self.metadata.input_name
        with self._lock:
            self._ctx.push()
            try:
                host_in, dev_in = self._buffers[name]
                host_in[:n] = batch
                cuda.memcpy_htod_async(dev_in, host_in[:n], self._stream)
                self._context.set_input_shape(name, batch.shape)
                if not self._context.execute_async_v3(self._stream.handle):
                    raise ModelError(f"TensorRT execution failed for a batch of {n} ({self.engine_path})")
                for out in self._outputs:
                    host, device = self._buffers[out]
                    cuda.memcpy_dtoh_async(host[:n], device, self._stream)
                self._stream.synchronize()
                # Copies: the pinned buffers are reused by the next call.
                return {out: self._buffers[out][0][:n].astype(np.float32) for out in self._wanted}
            finally:
                self._ctx.pop()

    def close(self) -> None:
        """Free GPU memory in the right context; the object is unusable afterwards."""
        with self._lock:
            self._ctx.push()
            try:
                for _host, device in self._buffers.values():
                    device.free()
                self._buffers = {}
                del self._context, self._engine, self._runtime
            finally:
                self._ctx.pop()
                self._ctx.detach()
