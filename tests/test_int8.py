"""INT8 calibration set and Q/DQ model: the committed files are what their manifests say, the Q/DQ
model runs in the runtime's ONNX Runtime backend with the same metadata, and it agrees with fp32."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from conftest import SAMPLES

from calibration import int8
from edge.cellfinder import find_cells
from edge.crops import cut_crops
from edge.modelmeta import METADATA_KEY, file_sha256
from edge.models import default_model_path
from edge.onnx_backend import OnnxRuntimeClassifier
from edge.trt import plan

QDQ = int8.OUT_DIR / int8.QDQ_NAME


@pytest.fixture(scope="module")
def fp32() -> OnnxRuntimeClassifier:
    return OnnxRuntimeClassifier(default_model_path(), threads=1)


@pytest.fixture(scope="module")
def qdq() -> OnnxRuntimeClassifier:
    return OnnxRuntimeClassifier(QDQ, threads=1)


@pytest.fixture(scope="module")
def sample_crops(fp32: OnnxRuntimeClassifier) -> np.ndarray:
    """White cells and platelets the cell finder cuts from the bundled frames (not in the calibration set)."""
    meta = fp32.metadata
    crops = []
    for path in sorted(SAMPLES.glob("*.jpg")):
        image = cv2.imread(str(path))
        boxes = [d.bbox for d in find_cells(image, 0.075) if d.kind in ("wbc", "platelet")]
        crops.append(cut_crops(image, boxes, 0.075, meta.field_um, meta.input_size))
    return np.concatenate(crops)


def test_committed_calibration_set_matches_its_manifest(fp32: OnnxRuntimeClassifier) -> None:
    manifest = json.loads((int8.OUT_DIR / int8.CALIBRATION_MANIFEST).read_text())
    cal = int8.load_calibration_set()  # verifies the pixel checksum
    size = fp32.metadata.input_size
    assert cal.crops.shape == (manifest["shape"][0], size, size, 3) and cal.crops.dtype == np.uint8
    assert manifest["model_sha256"] == file_sha256(default_model_path())
    assert manifest["npz_bytes"] < int8.MAX_COMMITTED_NPZ
    for label in fp32.metadata.classes:  # stratified: every class, training split only
        assert manifest["counts"][f"pbc/{label}"] == int8.PBC_PER_CLASS
    assert all(s["split"] == "train" for s in cal.sources if s["source"] == "pbc")
    assert manifest["counts"].get("bccd/wbc", 0) > 0 and manifest["counts"].get("bccd/platelet", 0) > 0
    assert len(cal.sources) == len(cal.crops)


def test_npz_is_a_standard_numpy_archive(tmp_path: Path) -> None:
    crops = np.random.default_rng(0).integers(0, 255, (5, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "c.npz"
    path.write_bytes(int8.npz_bytes(crops))
    with np.load(path) as data:
        np.testing.assert_array_equal(data["crops"], crops)
    assert int8.npz_bytes(crops) == path.read_bytes()  # deterministic: rebuilding gives the same bytes


def test_reader_feeds_equal_preprocessed_batches_covering_every_crop(fp32: OnnxRuntimeClassifier) -> None:
    crops = np.zeros((50, 64, 64, 3), np.uint8)
    reader = int8.CropReader(crops, fp32.metadata, batch=32)
    shapes = []
    while (item := reader.get_next()) is not None:
        shapes.append(item[fp32.metadata.input_name].shape)
    assert len({s for s in shapes}) == 1 and sum(s[0] for s in shapes) == 50
    assert shapes[0][1:] == (3, 64, 64)
    reader.rewind()
    assert reader.get_next() is not None


def test_qdq_model_loads_in_the_runtime_with_the_same_metadata(
    fp32: OnnxRuntimeClassifier, qdq: OnnxRuntimeClassifier
) -> None:
    assert qdq.metadata == fp32.metadata
    assert QDQ.stat().st_size < 5 * 1024 * 1024
    model = onnx.load(str(QDQ))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    props = {p.key: p.value for p in model.metadata_props}
    assert METADATA_KEY in props
    init = {t.name: t for t in model.graph.initializer}
    # Per-channel weights: some DequantizeLinear has a vector of scales; symmetric: zero points are 0.
    vector_scales = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                     and n.input[1] in init and len(init[n.input[1]].dims) == 1 and init[n.input[1]].dims[0] > 1]
    assert vector_scales
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in init:
            assert not onnx.numpy_helper.to_array(init[node.input[2]]).any()


def test_qdq_agrees_with_fp32_on_decisive_microscope_crops(
    fp32: OnnxRuntimeClassifier, qdq: OnnxRuntimeClassifier, sample_crops: np.ndarray
) -> None:
    """BCCD crops are foreign to a PBC-trained model: many sit near a decision boundary, where INT8
    rounding may flip the top class (measured: 7 of 54, all with a top-two margin under 0.2). Where
    fp32 is decisive, INT8 must agree; everywhere, probabilities must stay close."""
    a = fp32.classify(sample_crops).probs
    b = qdq.classify(sample_crops).probs
    top_two = np.sort(a, axis=1)[:, -2:]
    decisive = top_two[:, 1] - top_two[:, 0] > 0.2
    assert len(sample_crops) >= 20 and decisive.sum() >= 20
    assert (a.argmax(1) == b.argmax(1))[decisive].all()
    assert np.abs(a - b).mean() < 0.02


def test_committed_report_describes_the_committed_model() -> None:
    report = json.loads((int8.OUT_DIR / "report.json").read_text())
    assert report["int8_model"]["sha256"] == file_sha256(QDQ)
    assert report["fp32_model"]["sha256"] == file_sha256(default_model_path())
    assert report["n"] > 2000 and report["goal"]["met"]
    assert report["agreement"] >= int8.GOAL_AGREEMENT
    assert report["balanced_accuracy_loss_points"] <= int8.GOAL_MAX_LOSS_POINTS


def test_make_qdq_end_to_end_on_a_small_set(tmp_path: Path, sample_crops: np.ndarray) -> None:
    cal = int8.CalibrationSet(sample_crops[:16], [{"source": "test"}] * 16)
    out = int8.make_qdq(default_model_path(), cal, tmp_path / "q.onnx", method="MinMax")
    classifier = OnnxRuntimeClassifier(out, threads=1)
    assert classifier.classify(sample_crops[:4]).probs.shape == (4, len(classifier.metadata.classes))
    # Bound to the model it was made from: the TensorRT builder refuses it for any other network.
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props[plan.QDQ_SOURCE_KEY] == file_sha256(default_model_path())
    assert not list(tmp_path.glob("tmp*"))  # the work folder is gone


def test_bundled_frame_figures_are_what_the_command_computes_and_what_the_docs_quote() -> None:
    """docs/tensorrt.md's figure on the bundled BCCD cells comes from `python -m calibration.int8 bundled`,
    counted per kind: recomputed here, compared with the committed bundled.json and with the page."""
    committed = json.loads((int8.OUT_DIR / "bundled.json").read_text())
    fresh = int8.bundled_agreement(default_model_path(), QDQ, threads=1)
    for group in ("all", "wbc", "platelet"):
        # ONNX Runtime's INT8 kernels differ by CPU instruction set (VNNI or not), so the mean difference may
        # move in the fourth decimal between machines; the agreement counts may not.
        counts = {k: v for k, v in fresh[group].items() if k != "mean_abs_prob_diff"}
        assert counts == {k: v for k, v in committed[group].items() if k != "mean_abs_prob_diff"}, group
        assert fresh[group]["mean_abs_prob_diff"] == pytest.approx(committed[group]["mean_abs_prob_diff"], abs=1e-3)
    assert fresh["all"]["cells"] == fresh["wbc"]["cells"] + fresh["platelet"]["cells"]
    assert committed["int8_sha256"] == file_sha256(QDQ)
    page = (Path(__file__).resolve().parents[1] / "docs" / "tensorrt.md").read_text()
    for line in int8.render_bundled(committed).splitlines():
        assert line in page, line
