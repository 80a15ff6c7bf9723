"""One contract for every classifier backend: run against each backend that can run here.

ONNX Runtime always runs; TensorRT cases skip with the reason when TensorRT, pycuda or a GPU is absent,
and only then: any other failure to open the backend (a bad engine, a refused Q/DQ model, a config
error) is a test error, so a TensorRT bug on a Jetson never shows as "skipped".

The self-test (deploy/jetson-selftest.sh) runs the whole suite once per engine: ``CYTOEDGE_TEST_MODEL``
names the model (default: the bundled one), ``CYTOEDGE_TRT_*`` the engine. fp32 must match ONNX Runtime to
1e-4; fp16/int8 engines must agree on the top class wherever ONNX Runtime is decisive.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import SAMPLES

from edge.analysis import classify_detections
from edge.cellfinder import find_cells
from edge.classifier import Classifier
from edge.errors import ConfigError
from edge.models import default_model_path, open_classifier
from edge.trt.plan import BackendUnavailable, settings_from

MODEL = Path(os.environ.get("CYTOEDGE_TEST_MODEL") or default_model_path())
# Largest probability difference allowed, per precision: against ONNX Runtime for fp32, and between batch
# sizes of the same engine for every precision (other batch sizes may pick other kernels).
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "int8": 5e-2}
DECISIVE_MARGIN = 0.2  # fp16/int8 must agree on the top class where ONNX Runtime's top two differ this much
MIN_AGREEMENT = 0.99


def available_backends() -> list:  # type: ignore[type-arg]
    params = [pytest.param("onnxruntime", id="onnxruntime")]
    try:
        import pycuda.driver  # noqa: F401
        import tensorrt  # noqa: F401

        params.append(pytest.param("tensorrt", id="tensorrt"))
    except ImportError as exc:
        params.append(
            pytest.param(
                "tensorrt",
                id="tensorrt",
                marks=pytest.mark.skip(reason=f"TensorRT/pycuda not installed here ({exc.name})"),
            )
        )
    return params


def open_backend(name: str) -> Classifier:
    """The backend under test; skipped only when its runtime or GPU is absent, never for another error."""
    try:
        return open_classifier(MODEL, name, threads=2)
    except BackendUnavailable as exc:
        pytest.skip(f"{name} cannot run here: {exc}")


def precision_of(name: str) -> str:
    return "fp32" if name == "onnxruntime" else settings_from(None)["precision"]


@pytest.fixture(scope="module")
def reference() -> Classifier:
    return open_classifier(MODEL, "onnxruntime", threads=1)


@pytest.fixture(scope="module", params=available_backends())
def backend(request: pytest.FixtureRequest) -> Classifier:
    classifier = open_backend(request.param)
    classifier.contract_precision = precision_of(request.param)  # type: ignore[attr-defined]
    return classifier


def test_only_a_missing_runtime_or_gpu_is_a_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CYTOEDGE_TRT_PRECISION", "fp8")  # a real failure to open, not a missing runtime
    with pytest.raises(ConfigError, match="fp8"):
        open_backend("tensorrt")
    monkeypatch.delenv("CYTOEDGE_TRT_PRECISION")
    try:
        import pycuda.driver  # noqa: F401
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(pytest.skip.Exception, match="not importable"):
            open_backend("tensorrt")


@pytest.fixture(scope="module")
def crops(reference: Classifier) -> np.ndarray:
    """Real crops: every white cell and platelet the cell finder cuts from the bundled frames."""
    meta = reference.metadata
    batch = []
    for path in sorted(SAMPLES.glob("*.jpg")):
        image = cv2.imread(str(path))
        detections = find_cells(image, 0.075)
        cells = classify_detections(image, detections, reference, 0.075, 1.0, 1.0)
        batch.extend(cell.crop for cell in cells if cell.crop is not None)
    assert len(batch) >= 20
    assert batch[0].shape == (meta.input_size, meta.input_size, 3)
    return np.stack(batch)


def test_same_crops_give_the_reference_probabilities(
    backend: Classifier, reference: Classifier, crops: np.ndarray
) -> None:
    expected = reference.classify(crops)
    got = backend.classify(crops)
    precision = backend.contract_precision  # type: ignore[attr-defined]
    if precision == "fp32":
        tolerance = TOLERANCE["fp32"]
        np.testing.assert_allclose(got.probs, expected.probs, atol=tolerance)
        assert (got.probs.argmax(1) == expected.probs.argmax(1)).all()
        np.testing.assert_allclose(got.uncertainty, expected.uncertainty, atol=tolerance)
        np.testing.assert_allclose(got.anomaly, expected.anomaly, atol=tolerance)
        return
    # Reduced precision: the same answer wherever the reference is decisive, probabilities close on average.
    top_two = np.sort(expected.probs, axis=1)[:, -2:]
    decisive = top_two[:, 1] - top_two[:, 0] > DECISIVE_MARGIN
    agree = got.probs.argmax(1) == expected.probs.argmax(1)
    assert decisive.sum() >= 20
    assert agree[decisive].mean() >= MIN_AGREEMENT, f"{precision}: top-1 agreement {agree[decisive].mean():.3f}"
    assert np.abs(got.probs - expected.probs).mean() < 0.02


@pytest.mark.parametrize("size", [1, 2, 7, 16, 64])
def test_every_batch_size_gives_the_same_answer_per_crop(backend: Classifier, crops: np.ndarray, size: int) -> None:
    batch = np.resize(crops, (size, *crops.shape[1:]))
    whole = backend.classify(batch)
    assert whole.probs.shape == (size, len(backend.metadata.classes))
    tolerance = TOLERANCE[backend.contract_precision]  # type: ignore[attr-defined]
    for index in (0, size - 1):
        single = backend.classify(batch[index : index + 1])
        np.testing.assert_allclose(single.probs[0], whole.probs[index], atol=tolerance)


def test_outputs_are_probabilities_and_unit_scores(backend: Classifier, crops: np.ndarray) -> None:
    result = backend.classify(crops)
    np.testing.assert_allclose(result.probs.sum(1), 1.0, atol=1e-5)
    assert ((result.uncertainty >= 0) & (result.uncertainty <= 1)).all()
    assert ((result.anomaly >= 0) & (result.anomaly <= 1)).all()


def test_empty_batch_gives_empty_predictions(backend: Classifier) -> None:
    size = backend.metadata.input_size
    result = backend.classify(np.zeros((0, size, size, 3), np.uint8))
    assert len(result) == 0
    assert result.probs.shape == (0, len(backend.metadata.classes))


@pytest.mark.parametrize(
    "bad",
    [np.zeros((2, 32, 32, 3), np.uint8), np.zeros((64, 64, 3), np.uint8), np.zeros((1, 64, 64, 3), np.float32)],
    ids=["wrong-size", "no-batch-axis", "wrong-dtype"],
)
def test_wrong_input_is_refused_with_a_clear_error(backend: Classifier, bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="crops must"):
        backend.classify(bad)


def test_model_identity_carries_the_file_checksum(backend: Classifier) -> None:
    from edge.modelmeta import file_sha256

    assert backend.model_id.endswith("@" + file_sha256(MODEL)[:12])


@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_lookup_table_preprocessing_gives_the_arithmetics_float32_values(reference: Classifier, order: str) -> None:
    import dataclasses

    from edge.classifier import _normalise, preprocess

    meta = dataclasses.replace(reference.metadata, channel_order=order)
    crops = np.random.default_rng(19).integers(0, 256, (7, 64, 64, 3), dtype=np.uint8)
    assert np.array_equal(preprocess(crops, meta), _normalise(crops, meta))
    assert np.array_equal(preprocess(crops[:0], meta), _normalise(crops[:0], meta))
