"""The AdaBN lever harness (engines.experiments.adabn_levers) on the real wbc-shift sets: it reopens the
weights each lever run saved and measures before and after label-free batch-norm re-estimation."""

from __future__ import annotations

import pytest
from conftest import SHARED_DATA

pytest.importorskip("torch")

WBC_SHIFT = SHARED_DATA / "wbc-shift"


def test_adabn_harness_reopens_saved_lever_weights_and_skips_runs_without_them(tmp_path, capsys) -> None:
    """AdaBN levers load the weights.pt the harness saves (no run-key reconstruction), on the real wbc-shift."""
    import json

    from engines import export, pbc
    from engines.baseline import WEIGHTS_FILE, BaselineCNN, save_weights
    from engines.experiments import adabn_levers

    if not (WBC_SHIFT / "manifest.csv").is_file():
        pytest.skip(f"no wbc-shift data at {WBC_SHIFT}")
    folder = tmp_path / "work" / "bn+basic-seed0"
    folder.mkdir(parents=True)
    model = BaselineCNN(len(pbc.CLASSES), 8, (8, 16, 16, 16)).eval()
    meta = export.make_metadata(name="tiny", version="0", classes=list(pbc.CLASSES), input_size=64,
                                mean=[0.5] * 3, std=[0.25] * 3, field_um=36.0, kind="baseline")
    export.export_onnx(model, folder / "model.onnx", meta)
    save_weights(model, folder / WEIGHTS_FILE)
    levers = tmp_path / "levers.json"
    levers.write_text(json.dumps({"runs": {"bn+basic/seed0": {}, "gn+basic/seed0": {}, "bn+basic/seed0/x": {}}}))
    out = tmp_path / "adabn.json"
    assert adabn_levers.main(["--levers", str(levers), "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    report = json.loads(out.read_text())
    assert list(report["runs"]) == ["bn+basic/seed0"]
    for domain in ("tecom", "cellavision-blog"):
        figures = report["runs"]["bn+basic/seed0"][domain]
        assert set(figures) == {"before_balanced_accuracy", "adabn_balanced_accuracy"}
        assert all(0.0 <= v <= 1.0 for v in figures.values())
    assert "gn+basic/seed0: no weights.pt" in capsys.readouterr().err
