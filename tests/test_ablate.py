"""The augmentation ablation (engines/ablate.py): each variant is a real pipeline that drops exactly its
group, variants never share a checkpoint, and the results file, resume and table work without training."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import PBC_MINI

pytest.importorskip("torch", reason="the ablation trains with torch (the [train] extra)")

from engines import augment, baseline, pbc
from engines.experiments import ablate


def real_crops(n: int = 4) -> np.ndarray:
    """PBC crops decoded as training sees them (64 px uint8 BGR), one per class."""
    paths = sorted(PBC_MINI.glob("*/*.jpg"))[:: 12][:n]
    return np.stack([pbc.load_crop_bgr(p, baseline.INPUT_SIZE) for p in paths])


def test_groups_partition_the_robust_ops() -> None:
    grouped = [op for ops in augment.GROUPS.values() for op in ops]
    assert sorted(grouped) == sorted(step.op for step in augment.PIPELINES["robust"].steps)
    assert len(grouped) == len(set(grouped)), "an op in two groups would be left out twice"


@pytest.mark.parametrize("group", sorted(augment.GROUPS))
def test_each_leave_out_applies_everything_but_its_group(group: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"robust-no-{group}"
    assert name in ablate.VARIANTS
    variant, robust = augment.PIPELINES[name], augment.PIPELINES["robust"]
    # Same probabilities and strengths for the ops that stay, in the same order.
    assert variant.steps == tuple(s for s in robust.steps if s.op not in augment.GROUPS[group])
    # Run it for real on a real crop with every step forced on, recording which ops actually ran.
    called: list[str] = []

    def spy(op_name: str) -> augment.Op:
        real = augment.OPS[op_name]
        return lambda image, rng, strength: (called.append(op_name), real(image, rng, strength))[1]

    monkeypatch.setattr(augment, "OPS", {k: spy(k) for k in augment.OPS})
    always = augment.Pipeline(tuple(dataclasses.replace(s, p=1.0) for s in variant.steps))
    crop = real_crops(1)[0]
    out = always(crop, np.random.default_rng(0))
    assert called == [s.op for s in robust.steps if s.op not in augment.GROUPS[group]]
    assert out.shape == crop.shape and out.dtype == np.uint8 and not np.array_equal(out, crop)


@pytest.mark.parametrize("variant", [v for v in ablate.VARIANTS if v != "basic"])
def test_variant_runs_through_the_training_entry_point(variant: str) -> None:
    """baseline.train calls augment_batch(batch, cfg.augment, rng) for every non-basic variant."""
    crops = real_crops()
    a = augment.augment_batch(crops, variant, np.random.default_rng([0, 1, 2]))
    b = augment.augment_batch(crops, variant, np.random.default_rng([0, 1, 2]))
    assert a.shape == crops.shape and a.dtype == np.uint8 and np.array_equal(a, b)


def test_variants_get_distinct_checkpoints() -> None:
    """ablate resumes every variant from its checkpoint: a shared run key would silently reuse one
    variant's model for another."""
    data = baseline.PreparedData([], [], [], {}, {"train": np.zeros(3)}, {}, {"sha256": "x"})
    keys = {baseline.run_key(baseline.TrainConfig(epochs=8, augment=v), data) for v in ablate.VARIANTS}
    assert len(keys) == len(ablate.VARIANTS)


def ood_report(tecom: float, blog: float) -> dict:
    """The fields of engines.ood.evaluate_model's report that the ablation reads."""
    def domain(acc: float) -> dict:
        return {"balanced_accuracy": acc, "ece": 0.5, "review_share": 0.04, "mean_confidence": 0.9, "n": 111,
                "per_class_recall": {"basophil": 1.0, "lymphocyte": 0.1, "neutrophil": 0.4},
                "support": {"basophil": 1, "lymphocyte": 50, "neutrophil": 60}}
    return {"domains": {"tecom": domain(tecom), "cellavision-blog": domain(blog)},
            "pbc_test": {"balanced_accuracy": 0.97, "ece": 0.01, "review_share": 0.003, "n": 9}}


def test_summary_and_table() -> None:
    rows = [ablate.summarise("basic", ood_report(0.094, 0.427), {"train_seconds": 250.0}),
            ablate.summarise("robust-no-scale", ood_report(0.25, 0.33), {"train_seconds": 390.0})]
    assert rows[0]["pipeline"] == "none" and "scale" not in rows[1]["pipeline"]
    tecom = rows[1]["domains"]["tecom"]
    assert tecom["balanced_accuracy"] == 0.25
    # The lone basophil is left out of the common-class recall: (0.1 + 0.4) / 2.
    assert tecom["common_classes"] == ["lymphocyte", "neutrophil"] and tecom["common_recall"] == 0.25
    lines = ablate.table(rows).splitlines()
    assert len(lines) == 4
    assert lines[2] == "| basic | 97.0% | 9.4% | 25.0% | 0.500 | 4.0% | 42.7% | 25.0% | 0.500 | 4.0% | 4.2 |"
    assert lines[3].startswith("| robust-no-scale | 97.0% | 25.0% |") and lines[3].endswith("| 6.5 |")


def test_rerun_skips_finished_variants_and_refuses_another_protocol(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.csv").write_text("path,label\n")  # present, so main gets past the data check
    row = ablate.summarise("robust", ood_report(0.25, 0.33), {"train_seconds": 60.0})
    record = {"protocol": {"epochs": 8, "seed": 0, "preset": "full", "threads": 1},
              "scales": {"tecom": {"um_per_px": 0.188}}, "variants": {"robust": row}}
    out = tmp_path / "ablation"
    out.mkdir()
    (out / "ablation.json").write_text(json.dumps(record))
    common = ["--out", str(out), "--data", str(data), "--wbc-shift", str(data), "--variants", "robust"]
    assert ablate.main([*common, "--epochs", "8"]) == 0
    printed = capsys.readouterr().out
    assert "robust: done already, skipped" in printed and "| robust | 97.0% | 25.0% |" in printed
    with pytest.raises(SystemExit, match="use another --out"):
        ablate.main([*common, "--epochs", "6"])
    assert json.loads((out / "ablation.json").read_text()) == record, "a refused rerun must not touch the file"
