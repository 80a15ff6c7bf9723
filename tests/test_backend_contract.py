"""One contract for every classifier backend: run against each backend that can run here.

ONNX Runtime always runs; TensorRT cases skip with the reason when TensorRT, pycuda or a GPU is absent.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import SAMPLES

from edge.analysis import classify_detections
from edge.cellfinder import find_cells
from edge.classifier import Classifier
from edge.models import default_model_path, open_classifier

FP32_TOLERANCE = 1e-4


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


@pytest.fixture(scope="module")
def reference() -> Classifier:
    return open_classifier(None, "onnxruntime", threads=1)


@pytest.fixture(scope="module", params=available_backends())
def backend(request: pytest.FixtureRequest) -> Classifier:
    try:
        return open_classifier(None, request.param, threads=2)
    except Exception as exc:  # a backend that cannot start on this machine is a skip, with its reason
        pytest.skip(f"{request.param} cannot run here: {exc}")


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
    np.testing.assert_allclose(got.probs, expected.probs, atol=FP32_TOLERANCE)
    assert (got.probs.argmax(1) == expected.probs.argmax(1)).all()
    np.testing.assert_allclose(got.uncertainty, expected.uncertainty, atol=FP32_TOLERANCE)
    np.testing.assert_allclose(got.anomaly, expected.anomaly, atol=FP32_TOLERANCE)


@pytest.mark.parametrize("size", [1, 2, 7, 16, 64])
def test_every_batch_size_gives_the_same_answer_per_crop(backend: Classifier, crops: np.ndarray, size: int) -> None:
    batch = np.resize(crops, (size, *crops.shape[1:]))
    whole = backend.classify(batch)
    assert whole.probs.shape == (size, len(backend.metadata.classes))
    for index in (0, size - 1):
        single = backend.classify(batch[index : index + 1])
        np.testing.assert_allclose(single.probs[0], whole.probs[index], atol=FP32_TOLERANCE)


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

    assert backend.model_id.endswith("@" + file_sha256(Path(default_model_path()))[:12])
