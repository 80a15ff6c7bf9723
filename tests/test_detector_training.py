"""The learned finder's training chain end to end on the smoke preset: train (resumable), export with
thresholds fitted on val frames, and the runtime loads and runs the file. Measures nothing."""

from __future__ import annotations

from pathlib import Path

import cv2
import pytest
from conftest import SAMPLES

from edge.learnedfinder import LearnedFinder
from engines.detector import export, train
from engines.finder.data import available

pytestmark = pytest.mark.skipif(not available(), reason="../shared/data (txl-pbc, bccd) is not here")


def test_smoke_training_resumes_exports_and_runs_in_the_runtime(tmp_path: Path) -> None:
    out = tmp_path / "run"
    weights = train.train("smoke", out)
    assert weights.is_file() and (out / "checkpoint.pt").is_file()
    lines = (out / "loss.csv").read_text().splitlines()
    assert lines[0].startswith("step,loss") and lines[-1].startswith("6,")
    again = train.train("smoke", out)  # a finished run resumes at its last step and trains no further
    assert again == weights and (out / "loss.csv").read_text().splitlines()[-1] == lines[-1]
    meta = export.export(weights, tmp_path / "detector.onnx", "smoke", "0")
    assert set(meta.thresholds) == {"wbc", "rbc", "platelet"}
    finder = LearnedFinder(tmp_path / "detector.onnx")
    found = finder.find(cv2.imread(str(sorted(SAMPLES.glob("*.jpg"))[0])), 0.075)
    assert all(d.kind in {"wbc", "rbc", "platelet"} for d in found)
