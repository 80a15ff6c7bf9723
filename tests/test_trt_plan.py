"""What a TensorRT engine is built from, checked without a GPU: the engine key, the precision route per
TensorRT version, INT8 inputs bound to the model being built, the calibration cache name, the runtime's
binding checks, one source for the defaults, and builder/runtime kept apart.

Everything here is pure Python over the real models, the committed INT8 files and real temp files;
what needs TensorRT itself is checked on the device by deploy/jetson-selftest.sh.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import REPO

from edge.errors import ModelError
from edge.modelmeta import file_sha256
from edge.models import bundled_models_dir, default_model_path
from edge.trt import cache, plan
from edge.trt.backend import check_bindings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

JETPACK6 = plan.DeviceFacts("10.3.0", "Orin", "8.7", 8)
QDQ = plan.int8_dir() / plan.QDQ_NAME


@pytest.fixture(scope="module")
def other_model() -> Path:
    """A second real model with the same input size (another network the Q/DQ model must not stand in for)."""
    default = default_model_path()
    for folder in sorted(bundled_models_dir().iterdir()):
        path = folder / "model.onnx"
        if path.is_file() and file_sha256(path) != file_sha256(default):
            return path
    raise AssertionError("the repository ships only one model")


# --------------------------------------------------------------------------- item 1: calibration cache
def test_calibration_cache_name_carries_the_models_checksum(tmp_path: Path) -> None:
    """A model retrained under the same name and version must not reuse the old model's INT8 scales."""
    base = plan.make_key(default_model_path(), "int8", 16, 64, JETPACK6).key
    retrained = dataclasses.replace(base, onnx_sha256="f" * 64)  # same name, same calibration set, same GPU
    old, new = plan.calibration_cache_path(tmp_path, base, JETPACK6), plan.calibration_cache_path(
        tmp_path, retrained, JETPACK6)
    assert old != new
    assert base.onnx_sha256[:16] in old.name and "f" * 16 in new.name
    other_gpu = dataclasses.replace(JETPACK6, sm_count=16)
    assert plan.calibration_cache_path(tmp_path, base, other_gpu) != old


# ---------------------------------------------------------------- item 2: INT8 inputs bound to the model
def test_committed_qdq_model_names_its_source_and_is_accepted_for_it() -> None:
    props = {p.key: p.value for p in onnx.load(str(QDQ)).metadata_props}
    assert props[plan.QDQ_SOURCE_KEY] == file_sha256(default_model_path())
    plan.check_qdq(QDQ, file_sha256(default_model_path()))
    source, path = plan.int8_plan("10.3.0", file_sha256(default_model_path()), 64, QDQ)
    assert (source, path) == ("qdq", QDQ)


@pytest.mark.parametrize("version", ["10.3.0", "10.12.0", "11.0.0"])
def test_a_qdq_model_is_refused_for_another_network(other_model: Path, version: str) -> None:
    other_sha = file_sha256(other_model)
    with pytest.raises(ModelError, match="was made from sha256"):
        plan.int8_plan(version, other_sha, 64, QDQ)  # given explicitly (--int8-onnx / [tensorrt] int8_onnx)
    if plan.strongly_typed(version):
        with pytest.raises(ModelError, match="was made from sha256"):
            plan.int8_plan(version, other_sha, 64)  # the committed default, taken without being asked
    with pytest.raises(ModelError, match="not from the model being built"):
        plan.make_key(other_model, "int8", 16, 64, dataclasses.replace(JETPACK6, tensorrt_version=version), QDQ)


def test_a_qdq_model_that_does_not_name_its_source_is_refused(tmp_path: Path) -> None:
    model = onnx.load(str(QDQ))
    kept = [p for p in model.metadata_props if p.key != plan.QDQ_SOURCE_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    unbound = tmp_path / "old.qdq.onnx"
    unbound.write_bytes(model.SerializeToString())
    with pytest.raises(ModelError, match="does not say which model it was made from"):
        plan.int8_plan("10.3.0", file_sha256(default_model_path()), 64, unbound)


def test_calibration_set_is_checked_against_the_model_and_its_input_size(other_model: Path, tmp_path: Path) -> None:
    sha = file_sha256(default_model_path())
    source, npz = plan.int8_plan("10.3.0", sha, 64)
    assert source == "calibrator" and npz == plan.int8_dir() / plan.CALIBRATION_NPZ
    with pytest.raises(ModelError, match="was made for model sha256"):
        plan.int8_plan("10.3.0", file_sha256(other_model), 64)
    with pytest.raises(ModelError, match=r"crops of shape \[64, 64, 3\], the model wants \[32, 32, 3\]"):
        plan.int8_plan("10.3.0", sha, 32)
    folder = tmp_path / "cal"
    shutil.copytree(plan.int8_dir(), folder)
    manifest = json.loads((folder / plan.CALIBRATION_MANIFEST).read_text())
    (folder / plan.CALIBRATION_MANIFEST).write_text(json.dumps({**manifest, "shape": [400, 48, 48, 3]}))
    with pytest.raises(ModelError, match=r"crops of shape \[48, 48, 3\]"):
        plan.int8_plan("10.3.0", sha, 64, calibration_dir=folder)
    (folder / plan.CALIBRATION_MANIFEST).write_text("{not json")
    with pytest.raises(ModelError, match="unreadable"):
        plan.int8_plan("10.3.0", sha, 64, calibration_dir=folder)


# ------------------------------------------------------------------------------------ item 3: TF32
def test_fp32_engines_clear_tf32_and_say_so_in_the_key() -> None:
    fp32 = plan.make_key(default_model_path(), "fp32", 16, 64, JETPACK6).key
    fp16 = plan.make_key(default_model_path(), "fp16", 16, 64, JETPACK6).key
    assert fp32.tf32 is False and fp16.tf32 is True
    for version in ("10.3.0", "10.12.0", "11.0.0"):
        to_set, to_clear = plan.builder_flags("fp32", version)
        assert to_clear == ["TF32"] and to_set == []
    assert dataclasses.replace(fp32, tf32=True).digest() != fp32.digest()


def test_an_engine_built_with_tf32_is_a_mismatch_for_fp32(tmp_path: Path) -> None:
    wanted = plan.make_key(default_model_path(), "fp32", 16, 64, JETPACK6).key
    path = cache.store(tmp_path, dataclasses.replace(wanted, tf32=True), b"engine")
    state = cache.check(path, wanted)
    assert state.status == "mismatch" and state.differences == {"tf32": (True, False)}


# --------------------------------------------------------------------- item 5: strongly typed from 10.12
@pytest.mark.parametrize(("version", "strongly"), [("10.3.0.30", False), ("10.11.1", False), ("10.12.0", True),
                                                   ("10.13.2.6", True), ("11.0.0", True), ("garbage", False)])
def test_strongly_typed_route_from_10_12(version: str, strongly: bool) -> None:
    assert plan.strongly_typed(version) is strongly
    fp16_flags, _ = plan.builder_flags("fp16", version)
    int8_flags, _ = plan.builder_flags("int8", version)
    if strongly:
        assert fp16_flags == [] and int8_flags == []  # no deprecated FP16/INT8 flags
        assert plan.network_source("fp16", version, None) == "fp16-onnx"
    else:
        assert fp16_flags == ["FP16"] and int8_flags == ["FP16", "INT8"]
        assert plan.network_source("fp16", version, None) == "model"


def test_int8_on_10_12_takes_the_qdq_model_not_the_deprecated_calibrator() -> None:
    sha = file_sha256(default_model_path())
    assert plan.int8_plan("10.11.0", sha, 64)[0] == "calibrator"
    assert plan.int8_plan("10.12.0", sha, 64) == ("qdq", QDQ)


# ---------------------------------------------------------------------- item 7: device identity
def test_the_multiprocessor_count_is_part_of_the_device_identity(tmp_path: Path) -> None:
    nano, agx = JETPACK6, dataclasses.replace(JETPACK6, sm_count=16)  # same pycuda name, other module
    assert nano.digest() != agx.digest()
    built = plan.make_key(default_model_path(), "fp16", 16, 64, nano).key
    wanted = plan.make_key(default_model_path(), "fp16", 16, 64, agx).key
    cache.store(tmp_path, built, b"engine")
    state = cache.find(tmp_path, wanted)
    assert state.status == "mismatch" and state.differences == {"sm_count": (8, 16)}
    assert plan.timing_cache_path(tmp_path, nano) != plan.timing_cache_path(tmp_path, agx)


# ------------------------------------------------------------------------------- binding checks
def test_binding_checks_accept_the_models_io_and_name_every_difference() -> None:
    from edge.onnx_backend import OnnxRuntimeClassifier

    meta = OnnxRuntimeClassifier(default_model_path(), threads=1).metadata
    outputs = [n for n in (meta.logits_output, meta.uncertainty_output, meta.anomaly_output) if n]
    f32 = {meta.input_name: np.dtype(np.float32)}
    assert check_bindings("e", meta, [meta.input_name], outputs, f32) == outputs
    with pytest.raises(ModelError, match="engine inputs"):
        check_bindings("e", meta, ["images"], outputs, {"images": np.dtype(np.float32)})
    with pytest.raises(ModelError, match="engine inputs"):
        check_bindings("e", meta, [meta.input_name, "extra"], outputs, f32)
    with pytest.raises(ModelError, match="lacks outputs"):
        check_bindings("e", meta, [meta.input_name], ["something_else"], f32)
    with pytest.raises(ModelError, match="expected float32 I/O"):
        check_bindings("e", meta, [meta.input_name], outputs, {meta.input_name: np.dtype(np.float16)})


# -------------------------------------------------------------------- one place for the defaults
def test_tensorrt_defaults_come_from_defaults_toml_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CYTOEDGE_STATE_DIR", str(tmp_path))
    for variable in plan.ENV_OVERRIDES.values():
        monkeypatch.delenv(variable, raising=False)
    shipped = tomllib.loads((REPO / "edge" / "defaults.toml").read_text())["tensorrt"]
    settings = plan.settings_from(None)
    for name in ("precision", "opt_batch", "max_batch", "build_if_missing", "workspace_mb"):
        assert settings[name] == shipped[name], name
    assert settings["engine_dir"] == tmp_path / "engines"
    # No second copy: no module under edge/trt assigns a default value of its own.
    for module in sorted((REPO / "edge" / "trt").glob("*.py")):
        tree = ast.parse(module.read_text())
        names = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign) for t in node.targets
                 if isinstance(t, ast.Name)}
        assert not {n for n in names if n.startswith("DEFAULT")}, module.name


# ------------------------------------------------------------- builder and runtime kept apart
def test_builder_and_runtime_do_not_import_each_other_and_edge_never_imports_calibration() -> None:
    grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (test extra)")
    graph = grimp.build_graph("edge", "calibration", "engines")
    for importer, imported in (("edge.trt.builder", "edge.trt.backend"), ("edge.trt.backend", "edge.trt.builder")):
        assert graph.find_shortest_chain(importer=importer, imported=imported) is None, (importer, imported)
    for module in graph.find_children("edge") | {"edge"}:
        for target in ("calibration", "calibration.int8"):
            assert not graph.direct_import_exists(importer=module, imported=target, as_packages=True), module
    assert graph.find_shortest_chain(importer="edge.models", imported="calibration.int8") is None
