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

The runtime never builds and never imports the builder: a missing, stale or undeserialisable engine is an
:class:`~edge.trt.plan.EngineNeeded` error, which ``edge.models.open_classifier`` turns into a build when
``[tensorrt] build_if_missing`` is set. The engine file (``edge.trt.cache``) is the interface.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge.classifier import Predictions, check_batch, preprocess, scores_from_outputs
from edge.errors import ModelError
from edge.modelmeta import ModelMetadata, file_sha256
from edge.onnx_backend import model_id
from edge.trt import cache, plan
from edge.trt.plan import EngineNeeded, settings_from

log = logging.getLogger(__name__)

__all__ = ["EngineNeeded", "TensorRTClassifier", "check_bindings", "open_tensorrt", "settings_from"]


def open_tensorrt(path: Path, settings: dict[str, Any] | None = None) -> TensorRTClassifier:
    """The configured engine for ``path``; ``settings`` from :func:`edge.trt.plan.settings_from`."""
    settings = settings if settings is not None else settings_from(None)
    return TensorRTClassifier(Path(path), settings["engine_dir"], settings["precision"], settings["opt_batch"],
                              settings["max_batch"], settings["int8_onnx"])


def check_bindings(where: object, meta: ModelMetadata, inputs: Sequence[str], outputs: Sequence[str],
                   input_dtypes: dict[str, np.dtype]) -> list[str]:
    """The outputs to read, after checking that the engine's I/O is the model's: one float32 input named
    as in the metadata, and every output the metadata names. A ModelError names the difference."""
    if list(inputs) != [meta.input_name]:
        raise ModelError(f"{where}: engine inputs {list(inputs)}, the model's metadata expects [{meta.input_name!r}]")
    for name, dtype in input_dtypes.items():
        if np.dtype(dtype) != np.float32:
            raise ModelError(f"{where}: input {name} is {np.dtype(dtype)}, expected float32 I/O")
    wanted = [n for n in (meta.logits_output, meta.uncertainty_output, meta.anomaly_output) if n]
    missing = [n for n in wanted if n not in outputs]
    if missing:
        raise ModelError(f"{where}: engine lacks outputs {missing} named in the model metadata")
    return wanted


class TensorRTClassifier:
    """One engine, one execution context, one stream, buffers for ``max_batch`` crops."""

    def __init__(self, onnx_path: Path, engine_dir: Path | None, precision: str, opt_batch: int, max_batch: int,
                 int8_onnx: Path | None = None, device_index: int = 0) -> None:
        self.path = Path(onnx_path)
        self.metadata = plan.model_metadata(self.path)  # the ONNX file stays the model's identity
        self.sha256 = file_sha256(self.path)
        self.model_id = model_id(self.metadata, self.sha256)
        self.precision = precision
        self._closed = False
        trt = plan.import_tensorrt()
        cuda = plan.import_pycuda()
        engine_dir = Path(engine_dir) if engine_dir else cache.default_engine_dir()
        facts = plan.device_facts(device_index)
        wanted = plan.make_key(self.path, precision, opt_batch, max_batch, facts, int8_onnx)
        command = cache.rebuild_command(self.path, wanted.key, engine_dir, int8_onnx)
        state = cache.find(engine_dir, wanted.key, command)
        if not state.ok:
            raise EngineNeeded(state.message)
        self.engine_path = cache.engine_path(engine_dir, wanted.key)
        try:
            blob = cache.read_engine(self.engine_path, wanted.key)
        except ValueError as exc:
            raise EngineNeeded(str(exc)) from None
        self._cuda = cuda
        self._lock = threading.Lock()
        self._buffers: dict[str, tuple[np.ndarray, Any]] = {}
        self._ctx = cuda.Device(device_index).retain_primary_context()
        self._ctx.push()
        try:
            self._setup(trt, cuda, blob, command + " --force")
        except BaseException:
            self._free()
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
            # The file passed every cache check, so only a rebuild can replace it.
            raise EngineNeeded(f"TensorRT cannot deserialise {self.engine_path}; rebuild with: {command}", force=True)
        self._context = self._engine.create_execution_context()
        self._stream = cuda.Stream()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        self._wanted = check_bindings(self.engine_path, meta, inputs, outputs, {n: dtypes[n] for n in inputs})
        # The engine's own profile bounds the batch, whatever the config says now.
        self.max_batch = int(self._engine.get_tensor_profile_shape(meta.input_name, 0)[2][0])
        size = meta.input_size
        full = (self.max_batch, 3, size, size)
        self._context.set_input_shape(meta.input_name, full)
        for name in names:
            shape = full if name in inputs else tuple(self._context.get_tensor_shape(name))
            host = cuda.pagelocked_empty(shape, dtypes[name])
            device = cuda.mem_alloc(max(host.nbytes, 1))
            self._buffers[name] = (host, device)
            self._context.set_tensor_address(name, int(device))
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
            if self._closed:
                raise ModelError(f"TensorRT classifier for {self.engine_path} is closed")
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
        """Free device and pinned memory inside our context and release the primary context. Idempotent;
        the object is unusable afterwards. Called by the service after a model swap and at shutdown:
        left to the garbage collector, pycuda frees from whatever thread runs it and only warns."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._ctx.push()
            try:
                self._free()
            finally:
                self._ctx.pop()
                self._ctx.detach()

    def _free(self) -> None:
        for host, device in self._buffers.values():
            device.free()
            allocation = getattr(host, "base", None)  # pycuda's HostAllocation behind a pagelocked array
            if hasattr(allocation, "free"):
                allocation.free()
        self._buffers = {}
        for name in ("_context", "_engine", "_runtime", "_stream"):
            if hasattr(self, name):
                delattr(self, name)
