"""`cytoedge doctor` on this machine: ONNX Runtime config passes, a TensorRT config fails with a reason."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest

from edge import config as cfg
from edge.doctor import run_doctor
from edge.models import default_model_path
from edge.trt import cache

REPO = Path(__file__).resolve().parents[1]


def _doctor(config: dict) -> tuple[int, list[str]]:
    lines: list[str] = []
    code = run_doctor(config, out=lines.append)
    return code, lines


def _tensorrt_installed() -> bool:
    try:
        import pycuda.driver  # noqa: F401
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def test_onnxruntime_config_is_ready() -> None:
    code, lines = _doctor(cfg.load(None))
    text = "\n".join(lines)
    assert code == 0, text
    for topic in ("python", "numpy", "opencv", "onnxruntime", "tensorrt", "pycuda", "cameras", "model", "backend"):
        assert any(line[3:].startswith(topic) for line in lines), topic
    assert "GStreamer:" in text and "V4L2:" in text
    assert "CPUExecutionProvider" in text
    assert default_model_path().parent.name in text and "onnxruntime: ok" in text
    assert lines[-1] == "result: ready"
    assert not any(line.startswith("!!") for line in lines)


@pytest.mark.skipif(_tensorrt_installed(), reason="TensorRT and pycuda are installed here")
def test_tensorrt_config_fails_with_a_clear_reason(tmp_path: Path) -> None:
    config = cfg.with_overrides(cfg.load(None), "test", model__backend="tensorrt")
    config = copy.deepcopy(config)
    config["tensorrt"] = {"engine_dir": str(tmp_path), "precision": "fp16"}
    # An engine built elsewhere is listed, with what it was built for.
    built = cache.EngineKey("a" * 64, "10.3.0", "Orin", "8.7", "fp16", 1, 16, 64, model_name="baseline-cnn")
    cache.store(tmp_path, built, b"engine")
    code, lines = _doctor(config)
    text = "\n".join(lines)
    assert code == 1
    blocker = [line for line in lines if line.startswith("!!")]
    assert blocker and "tensorrt cannot run here" in blocker[0]
    assert "python3-libnvinfer and pycuda" in blocker[0]
    assert lines[-1].startswith("result: the configured backend cannot run:")
    assert "baseline-cnn-fp16-" in text and "TensorRT 10.3.0, Orin, fp16, batch 1/16/64" in text


def test_bad_tensorrt_settings_are_a_blocker() -> None:
    config = copy.deepcopy(cfg.with_overrides(cfg.load(None), "test", model__backend="tensorrt"))
    config["tensorrt"] = {"precision": "fp8"}
    code, lines = _doctor(config)
    assert code == 1 and any("precision" in line for line in lines if line.startswith("!!"))


def test_missing_model_is_a_blocker(tmp_path: Path) -> None:
    config = cfg.with_overrides(cfg.load(None), "test", model__path=str(tmp_path / "absent.onnx"))
    code, lines = _doctor(config)
    assert code == 1 and "model file not found" in "\n".join(lines)


def test_module_entry_point_exits_zero_for_the_default_config() -> None:
    done = subprocess.run([sys.executable, "-m", "edge.doctor"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "result: ready" in done.stdout
