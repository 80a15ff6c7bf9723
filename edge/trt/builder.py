"""Building TensorRT engines from cytoedge ONNX models (on the Jetson; written against TensorRT 10.3).

NOT RUN on the development machine (no GPU, no TensorRT there): this module is written against the
documented TensorRT 10 Python API and exercised for real only by ``deploy/jetson-selftest.sh``.
``tensorrt`` and ``pycuda`` are imported inside functions, so importing this module never needs them.
The builder and the runtime (``edge.trt.backend``) never import each other: both compute the engine key
with ``edge.trt.plan`` and meet at the engine file (``edge.trt.cache``).

Precision routes (see docs/tensorrt.md; the choice is ``edge.trt.plan.builder_flags`` / ``network_source``):

- fp32: plain network, TF32 cleared (TensorRT 10 enables it by default).
- fp16: TensorRT < 10.12 -> ``BuilderFlag.FP16``; from 10.12 (flags deprecated, gone in 11) -> a strongly
  typed network parsed from an FP16-converted ONNX (float32 I/O kept).
- int8: TensorRT < 10.12 -> ``IInt8EntropyCalibrator2`` over calibration/int8's calibration set (cache
  written next to the engine, named by the model's sha256), unless a Q/DQ ONNX is given; from 10.12 -> a
  strongly typed network from the Q/DQ ONNX made by ``python -m engines.quantise build``. Either input
  must have been made from the model being built (checked in ``edge.trt.plan``).
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge.classifier import preprocess
from edge.errors import ModelError
from edge.modelmeta import ModelMetadata, file_sha256
from edge.trt import cache, plan

log = logging.getLogger(__name__)


def fp16_onnx(onnx_path: Path, work_dir: Path) -> Path:
    """FP16 copy of the model for strongly typed builds (the FP16 flag is deprecated from TensorRT 10.12,
    gone in 11), float32 I/O kept so the runtime's preprocessing and outputs are unchanged. NVIDIA's
    documented route is ModelOpt AutoCast; onnxconverter-common's float16 converter is the fallback."""
    out = Path(work_dir) / f"fp16-{file_sha256(onnx_path)[:16]}.onnx"
    if out.is_file():
        return out
    try:
        from modelopt.onnx import autocast

        model = autocast.convert_to_mixed_precision(onnx_path=str(onnx_path), low_precision_type="fp16",
                                                    keep_io_types=True)
    except ImportError:
        try:
            import onnx
            from onnxconverter_common import float16
        except ImportError as exc:
            raise ModelError("FP16 on TensorRT >= 10.12 needs an FP16 ONNX: install nvidia-modelopt (AutoCast) or "
                             f"onnx + onnxconverter-common ({exc.name} missing)") from None
        model = float16.convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
    cache.atomic_write(out, [model.SerializeToString()])
    return out


def _progress_monitor(trt: Any, say: Any) -> Any:
    """TensorRT's IProgressMonitor (10.x) printing phase starts/ends; None where the API lacks it."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.started: dict[str, float] = {}
            self.lock = threading.Lock()  # TensorRT may call from several internal threads

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self.lock:
                self.started[phase_name] = time.monotonic()
            depth = "  " if parent_phase else ""
            say(f"{depth}{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # True = keep building

        def phase_finish(self, phase_name: str) -> None:
            with self.lock:
                took = time.monotonic() - self.started.pop(phase_name, time.monotonic())
            if took >= 1.0:
                say(f"  {phase_name} done in {took:.0f} s")

    return Monitor()


def _entropy_calibrator(trt: Any, cuda: Any, npz: Path, meta: ModelMetadata, cache_file: Path) -> Any:
    """IInt8EntropyCalibrator2 over the calibration set, preprocessed exactly as at runtime. The
    calibration cache it writes is tied to this model, calibration set, GPU and TensorRT version."""
    with np.load(npz) as data:
        crops = data["crops"]
    size = meta.input_size
    if crops.ndim != 4 or crops.shape[1:] != (size, size, 3) or crops.dtype != np.uint8:
        # The device buffer below is sized from the model: other crops must never be copied into it.
        raise ModelError(f"{npz}: crops are {crops.dtype} {tuple(crops.shape)}, the model wants uint8 "
                         f"(N, {size}, {size}, 3)")
    batch = plan.CALIBRATION_BATCH
    full = len(crops) // batch * batch  # fixed calibration shape
    if full == 0:
        raise ModelError(f"{npz}: fewer than {batch} crops, too few to calibrate")

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = [np.ascontiguousarray(preprocess(crops[i : i + batch], meta), np.float32)
                            for i in range(0, full, batch)]
            self.index = 0
            self.nbytes = batch * 3 * size * size * 4
            self.device = cuda.mem_alloc(self.nbytes)

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.index >= len(self.batches):
                return None
            host = self.batches[self.index]
            assert host.nbytes == self.nbytes  # never copy more than the buffer holds
            cuda.memcpy_htod(self.device, host)
            self.index += 1
            return [int(self.device)]

        def read_calibration_cache(self) -> bytes | None:
            return cache_file.read_bytes() if cache_file.is_file() else None

        def write_calibration_cache(self, data: Any) -> None:
            cache.atomic_write(cache_file, [bytes(data)])

    return EntropyCalibrator()


def _parse(trt: Any, builder: Any, logger: Any, onnx_file: Path, strongly: bool) -> tuple[Any, Any]:
    """Network from the ONNX parser (explicit batch is the only mode in TensorRT 10); parser errors
    become one ModelError listing every message."""
    flags = 0
    strongly_flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly and strongly_flag is not None:  # 10.x: opt-in; 11.x: always on (flag may be gone)
        flags |= 1 << int(strongly_flag)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ModelError(f"TensorRT cannot parse {onnx_file}: " + " | ".join(errors or ["no parser message"]))
    return network, parser


def build_engine(onnx_path: Path, engine_dir: Path, precision: str, opt_batch: int, max_batch: int,
                 workspace_mb: int, timing_cache: str | Path | None = None, int8_onnx: Path | None = None,
                 calibration_dir: Path | None = None, say: Any = print, device_index: int = 0,
                 force: bool = False) -> Path:
    """Build, serialise and store (atomically, through the cache) one engine; returns its path.

    The cache is checked again once the build lock is held: a second process that waited for the lock
    finds the engine the first one built and returns it. ``force`` builds anyway (the engine on disk
    looked valid but TensorRT could not deserialise it)."""
    trt = plan.import_tensorrt()
    cuda = plan.import_pycuda()
    facts = plan.device_facts(device_index)
    wanted = plan.make_key(Path(onnx_path), precision, opt_batch, max_batch, facts, int8_onnx, calibration_dir)
    engine_dir = Path(engine_dir)
    cache.clean_stale_temps(engine_dir)
    context = cuda.Device(device_index).retain_primary_context()
    context.push()  # the calibrator's device buffer and the builder's timing runs need a current context
    try:
        with cache.build_lock(engine_dir):
            state = cache.check(cache.engine_path(engine_dir, wanted.key), wanted.key)
            if state.ok and not force:
                say(f"engine up to date: {state.path} (--force rebuilds it)")
                return state.path
            return _build_locked(trt, cuda, wanted, facts, engine_dir, workspace_mb, timing_cache, say)
    finally:
        context.pop()
        context.detach()  # release the primary context retained above


def _build_locked(trt: Any, cuda: Any, wanted: plan.EngineKeyAndInputs, facts: plan.DeviceFacts,
                  engine_dir: Path, workspace_mb: int, timing_cache: str | Path | None, say: Any) -> Path:
    key, meta = wanted.key, wanted.meta
    strongly = plan.strongly_typed(facts.tensorrt_version)
    source = plan.network_source(key.precision, facts.tensorrt_version, key.int8_source)
    onnx_file = wanted.onnx_path
    if source == "qdq":
        assert wanted.int8_input is not None
        onnx_file = wanted.int8_input
    elif source == "fp16-onnx":
        onnx_file = fp16_onnx(wanted.onnx_path, engine_dir)
    say(f"building {key.precision} engine for {meta.name} on {facts.gpu_name} (sm {facts.compute_capability}, "
        f"{facts.sm_count} SMs), TensorRT {facts.tensorrt_version}{', strongly typed' if strongly else ''}; "
        f"batch 1/{key.opt_batch}/{key.max_batch}; from {onnx_file}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, onnx_file, strongly)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    size = meta.input_size
    profile = builder.create_optimization_profile()
    profile.set_shape(meta.input_name, (1, 3, size, size), (key.opt_batch, 3, size, size),
                      (key.max_batch, 3, size, size))
    config.add_optimization_profile(profile)
    to_set, to_clear = plan.builder_flags(key.precision, facts.tensorrt_version)
    for name in to_set:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in to_clear:
        config.clear_flag(getattr(trt.BuilderFlag, name))
    if key.int8_source == "calibrator":
        calib_profile = builder.create_optimization_profile()
        shape = (plan.CALIBRATION_BATCH, 3, size, size)
        calib_profile.set_shape(meta.input_name, shape, shape, shape)
        config.set_calibration_profile(calib_profile)
        assert wanted.int8_input is not None
        calib_cache = plan.calibration_cache_path(engine_dir, key, facts)
        config.int8_calibrator = _entropy_calibrator(trt, cuda, wanted.int8_input, meta, calib_cache)
    monitor = _progress_monitor(trt, say)
    if monitor is not None:
        config.progress_monitor = monitor
    timing_path = plan.timing_cache_path(engine_dir, facts, timing_cache)
    timing_blob = timing_path.read_bytes() if timing_path.is_file() else b""
    timing = config.create_timing_cache(timing_blob)
    if not config.set_timing_cache(timing, ignore_mismatch=False):
        say(f"timing cache {timing_path} does not fit this device/TensorRT; starting a fresh one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    started = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelError(f"TensorRT failed to build the {key.precision} engine (see the TensorRT log above)")
    blob = bytes(memoryview(serialized))
    took = time.monotonic() - started
    cache.atomic_write(timing_path, [bytes(memoryview(config.get_timing_cache().serialize()))])
    path = cache.store(engine_dir, key, blob, extra={
        "onnx_path": str(wanted.onnx_path), "parsed_onnx": str(onnx_file), "build_seconds": round(took, 1),
        "workspace_mb": workspace_mb, "strongly_typed": strongly, "timing_cache": str(timing_path),
        "flags_set": to_set, "flags_cleared": to_clear,
    })
    say(f"engine written: {path} ({len(blob):,} bytes, {took:.0f} s)")
    return path


# ------------------------------------------------------------------------------------ command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `cytoedge engine build`, kept here so the CLI and the rebuild hints cannot disagree."""
    parser.add_argument("model", nargs="?", help="ONNX model (default: [model] path, else the bundled default)")
    parser.add_argument("--precision", choices=cache.PRECISIONS, default=None, help="default: [tensorrt] precision")
    parser.add_argument("--opt-batch", type=int, default=None, help="batch the kernels are tuned for")
    parser.add_argument("--max-batch", type=int, default=None, help="largest batch the engine accepts")
    parser.add_argument("--engine-dir", default=None, help="where engines are cached")
    parser.add_argument("--workspace-mb", type=int, default=None, help="builder memory pool limit")
    parser.add_argument("--int8-onnx", default=None,
                        help="Q/DQ model for INT8, made from MODEL (default from TensorRT 10.12: calibration/int8's)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a valid engine is cached")
