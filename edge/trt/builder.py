"""Building TensorRT engines from cytoedge ONNX models (on the Jetson; written against TensorRT 10.3).

NOT RUN on the development machine (no GPU, no TensorRT there): this module is written against the
documented TensorRT 10 Python API and exercised for real only by ``deploy/jetson-selftest.sh``.
``tensorrt`` and ``pycuda`` are imported inside functions, so importing this module never needs them.

Precision routes (see docs/tensorrt.md):

- fp32: plain network.
- fp16: TensorRT 10 -> ``BuilderFlag.FP16``; TensorRT >= 11 (no precision flags) -> a strongly typed
  network parsed from an FP16-converted ONNX (float32 I/O kept).
- int8: TensorRT 10 -> ``IInt8EntropyCalibrator2`` over calibration/int8's calibration set (cache
  written next to the engine), unless a Q/DQ ONNX is given; TensorRT >= 11 (calibrator removed) ->
  a strongly typed network from the Q/DQ ONNX made by ``python -m calibration.int8 build``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import ModelError
from edge.modelmeta import ModelMetadata, file_sha256
from edge.trt import cache

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install JetPack's python3-libnvinfer and pycuda; the venv must see system site-packages "
    "(python3 -m venv --system-site-packages)"
)
DEFAULT_OPT_BATCH = 16
DEFAULT_MAX_BATCH = 64
DEFAULT_WORKSPACE_MB = 1024
CALIBRATION_BATCH = 32


def import_tensorrt() -> Any:
    """tensorrt, or a ModelError that says how to get it on a Jetson."""
    try:
        import tensorrt
    except ImportError as exc:
        raise ModelError(f"TensorRT is not importable ({exc.name}): {INSTALL_HINT}") from None
    return tensorrt


def import_pycuda() -> Any:
    """pycuda.driver (initialised), or a ModelError; no context is created here."""
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise ModelError(f"pycuda is not importable ({exc.name}): {INSTALL_HINT}") from None
    try:
        cuda.init()
        if cuda.Device.count() < 1:
            raise ModelError("pycuda sees no CUDA device (is the GPU visible to this user / service?)")
    except ModelError:
        raise
    except Exception as exc:  # pycuda raises its own error types
        raise ModelError(f"CUDA cannot start: {exc}") from None
    return cuda


def trt_major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 0


def strongly_typed(version: str) -> bool:
    """TensorRT >= 11 has no FP16/INT8 builder flags and no implicit calibrator: types come from the network."""
    return trt_major(version) >= 11


@dataclass(frozen=True)
class DeviceFacts:
    tensorrt_version: str
    gpu_name: str
    compute_capability: str

    def digest(self) -> str:
        text = f"{self.tensorrt_version}|{self.gpu_name}|{self.compute_capability}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def device_facts(device_index: int = 0) -> DeviceFacts:
    """TensorRT version and the GPU's name and compute capability: three parts of every engine key."""
    trt = import_tensorrt()
    cuda = import_pycuda()
    device = cuda.Device(device_index)
    major, minor = device.compute_capability()
    return DeviceFacts(str(trt.__version__), str(device.name()), f"{major}.{minor}")


def model_metadata(onnx_path: Path) -> ModelMetadata:
    """The cytoedge metadata of an ONNX file (read with ONNX Runtime, a hard dependency anyway)."""
    import onnxruntime as ort

    from edge.onnx_backend import read_onnx_metadata

    path = Path(onnx_path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"cannot read model {path}: {str(exc).strip()[:300]}") from None
    return read_onnx_metadata(session, path)


def int8_plan(version: str, int8_onnx: Path | None, calibration_dir: Path | None) -> tuple[str, Path]:
    """("qdq", Q/DQ model) or ("calibrator", calibration set .npz) for an INT8 build on this TensorRT."""
    from calibration import int8 as int8_tools

    if int8_onnx:
        if not Path(int8_onnx).is_file():
            raise ModelError(f"Q/DQ model not found: {int8_onnx} (make it with `{int8_tools.BUILD_COMMAND}`)")
        return "qdq", Path(int8_onnx)
    if strongly_typed(version):
        default = int8_tools.OUT_DIR / int8_tools.QDQ_NAME
        if default.is_file():
            return "qdq", default
        raise ModelError(f"TensorRT {version} has no implicit INT8 calibrator: give a Q/DQ model "
                         f"(--int8-onnx / [tensorrt] int8_onnx), made with `{int8_tools.BUILD_COMMAND}`")
    folder = Path(calibration_dir) if calibration_dir else int8_tools.OUT_DIR
    npz = folder / int8_tools.CALIBRATION_NPZ
    if not npz.is_file():
        raise ModelError(f"INT8 calibration set not found at {npz}; make it with `{int8_tools.BUILD_COMMAND}`")
    return "calibrator", npz


def make_key(onnx_path: Path, precision: str, opt_batch: int, max_batch: int, facts: DeviceFacts,
             int8_onnx: Path | None = None, calibration_dir: Path | None = None) -> EngineKeyAndInputs:
    """The cache key for this build, plus the files the build reads."""
    meta = model_metadata(onnx_path)
    int8_source = int8_sha = None
    int8_input: Path | None = None
    if precision == "int8":
        int8_source, int8_input = int8_plan(facts.tensorrt_version, int8_onnx, calibration_dir)
        int8_sha = file_sha256(int8_input)
    key = cache.EngineKey(
        onnx_sha256=file_sha256(onnx_path), tensorrt_version=facts.tensorrt_version, gpu_name=facts.gpu_name,
        compute_capability=facts.compute_capability, precision=precision, min_batch=1,
        opt_batch=min(opt_batch, max_batch), max_batch=max_batch, int8_source=int8_source, int8_sha256=int8_sha,
        model_name=meta.name,
    )
    return EngineKeyAndInputs(key, meta, Path(onnx_path), int8_input)


@dataclass(frozen=True)
class EngineKeyAndInputs:
    key: cache.EngineKey
    meta: ModelMetadata
    onnx_path: Path
    int8_input: Path | None  # the Q/DQ model or the calibration .npz


def timing_cache_path(engine_dir: Path, facts: DeviceFacts, configured: str | Path | None = None) -> Path:
    """Timing caches are only valid for one TensorRT version and GPU, so the name carries both."""
    if configured:
        return Path(configured)
    return Path(engine_dir) / f"timing-{facts.digest()}.cache"


def fp16_onnx(onnx_path: Path, work_dir: Path) -> Path:
    """FP16 copy of the model for strongly typed builds (TensorRT >= 11 has no FP16 flag), float32 I/O
    kept so the runtime's preprocessing and outputs are unchanged. NVIDIA's documented route is ModelOpt
    AutoCast; onnxconverter-common's float16 converter is the fallback."""
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
            raise ModelError("FP16 on TensorRT >= 11 needs an FP16 ONNX: install nvidia-modelopt (AutoCast) or "
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
    calibration cache it writes is tied to this GPU and TensorRT version (named accordingly)."""
    from calibration.int8 import batches

    with np.load(npz) as data:
        crops = data["crops"]

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            full = len(crops) // CALIBRATION_BATCH * CALIBRATION_BATCH  # fixed calibration shape
            self.batches = list(batches(crops[:full], meta, CALIBRATION_BATCH))
            self.index = 0
            shape = (CALIBRATION_BATCH, 3, meta.input_size, meta.input_size)
            self.device = cuda.mem_alloc(int(np.prod(shape)) * 4)

        def get_batch_size(self) -> int:
            return CALIBRATION_BATCH

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.index >= len(self.batches):
                return None
            cuda.memcpy_htod(self.device, np.ascontiguousarray(self.batches[self.index], np.float32))
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


def build_engine(onnx_path: Path, engine_dir: Path, precision: str = "fp16", opt_batch: int = DEFAULT_OPT_BATCH,
                 max_batch: int = DEFAULT_MAX_BATCH, workspace_mb: int = DEFAULT_WORKSPACE_MB,
                 timing_cache: str | Path | None = None, int8_onnx: Path | None = None,
                 calibration_dir: Path | None = None, say: Any = print, device_index: int = 0) -> Path:
    """Build, serialise and store (atomically, through the cache) one engine; returns its path."""
    trt = import_tensorrt()
    cuda = import_pycuda()
    facts = device_facts(device_index)
    plan = make_key(Path(onnx_path), precision, opt_batch, max_batch, facts, int8_onnx, calibration_dir)
    key, meta = plan.key, plan.meta
    engine_dir = Path(engine_dir)
    cache.clean_stale_temps(engine_dir)
    context = cuda.Device(device_index).retain_primary_context()
    context.push()  # the calibrator's device buffer and the builder's timing runs need a current context
    try:
        with cache.build_lock(engine_dir):
            return _build_locked(trt, cuda, plan, facts, engine_dir, workspace_mb, timing_cache, say)
    finally:
        context.pop()
        log.debug("built %s for %s", key.precision, meta.name)


def _build_locked(trt: Any, cuda: Any, plan: EngineKeyAndInputs, facts: DeviceFacts, engine_dir: Path,
                  workspace_mb: int, timing_cache: str | Path | None, say: Any) -> Path:
    key, meta = plan.key, plan.meta
    strongly = strongly_typed(facts.tensorrt_version)
    onnx_file = plan.onnx_path
    if key.precision == "int8" and key.int8_source == "qdq":
        assert plan.int8_input is not None
        onnx_file = plan.int8_input
    elif key.precision == "fp16" and strongly:
        onnx_file = fp16_onnx(plan.onnx_path, engine_dir)
    say(f"building {key.precision} engine for {meta.name} on {facts.gpu_name} (sm {facts.compute_capability}), "
        f"TensorRT {facts.tensorrt_version}{', strongly typed' if strongly else ''}; batch 1/{key.opt_batch}/"
        f"{key.max_batch}; from {onnx_file}")
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
    if not strongly:
        if key.precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)  # int8: layers without INT8 kernels fall back to fp16
        if key.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
            if key.int8_source == "calibrator":
                calib_profile = builder.create_optimization_profile()
                shape = (CALIBRATION_BATCH, 3, size, size)
                calib_profile.set_shape(meta.input_name, shape, shape, shape)
                config.set_calibration_profile(calib_profile)
                set_hash = (key.int8_sha256 or "")[:12]
                calib_cache = engine_dir / f"{cache.safe_name(meta.name)}-int8-{facts.digest()}-{set_hash}.calib"
                assert plan.int8_input is not None
                config.int8_calibrator = _entropy_calibrator(trt, cuda, plan.int8_input, meta, calib_cache)
    monitor = _progress_monitor(trt, say)
    if monitor is not None:
        config.progress_monitor = monitor
    timing_path = timing_cache_path(engine_dir, facts, timing_cache)
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
        "onnx_path": str(plan.onnx_path), "parsed_onnx": str(onnx_file), "build_seconds": round(took, 1),
        "workspace_mb": workspace_mb, "strongly_typed": strongly, "timing_cache": str(timing_path),
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
    parser.add_argument("--int8-onnx", default=None, help="Q/DQ model for INT8 (required on TensorRT >= 11)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a valid engine is cached")


def main(args: argparse.Namespace) -> int:
    """`cytoedge engine build`: flags override the config's [tensorrt] section."""
    from edge import config as cfg
    from edge.models import resolve_model_path
    from edge.trt.backend import settings_from

    config = cfg.load(getattr(args, "config", None))
    settings = settings_from(config.get("tensorrt"))
    model = resolve_model_path(args.model or config["model"]["path"], config["model"]["store"])
    precision = args.precision or settings["precision"]
    engine_dir = Path(args.engine_dir) if args.engine_dir else settings["engine_dir"]
    opt_batch = args.opt_batch or settings["opt_batch"]
    max_batch = args.max_batch or settings["max_batch"]
    int8_onnx = Path(args.int8_onnx) if args.int8_onnx else settings["int8_onnx"]
    if not args.force:
        facts = device_facts()
        plan = make_key(model, precision, opt_batch, max_batch, facts, int8_onnx)
        state = cache.check(cache.engine_path(engine_dir, plan.key), plan.key)
        if state.ok:
            print(f"engine up to date: {state.path} (use --force to rebuild)")
            return 0
    build_engine(model, engine_dir, precision, opt_batch, max_batch, args.workspace_mb or settings["workspace_mb"],
                 settings["timing_cache"], int8_onnx, say=lambda m: print(m, flush=True))
    return 0


if __name__ == "__main__":  # python -m edge.trt.builder MODEL --precision fp16 (before the CLI is wired)
    _parser = argparse.ArgumentParser(prog="python -m edge.trt.builder")
    _parser.add_argument("--config", default=None)
    add_arguments(_parser)
    try:
        sys.exit(main(_parser.parse_args()))
    except ModelError as _exc:
        print(f"error: {_exc}", file=sys.stderr)
        sys.exit(_exc.exit_code)
