"""What an engine is built from: settings, device identity, precision route, INT8 inputs and the cache key.

The one module the TensorRT builder (``edge.trt.builder``) and runtime (``edge.trt.backend``) share: they
never import each other, and the engine file (``edge.trt.cache``) is the interface between them. Both
compute the same :class:`~edge.trt.cache.EngineKey` here, so the runtime refuses any engine that was not
built from the configured model, precision, profile, device and INT8 input.

Pure Python apart from :func:`import_tensorrt`, :func:`import_pycuda` and :func:`device_facts`, which
import tensorrt / pycuda inside the function: importing this module never needs them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from edge.errors import ModelError
from edge.modelmeta import ModelMetadata, file_sha256
from edge.trt import cache

INSTALL_HINT = (
    "install JetPack's python3-libnvinfer and pycuda; the venv must see system site-packages "
    "(python3 -m venv --system-site-packages)"
)
# INT8 inputs made by `python -m engines.quantise build` (the offline tool writes them, the builder reads them:
# named here so neither side imports the other).
CALIBRATION_NPZ = "calibration-set.npz"
CALIBRATION_MANIFEST = "calibration-set.json"
QDQ_NAME = "model.int8.qdq.onnx"
QDQ_SOURCE_KEY = "cytoedge.source_sha256"  # Q/DQ metadata_props: sha256 of the fp32 ONNX it was made from
INT8_BUILD_COMMAND = "python -m engines.quantise build"
CALIBRATION_BATCH = 32
# Implicit-quantisation calibrator and the FP16/INT8 builder flags are deprecated from TensorRT 10.12 and gone
# in 11: from this version on, precisions come from the network (strongly typed: FP16 ONNX, Q/DQ ONNX).
STRONGLY_TYPED_FROM = (10, 12)
# Used only when no [tensorrt] section is passed (the contract suite and the self-test open the backend
# through open_classifier(None, "tensorrt")): lets the self-test pick the engine per run.
ENV_OVERRIDES = {"precision": "CYTOEDGE_TRT_PRECISION", "engine_dir": "CYTOEDGE_TRT_ENGINE_DIR",
                 "build_if_missing": "CYTOEDGE_TRT_BUILD", "int8_onnx": "CYTOEDGE_TRT_INT8_ONNX"}


class BackendUnavailable(ModelError):
    """TensorRT or pycuda is not installed, or there is no usable GPU: the one reason the TensorRT
    backend may be skipped (the contract suite skips on this and on nothing else)."""


class EngineNeeded(ModelError):
    """No usable engine for the wanted key (missing, stale, corrupt, or TensorRT cannot deserialise it):
    what ``[tensorrt] build_if_missing`` turns into a build. ``force``: the file looked valid, so a build
    must replace it rather than trust the cache check."""

    def __init__(self, message: str, force: bool = False) -> None:
        super().__init__(message)
        self.force = force


# ------------------------------------------------------------------------------------------ settings
def settings_from(section: dict[str, Any] | None) -> dict[str, Any]:
    """Typed settings from a [tensorrt] section (None = defaults + CYTOEDGE_TRT_* variables).

    The defaults and the rules are edge/defaults.toml's and edge.config's: the one place they are written.
    """
    from edge import config as cfg

    if section is None:
        raw: dict[str, Any] = {}
        for key, variable in ENV_OVERRIDES.items():
            value = os.environ.get(variable)
            if value is not None:
                raw[key] = value.lower() in ("1", "true", "yes") if key == "build_if_missing" else value
        origin = "CYTOEDGE_TRT_* variables"
    else:
        raw, origin = dict(section), "[tensorrt]"
    values = cfg.validate({"tensorrt": raw}, origin)["tensorrt"]
    return {
        "engine_dir": Path(values["engine_dir"]).expanduser() if values["engine_dir"] else cache.default_engine_dir(),
        "precision": values["precision"],
        "opt_batch": int(values["opt_batch"]),
        "max_batch": int(values["max_batch"]),
        "build_if_missing": bool(values["build_if_missing"]),
        "timing_cache": Path(values["timing_cache"]).expanduser() if values["timing_cache"] else None,
        "workspace_mb": int(values["workspace_mb"]),
        "int8_onnx": Path(values["int8_onnx"]).expanduser() if values["int8_onnx"] else None,
    }


# ------------------------------------------------------------------------------ tensorrt, pycuda, device
def import_tensorrt() -> Any:
    """tensorrt, or a ModelError that says how to get it on a Jetson."""
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailable(f"TensorRT is not importable ({exc.name}): {INSTALL_HINT}") from None
    return tensorrt


def import_pycuda() -> Any:
    """pycuda.driver (initialised), or a ModelError; no context is created here."""
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise BackendUnavailable(f"pycuda is not importable ({exc.name}): {INSTALL_HINT}") from None
    try:
        cuda.init()
        if cuda.Device.count() < 1:
            raise BackendUnavailable("pycuda sees no CUDA device (is the GPU visible to this user / service?)")
    except ModelError:
        raise
    except Exception as exc:  # pycuda raises its own error types
        raise BackendUnavailable(f"CUDA cannot start: {exc}") from None
    return cuda


def trt_version(version: str) -> tuple[int, int]:
    """(major, minor) of a TensorRT version string such as '10.3.0.30'; (0, 0) when unreadable."""
    parts = [*version.split("."), "0", "0"][:2]
    try:
        return int(parts[0]), int(parts[1])
    except ValueError:
        return 0, 0


def strongly_typed(version: str) -> bool:
    """True from TensorRT 10.12: FP16/INT8 flags and the implicit calibrator are deprecated there (gone in 11),
    so precisions come from the network (FP16 ONNX, Q/DQ ONNX)."""
    return trt_version(version) >= STRONGLY_TYPED_FROM


@dataclass(frozen=True)
class DeviceFacts:
    """What makes one GPU's engines unusable on another. pycuda's name can be the same across Orin
    modules (Nano, NX, AGX), so the multiprocessor count is part of the identity too."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    sm_count: int = 0

    def digest(self) -> str:
        text = f"{self.tensorrt_version}|{self.gpu_name}|{self.compute_capability}|{self.sm_count}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def device_facts(device_index: int = 0) -> DeviceFacts:
    """TensorRT version, GPU name, compute capability and multiprocessor count: parts of every engine key."""
    trt = import_tensorrt()
    cuda = import_pycuda()
    device = cuda.Device(device_index)
    major, minor = device.compute_capability()
    sm_count = int(device.get_attribute(cuda.device_attribute.MULTIPROCESSOR_COUNT))
    return DeviceFacts(str(trt.__version__), str(device.name()), f"{major}.{minor}", sm_count)


def model_metadata(onnx_path: Path) -> ModelMetadata:
    """The cytoedge metadata of an ONNX file (read with ONNX Runtime, a hard dependency anyway)."""
    return _metadata_and_props(onnx_path)[0]


def _metadata_and_props(onnx_path: Path) -> tuple[ModelMetadata, dict[str, str]]:
    import onnxruntime as ort

    from edge.onnx_backend import read_onnx_metadata

    path = Path(onnx_path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's own exception types
        raise ModelError(f"cannot load model {path}: {str(exc).strip()[:300]}") from None
    props = dict(session.get_modelmeta().custom_metadata_map)
    return read_onnx_metadata(session, path), props


# ---------------------------------------------------------------------------------------- INT8 inputs
def int8_dir() -> Path:
    """calibration/int8, where `python -m engines.quantise build` writes (found as package data)."""
    return Path(str(resources.files("calibration").joinpath("int8")))


def check_qdq(qdq: Path, model_sha256: str) -> None:
    """Refuse a Q/DQ ONNX that was not made from the model being built: its metadata_props must name the
    fp32 model's sha256 (written by calibration.int8), or a different network would run without error."""
    _, props = _metadata_and_props(qdq)
    source = props.get(QDQ_SOURCE_KEY)
    remake = f"make one for this model with `{INT8_BUILD_COMMAND} --model MODEL.onnx --out DIR`"
    if not source:
        raise ModelError(f"Q/DQ model {qdq} does not say which model it was made from (no '{QDQ_SOURCE_KEY}' "
                         f"metadata); {remake}")
    if source != model_sha256:
        raise ModelError(f"Q/DQ model {qdq} was made from sha256 {source[:16]}…, not from the model being built "
                         f"(sha256 {model_sha256[:16]}…); {remake}")


def check_calibration_set(folder: Path, model_sha256: str, input_size: int) -> Path:
    """The calibration .npz, after its manifest says it was cut for this model at its input size: the
    calibrator's device buffer is sized from the model, so crops of another size must never reach it."""
    manifest_path, npz = Path(folder) / CALIBRATION_MANIFEST, Path(folder) / CALIBRATION_NPZ
    remake = f"make one with `{INT8_BUILD_COMMAND} --model MODEL.onnx --out DIR` or give a Q/DQ model (--int8-onnx)"
    if not npz.is_file() or not manifest_path.is_file():
        raise ModelError(f"INT8 calibration set not found in {folder}; {remake}")
    try:
        manifest = json.loads(manifest_path.read_text())
        shape = [int(v) for v in manifest["shape"]]
        source = str(manifest["model_sha256"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{manifest_path} is unreadable ({exc}); {remake}") from None
    if source != model_sha256:
        raise ModelError(f"INT8 calibration set {npz} was made for model sha256 {source[:16]}…, not for the model "
                         f"being built (sha256 {model_sha256[:16]}…); {remake}")
    if len(shape) != 4 or shape[1:] != [input_size, input_size, 3]:
        raise ModelError(f"INT8 calibration set {npz} holds crops of shape {shape[1:]}, the model wants "
                         f"[{input_size}, {input_size}, 3]; {remake}")
    return npz


def int8_plan(version: str, model_sha256: str, input_size: int, int8_onnx: Path | None = None,
              calibration_dir: Path | None = None) -> tuple[str, Path]:
    """("qdq", Q/DQ ONNX) or ("calibrator", calibration .npz) for this TensorRT version, checked against the
    model being built."""
    if int8_onnx:
        qdq = Path(int8_onnx)
        if not qdq.is_file():
            raise ModelError(f"Q/DQ model not found: {qdq} (make it with `{INT8_BUILD_COMMAND}`)")
        check_qdq(qdq, model_sha256)
        return "qdq", qdq
    if strongly_typed(version):
        qdq = Path(calibration_dir or int8_dir()) / QDQ_NAME
        if not qdq.is_file():
            raise ModelError(f"TensorRT {version} builds INT8 from a Q/DQ model only: give one (--int8-onnx / "
                             f"[tensorrt] int8_onnx), made with `{INT8_BUILD_COMMAND}`")
        check_qdq(qdq, model_sha256)
        return "qdq", qdq
    return "calibrator", check_calibration_set(Path(calibration_dir or int8_dir()), model_sha256, input_size)


# ---------------------------------------------------------------------------------------------- key
@dataclass(frozen=True)
class EngineKeyAndInputs:
    key: cache.EngineKey
    meta: ModelMetadata
    onnx_path: Path
    int8_input: Path | None  # the Q/DQ model or the calibration .npz


def make_key(onnx_path: Path, precision: str, opt_batch: int, max_batch: int, facts: DeviceFacts,
             int8_onnx: Path | None = None, calibration_dir: Path | None = None) -> EngineKeyAndInputs:
    """The cache key for this build, plus the files the build reads."""
    meta = model_metadata(onnx_path)
    onnx_sha = file_sha256(onnx_path)
    int8_source = int8_sha = None
    int8_input: Path | None = None
    if precision == "int8":
        int8_source, int8_input = int8_plan(facts.tensorrt_version, onnx_sha, meta.input_size, int8_onnx,
                                            calibration_dir)
        int8_sha = file_sha256(int8_input)
    key = cache.EngineKey(
        onnx_sha256=onnx_sha, tensorrt_version=facts.tensorrt_version, gpu_name=facts.gpu_name,
        compute_capability=facts.compute_capability, sm_count=facts.sm_count, precision=precision, min_batch=1,
        opt_batch=min(opt_batch, max_batch), max_batch=max_batch, int8_source=int8_source, int8_sha256=int8_sha,
        tf32=tf32_allowed(precision), model_name=meta.name,
    )
    return EngineKeyAndInputs(key, meta, Path(onnx_path), int8_input)


def tf32_allowed(precision: str) -> bool:
    """TensorRT 10 enables TF32 by default (10-bit mantissa in FP32 convolutions and matmuls): an "fp32"
    engine must clear it to be FP32, so fp32 keys say False; fp16/int8 keep TensorRT's default."""
    return precision != "fp32"


def calibration_cache_path(engine_dir: Path, key: cache.EngineKey, facts: DeviceFacts) -> Path:
    """TensorRT 10's INT8 calibration cache: scales for one model, one calibration set, one GPU and TensorRT.
    The model's sha256 is in the name, so a model retrained under the same name never reuses old scales."""
    model = key.onnx_sha256[:16]
    data = (key.int8_sha256 or "")[:12]
    return Path(engine_dir) / f"{cache.safe_name(key.model_name)}-{model}-int8-{facts.digest()}-{data}.calib"


def timing_cache_path(engine_dir: Path, facts: DeviceFacts, configured: str | Path | None = None) -> Path:
    """Timing caches are only valid for one TensorRT version and GPU, so the name carries both."""
    if configured:
        return Path(configured)
    return Path(engine_dir) / f"timing-{facts.digest()}.cache"


def builder_flags(precision: str, version: str) -> tuple[list[str], list[str]]:
    """(BuilderFlag names to set, names to clear) for a build. Strongly typed builds take precisions from
    the network, so they set none; fp32 clears TF32 on every route (TensorRT 10 turns it on by default)."""
    clear = [] if tf32_allowed(precision) else ["TF32"]
    if strongly_typed(version) or precision == "fp32":
        return [], clear
    if precision == "fp16":
        return ["FP16"], clear
    return ["FP16", "INT8"], clear  # int8: layers without INT8 kernels fall back to fp16


def network_source(precision: str, version: str, int8_source: str | None) -> str:
    """Which ONNX the parser reads: the model, its FP16 copy (strongly typed fp16) or the Q/DQ model."""
    if precision == "int8" and int8_source == "qdq":
        return "qdq"
    if precision == "fp16" and strongly_typed(version):
        return "fp16-onnx"
    return "model"

