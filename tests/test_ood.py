"""Out-of-domain evaluation on wbc-shift: scale measurement on synthetic cells, and a real run on the
shipped baseline when the data is present."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import SHARED_DATA

from engines import ood

REPO = Path(__file__).resolve().parents[1]
WBC_SHIFT = SHARED_DATA / "wbc-shift"
PBC = SHARED_DATA / "pbc"
BASELINE = REPO / "engines" / "models" / "baseline-cnn" / "model.onnx"


def test_white_cell_diameter_of_a_synthetic_cell() -> None:
    image = np.full((120, 120, 3), (200, 240, 250), np.uint8)
    cv2.circle(image, (60, 60), 35, (170, 150, 200), -1)  # cytoplasm
    cv2.circle(image, (60, 60), 15, (120, 40, 90), -1)  # nucleus
    assert ood.white_cell_diameter_px(image) == pytest.approx(70, abs=3)


def test_red_cell_widths_of_synthetic_red_cells() -> None:
    image = np.full((300, 300, 3), (225, 225, 240), np.uint8)
    for cx, cy in ((60, 60), (200, 70), (80, 220), (220, 220)):
        cv2.circle(image, (cx, cy), 38, (170, 140, 215), -1)
    widths = ood.red_cell_diameters_px(image, 30, 150)
    assert len(widths) == 4
    assert np.median(widths) == pytest.approx(77, abs=3)


def test_cut_field_pads_a_small_crop_to_the_model_field() -> None:
    image = np.full((120, 120, 3), (200, 240, 250), np.uint8)
    cv2.circle(image, (60, 60), 30, (120, 40, 90), -1)
    crop = ood.cut_field(image, 0.19, 36.0, 64)
    assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
    assert np.abs(crop[0, 0].astype(int) - (200, 240, 250)).max() <= 2, "padding is the background colour"
    # 60 px at 0.19 µm/px is 11.4 µm, i.e. about 20 px of the 64 px (36 µm) field.
    dark = (crop.astype(int).sum(2) < 400).sum()
    assert dark == pytest.approx(np.pi * (60 * 0.19 / 36 * 64 / 2) ** 2, rel=0.15)


def test_cli_skips_without_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ood.main([str(BASELINE), "--data", str(tmp_path)]) == 2
    assert "skipped: no wbc-shift data" in capsys.readouterr().err


@pytest.mark.skipif(not (WBC_SHIFT / "manifest.csv").is_file(), reason=f"no wbc-shift data at {WBC_SHIFT}")
def test_shipped_baseline_gives_sane_numbers(tmp_path: Path) -> None:
    pbc_root = PBC if (PBC / "manifest.csv").is_file() else None
    out = tmp_path / "ood.json"
    args = [str(BASELINE), "--data", str(WBC_SHIFT), "--out", str(out)]
    if pbc_root:
        args += ["--pbc", str(pbc_root)]
    assert ood.main(args) == 0
    import json

    report = json.loads(out.read_text())
    assert set(report["domains"]) == {"tecom", "cellavision-blog"}
    for domain, expected_n in (("tecom", 300), ("cellavision-blog", 100)):
        result = report["domains"][domain]
        assert result["n"] == expected_n
        assert 0.05 < result["um_per_px"] < 0.4
        for key in ("accuracy", "balanced_accuracy", "ece", "review_share"):
            assert 0.0 <= result[key] <= 1.0
        assert sum(result["predicted"].values()) == expected_n
        assert set(result["per_class_recall"]) == {"neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"}
    # The scales measured from cell sizes: tecom ~0.19 µm/px, cellavision-blog ~0.1 µm/px.
    assert report["scales"]["cellavision-blog"]["um_per_px"] == pytest.approx(0.1, abs=0.02)
    assert report["scales"]["tecom"]["um_per_px"] == pytest.approx(0.19, abs=0.03)
    if pbc_root:
        assert report["pbc_test"]["balanced_accuracy"] > 0.95
    # The domain alarm, run over the cells as the service meets them, flags the foreign cells.
    for domain in ("tecom", "cellavision-blog"):
        alarm = report["domains"][domain]["alarm"]
        assert alarm["never_on"] == 0 and alarm["flagged_share_with_alarm"] > 0.5
    if pbc_root:
        home = report["pbc_test"]["white_five"]["alarm"]
        assert home["never_on"] == home["orders"]  # never on for PBC's own cells


def test_evaluate_writes_out_of_domain_figures_into_the_card(tmp_path: Path) -> None:
    import json
    import shutil

    from engines import evaluate

    if not (WBC_SHIFT / "manifest.csv").is_file():
        pytest.skip(f"no wbc-shift data at {WBC_SHIFT}")
    model_dir = tmp_path / "model"
    shutil.copytree(BASELINE.parent, model_dir)
    assert evaluate.main([str(model_dir), "--ood-only", "--write"]) == 0
    card = json.loads((model_dir / "card.json").read_text())
    assert set(card["out_of_domain"]["domains"]) == {"tecom", "cellavision-blog"}
    text = (model_dir / "card.md").read_text()
    assert text.count("## Other microscopes (out of domain)") == 1 and "| tecom | 300 |" in text


def test_teacher_evaluation_skips_cleanly_without_a_teacher(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from engines.experiments import ood_teacher

    missing = tmp_path / "teacher.pt"
    argv = ["--teacher", str(missing), "--calib", str(missing), "--pbc-errors", str(missing), "--out",
            str(tmp_path / "out.json")]
    assert ood_teacher.main(argv) == 2
    assert "not found" in capsys.readouterr().err and not (tmp_path / "out.json").exists()
