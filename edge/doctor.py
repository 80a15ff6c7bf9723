"""`cytoedge doctor`: what this device has, and whether the configured backend can run on it.

Written for the lab engineer setting up a new device: one line per fact, a ``!!`` on every line that
stops the configured service from running, and exit code 1 when the configured backend cannot run
(0 otherwise), so scripts and the self-test can gate on it. Nothing here needs a GPU to *run*; each
GPU fact reports "not available" with the reason when the stack is missing.
"""

from __future__ import annotations

import argparse
import glob
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.errors import CytoedgeError


@dataclass(frozen=True)
class Line:
    """One fact. ``ok`` False with ``blocking`` True means the configured service cannot run."""

    topic: str
    text: str
    ok: bool = True
    blocking: bool = False


def _version(module: str) -> tuple[str | None, str]:
    """(version, "") if importable, else (None, why not)."""
    try:
        imported = __import__(module, fromlist=["__version__"])
    except ImportError as exc:
        return None, f"not installed ({exc.name})"
    except Exception as exc:  # a broken install (e.g. libnvinfer missing) raises OSError and friends
        return None, f"import failed: {type(exc).__name__}: {str(exc)[:200]}"
    return str(getattr(imported, "__version__", getattr(imported, "VERSION", "unknown"))), ""


def _build_flags(info: str, names: tuple[str, ...]) -> dict[str, str]:
    """'GStreamer: YES (1.20.3)' style lines from cv2.getBuildInformation()."""
    found = {}
    for raw in info.splitlines():
        line = raw.strip()
        for name in names:
            if line.lower().startswith(name.lower() + ":"):
                found[name] = line.split(":", 1)[1].strip()
    return found


def _run(command: list[str]) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").replace("\x00", "").strip()
    except OSError:
        return None


def software() -> list[Line]:
    import cv2
    import numpy as np

    lines = [Line("python", f"{platform.python_version()} on {platform.machine()} ({platform.platform()})"),
             Line("numpy", np.__version__)]
    flags = _build_flags(cv2.getBuildInformation(), ("GStreamer", "v4l/v4l2", "FFMPEG"))
    lines.append(Line("opencv", f"{cv2.__version__}; GStreamer: {flags.get('GStreamer', 'unknown')}; "
                                f"V4L2: {flags.get('v4l/v4l2', 'unknown')}; FFmpeg: {flags.get('FFMPEG', 'unknown')}"))
    ort_version, why = _version("onnxruntime")
    if ort_version:
        import onnxruntime as ort

        lines.append(Line("onnxruntime", f"{ort_version}; providers: {', '.join(ort.get_available_providers())}"))
    else:
        lines.append(Line("onnxruntime", why, ok=False))
    for module, label in (("tensorrt", "tensorrt"), ("pycuda", "pycuda")):
        version, why = _version(module)
        lines.append(Line(label, version or why, ok=version is not None))
    return lines


def gpu() -> list[Line]:
    """Driver and GPU via pycuda when present, else nvidia-smi, else the Jetson's device tree."""
    lines = []
    try:
        import pycuda.driver as cuda

        cuda.init()
        driver = cuda.get_driver_version()
        lines.append(Line("cuda driver", f"{driver // 1000}.{driver % 1000 // 10} (pycuda)"))
        for index in range(cuda.Device.count()):
            device = cuda.Device(index)
            major, minor = device.compute_capability()
            lines.append(Line("gpu", f"{index}: {device.name()}, compute capability {major}.{minor}, "
                                     f"{device.total_memory() // (1 << 20)} MiB"))
        if cuda.Device.count() == 0:
            lines.append(Line("gpu", "pycuda sees no CUDA device", ok=False))
        return lines
    except ImportError:
        pass
    except Exception as exc:  # pycuda present but CUDA cannot start
        lines.append(Line("cuda driver", f"CUDA cannot start: {str(exc)[:200]}", ok=False))
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"])
    if smi:
        lines.extend(Line("gpu", f"{row} (nvidia-smi)") for row in smi.splitlines())
    model = _read("/proc/device-tree/model")
    if model:
        lines.append(Line("board", model))
    tegra = _read("/etc/nv_tegra_release")
    if tegra:
        lines.append(Line("jetpack", tegra.splitlines()[0]))
    driver = _read("/proc/driver/nvidia/version")
    if driver:
        lines.append(Line("cuda driver", driver.splitlines()[0]))
    if not lines:
        lines.append(Line("gpu", "none found (no pycuda, no nvidia-smi, no Jetson device tree)", ok=False))
    return lines


def cameras() -> list[Line]:
    nodes = sorted(glob.glob("/dev/video*"))
    return [Line("cameras", ", ".join(nodes) if nodes else "no /dev/video* devices", ok=bool(nodes))]


def model_and_backend(config: dict[str, Any]) -> list[Line]:
    """The configured model and whether the configured backend can run it, with the reason if not."""
    from edge.models import resolve_model_path

    lines = []
    model = config.get("model", {})
    backend = model.get("backend", "onnxruntime")
    try:
        path = resolve_model_path(model.get("path"), model.get("store"))
    except CytoedgeError as exc:
        return [Line("model", str(exc), ok=False, blocking=True)]
    try:
        from edge.onnx_backend import OnnxRuntimeClassifier

        reference = OnnxRuntimeClassifier(path, threads=1)
        lines.append(Line("model", f"{reference.model_id} ({path}); loads in ONNX Runtime"))
    except CytoedgeError as exc:
        return [Line("model", str(exc), ok=False, blocking=True)]
    if backend == "onnxruntime":
        import numpy as np

        size = reference.metadata.input_size
        reference.classify(np.zeros((1, size, size, 3), np.uint8))
        lines.append(Line("backend", "onnxruntime: ok (one test crop classified)"))
        return lines
    if backend != "tensorrt":
        return [*lines, Line("backend", f"unknown backend {backend!r}", ok=False, blocking=True)]
    return lines + _tensorrt(path, config.get("tensorrt"))


def _tensorrt(path: Path, section: dict[str, Any] | None) -> list[Line]:
    from edge.trt import cache, plan
    from edge.trt.plan import settings_from

    try:
        settings = settings_from(section)
    except CytoedgeError as exc:
        return [Line("backend", f"tensorrt: {exc}", ok=False, blocking=True)]
    engine_dir = settings["engine_dir"]
    lines = [Line("engines", f"{engine_dir}: " + (", ".join(_describe_engines(engine_dir)) or "none cached"))]
    try:
        facts = plan.device_facts()
        wanted = plan.make_key(path, settings["precision"], settings["opt_batch"], settings["max_batch"], facts,
                               settings["int8_onnx"])
    except CytoedgeError as exc:
        return [*lines, Line("backend", f"tensorrt cannot run here: {exc}", ok=False, blocking=True)]
    command = cache.rebuild_command(path, wanted.key, engine_dir, settings["int8_onnx"])
    state = cache.find(engine_dir, wanted.key, command)
    if state.ok:
        return [*lines, Line("backend", f"tensorrt {settings['precision']}: engine ok ({state.path})")]
    if settings["build_if_missing"] and state.status in ("missing", "mismatch", "corrupt"):
        return [*lines, Line("backend", f"tensorrt: {state.message}; build_if_missing = true, so the service "
                                        "builds it at start (minutes)", ok=False)]
    return [*lines, Line("backend", f"tensorrt: {state.message}", ok=False, blocking=True)]


def _describe_engines(engine_dir: Path) -> list[str]:
    from edge.trt import cache

    described = []
    for engine in sorted(Path(engine_dir).glob("*.engine")):
        try:
            header, _ = cache.read_header(engine)
            key = header["key"]
            described.append(f"{engine.name} (TensorRT {key['tensorrt_version']}, {key['gpu_name']}, "
                             f"{key['precision']}, batch {key['min_batch']}/{key['opt_batch']}/{key['max_batch']}, "
                             f"{key.get('sm_count', '?')} SMs)")
        except (OSError, ValueError) as exc:
            described.append(f"{engine.name} (unreadable: {exc})")
    return described


def collect(config: dict[str, Any]) -> list[Line]:
    sections: list[Callable[[], list[Line]]] = [software, gpu, cameras, lambda: model_and_backend(config)]
    lines: list[Line] = []
    for section in sections:
        lines.extend(section())
    return lines


def report(lines: list[Line], out: Callable[[str], None] = print) -> None:
    """Print one line per fact; '!!' marks a blocker, '--' something absent that the config does not need."""
    width = max((len(line.topic) for line in lines), default=8)
    for line in lines:
        mark = "ok" if line.ok else "!!" if line.blocking else "--"
        out(f"{mark} {line.topic:<{width}}  {line.text}")
    blockers = [line for line in lines if line.blocking]
    out("result: " + ("the configured backend cannot run: " + blockers[0].text if blockers else "ready"))


def run_doctor(config: dict[str, Any], out: Callable[[str], None] = print) -> int:
    """Collect, print, and return 1 when the configured backend cannot run, else 0."""
    lines = collect(config)
    report(lines, out)
    return 1 if any(line.blocking for line in lines) else 0


def main(args: argparse.Namespace) -> int:
    """CLI handler for `cytoedge doctor [--config FILE]`."""
    from edge import config as cfg

    return run_doctor(cfg.load(getattr(args, "config", None)))


if __name__ == "__main__":  # python -m edge.doctor [--config FILE], until the CLI is wired
    _parser = argparse.ArgumentParser(prog="python -m edge.doctor")
    _parser.add_argument("--config", default=None)
    try:
        sys.exit(main(_parser.parse_args()))
    except CytoedgeError as _exc:
        print(f"error: {_exc}", file=sys.stderr)
        sys.exit(_exc.exit_code)
