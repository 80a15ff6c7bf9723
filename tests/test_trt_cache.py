"""TensorRT engine cache on real files: keys, mismatch messages, corruption, crash-safe replacement.

No GPU needed: the cache never deserialises anything, it decides whether TensorRT may.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge.errors import ConfigError, ModelError
from edge.trt import cache
from edge.trt.plan import settings_from

REPO = Path(__file__).resolve().parents[1]
BLOB = bytes(range(256)) * 400  # 100 KiB stand-in for a serialised engine (never deserialised here)


def key(**changes: object) -> cache.EngineKey:
    base = cache.EngineKey(
        onnx_sha256="a" * 64, tensorrt_version="10.3.0", gpu_name="Orin (nvgpu)", compute_capability="8.7",
        precision="fp16", min_batch=1, opt_batch=16, max_batch=64, model_name="baseline-cnn",
    )
    return dataclasses.replace(base, **changes)


def test_every_field_changes_the_digest_and_file_name() -> None:
    base = key()
    variants = [key(onnx_sha256="b" * 64), key(tensorrt_version="10.3.1"), key(gpu_name="Orin Nano"),
                key(compute_capability="8.6"), key(precision="fp32"), key(opt_batch=8), key(max_batch=128),
                key(sm_count=8), key(tf32=True),
                key(precision="int8", int8_source="qdq", int8_sha256="c" * 64),
                key(precision="int8", int8_source="calibrator", int8_sha256="c" * 64),
                key(precision="int8", int8_source="qdq", int8_sha256="d" * 64)]
    digests = {base.digest(), *(v.digest() for v in variants)}
    assert len(digests) == len(variants) + 1
    assert cache.engine_filename(base) == f"baseline-cnn-fp16-{base.digest()[:16]}.engine"
    assert key(model_name="renamed").digest() == base.digest()  # a display name is not part of validity


def test_key_refuses_inconsistent_values() -> None:
    with pytest.raises(ValueError, match="int8_source"):
        key(precision="int8")
    with pytest.raises(ValueError, match="int8 keys only"):
        key(int8_source="qdq", int8_sha256="c" * 64)
    with pytest.raises(ValueError, match="min_batch"):
        key(opt_batch=100)
    with pytest.raises(ValueError, match="precision"):
        key(precision="bf16")


def test_store_then_check_ok_and_read_back(tmp_path: Path) -> None:
    wanted = key()
    path = cache.store(tmp_path, wanted, BLOB, extra={"build_seconds": 1.0})
    assert path == cache.engine_path(tmp_path, wanted)
    state = cache.check(path, wanted)
    assert state.ok, state.message
    assert cache.read_engine(path, wanted) == BLOB
    sidecar = json.loads(cache.sidecar_path(path).read_text())
    assert sidecar["key"] == wanted.as_dict()
    assert sidecar["engine_bytes"] == len(BLOB) and sidecar["key_sha256"] == wanted.digest()
    assert not list(tmp_path.glob(".*.tmp"))


def test_missing_engine_names_the_rebuild_command(tmp_path: Path) -> None:
    wanted = key()
    command = cache.rebuild_command("model.onnx", wanted, tmp_path)
    state = cache.find(tmp_path, wanted, command)
    assert state.status == "missing"
    assert f"cytoedge engine build model.onnx --precision fp16 --opt-batch 16 --max-batch 64 --engine-dir {tmp_path}" \
        in state.message


def test_mismatch_says_exactly_which_fields_differ(tmp_path: Path) -> None:
    built = key()
    path = cache.store(tmp_path, built, BLOB)
    wanted = key(tensorrt_version="10.4.0", gpu_name="Orin Nano")
    state = cache.check(path, wanted, "REBUILD")
    assert state.status == "mismatch"
    assert state.differences == {"tensorrt_version": ("10.3.0", "10.4.0"), "gpu_name": ("Orin (nvgpu)", "Orin Nano")}
    assert "tensorrt_version: engine has '10.3.0', wanted '10.4.0'" in state.message
    assert state.message.endswith("rebuild with: REBUILD")
    # Looked up by key, the nearest engine for the same model and precision explains the rebuild.
    found = cache.find(tmp_path, wanted, "REBUILD")
    assert found.status == "mismatch" and set(found.differences) == {"tensorrt_version", "gpu_name"}
    assert found.path == cache.engine_path(tmp_path, wanted)
    with pytest.raises(ValueError, match="mismatch"):
        cache.read_engine(path, wanted)


def test_int8_engines_are_tied_to_their_calibration_input(tmp_path: Path) -> None:
    built = key(precision="int8", int8_source="calibrator", int8_sha256="1" * 64)
    path = cache.store(tmp_path, built, BLOB)
    state = cache.check(path, key(precision="int8", int8_source="calibrator", int8_sha256="2" * 64))
    assert state.status == "mismatch" and list(state.differences) == ["int8_sha256"]


def test_truncation_is_detected_before_deserialising(tmp_path: Path) -> None:
    wanted = key()
    path = cache.store(tmp_path, wanted, BLOB)
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    state = cache.check(path, wanted)
    assert state.status == "corrupt" and "truncated" in state.reason
    path.write_bytes(data[:10])  # cut inside the header
    assert cache.check(path, wanted).status == "corrupt"
    path.write_bytes(data + b"x")
    assert cache.check(path, wanted).status == "corrupt"


@pytest.mark.parametrize("where", ["blob-start", "blob-middle", "blob-end", "magic", "header-json"])
def test_a_single_flipped_bit_is_detected(tmp_path: Path, where: str) -> None:
    wanted = key()
    path = cache.store(tmp_path, wanted, BLOB)
    data = bytearray(path.read_bytes())
    _, offset = cache.read_header(path)
    position = {"blob-start": offset, "blob-middle": offset + len(BLOB) // 2, "blob-end": len(data) - 1,
                "magic": 0, "header-json": 14}[where]
    data[position] ^= 0x04
    path.write_bytes(bytes(data))
    state = cache.check(path, wanted)
    assert state.status in ("corrupt", "mismatch"), state
    assert not state.ok
    with pytest.raises(ValueError):
        cache.read_engine(path, wanted)


def test_raw_tensorrt_engine_without_header_is_refused(tmp_path: Path) -> None:
    path = cache.engine_path(tmp_path, key())
    path.write_bytes(b"ftrt" + BLOB)
    state = cache.check(path, key())
    assert state.status == "corrupt" and "bad magic" in state.reason


CRASH_WRITER = """
import json, os, sys
from pathlib import Path
from edge.trt import cache
wanted = cache.EngineKey.from_dict(json.loads(sys.argv[2]))
cache.store(Path(sys.argv[1]), wanted, b"NEW" * 1000, before_replace=lambda temp: os._exit(9))
"""


def test_crash_between_temp_write_and_rename_keeps_the_old_engine(tmp_path: Path) -> None:
    wanted = key()
    path = cache.store(tmp_path, wanted, BLOB)
    argv = [sys.executable, "-c", CRASH_WRITER, str(tmp_path), json.dumps(wanted.as_dict())]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 9, done.stderr
    leftovers = list(tmp_path.glob(".*.tmp"))
    assert len(leftovers) == 1  # the dead writer's complete temp file, never renamed
    assert cache.check(path, wanted).ok
    assert cache.read_engine(path, wanted) == BLOB
    removed = cache.clean_stale_temps(tmp_path)  # its writer's PID is gone
    assert removed == leftovers and not leftovers[0].exists()


def test_a_live_writers_temp_file_is_left_alone_unless_old(tmp_path: Path) -> None:
    live = tmp_path / f".x.engine.{os.getpid()}.0123abcd.tmp"
    live.write_bytes(b"in progress")
    unrelated = tmp_path / ".notes.tmp"
    unrelated.write_bytes(b"not ours")
    assert cache.clean_stale_temps(tmp_path) == []
    old = time.time() - 2 * cache.STALE_TEMP_S
    os.utime(live, (old, old))
    assert cache.clean_stale_temps(tmp_path) == [live]
    assert unrelated.exists()


def test_replacing_an_engine_leaves_exactly_one_valid_file(tmp_path: Path) -> None:
    wanted = key()
    cache.store(tmp_path, wanted, BLOB)
    path = cache.store(tmp_path, wanted, BLOB[::-1])
    assert cache.read_engine(path, wanted) == BLOB[::-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, cache.sidecar_path(path).name])


def test_settings_defaults_environment_and_refusals(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CYTOEDGE_STATE_DIR", raising=False)
    settings = settings_from({})
    assert settings["precision"] == "fp16" and settings["build_if_missing"] is False
    assert settings["engine_dir"] == Path.home() / ".cache" / "cytoedge" / "engines"
    monkeypatch.setenv("CYTOEDGE_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("CYTOEDGE_TRT_PRECISION", "int8")
    assert settings_from({})["engine_dir"] == tmp_path / "engines"
    assert settings_from({})["precision"] == "fp16"  # a config section wins; variables apply without one
    assert settings_from(None)["precision"] == "int8"
    with pytest.raises(ConfigError, match="precision"):
        settings_from({"precision": "fp8"})
    with pytest.raises(ConfigError, match="opt_batch"):
        settings_from({"opt_batch": 65, "max_batch": 64})
    with pytest.raises(ConfigError, match=r"unknown key tensorrt\.max_batchsize"):
        settings_from({"max_batchsize": 3})


def test_without_tensorrt_the_backend_says_how_to_install_it() -> None:
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    from edge.models import default_model_path
    from edge.trt.backend import open_tensorrt

    with pytest.raises(ModelError, match="python3-libnvinfer and pycuda; the venv must see system site-packages"):
        open_tensorrt(default_model_path(), settings_from({"precision": "fp32"}))
