"""`cytoedge classify`: one JSON object per single-cell image, so any model can be scored on any folder."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from conftest import PBC_MINI, run_cli


def test_classify_prints_one_json_object_per_cell_image() -> None:
    result = run_cli("classify", str(PBC_MINI), "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    truth = {str(PBC_MINI / r["path"]): r["label"] for r in csv.DictReader((PBC_MINI / "manifest.csv").open())}
    assert {r["path"] for r in rows} == set(truth)
    for row in rows:
        assert set(row) >= {"path", "label", "probs", "uncertainty", "anomaly"}
        assert abs(sum(row["probs"].values()) - 1) < 1e-4 and row["label"] == max(row["probs"], key=row["probs"].get)
    correct = sum(row["label"] == truth[row["path"]] for row in rows)
    assert correct / len(rows) > 0.8  # a sanity check of the wiring, not a measurement (see the model card)


def test_unreadable_image_is_reported_and_the_rest_classified(tmp_path: Path) -> None:
    good = next(PBC_MINI.glob("neutrophil/*.jpg"))
    shutil.copy(good, tmp_path / "a.jpg")
    (tmp_path / "b.jpg").write_bytes(b"not an image")
    result = run_cli("classify", str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"), "--json")
    assert result.returncode == 1
    assert "b.jpg: not a readable image" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stdout.splitlines()) == 1


def test_another_model_file_can_be_chosen(tmp_path: Path) -> None:
    student = Path(__file__).resolve().parents[1] / "engines" / "models" / "student-v1" / "model.onnx"
    good = next(PBC_MINI.glob("lymphocyte/*.jpg"))
    result = run_cli("classify", str(good), "--json", "--model", str(student))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"].startswith("student")
