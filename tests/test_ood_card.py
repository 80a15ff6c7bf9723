"""Out-of-domain figures in a model card: the alarm simulation behind the card's "with the domain alarm"
column, and the card block that `engines.evaluate --ood --write` refreshes in place."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge.drift import FEATURES, Reference
from engines.ood_card import BEGIN, END, alarm_stream, update_card


def cells(rng: np.random.Generator, n: int, shift: float) -> tuple[list[str], dict[str, np.ndarray], np.ndarray]:
    labels = list(rng.choice(["neutrophil", "lymphocyte"], size=n))
    values = {name: rng.normal(0.5 + shift, 0.05, n).astype(np.float32) for name in ("anomaly", "uncertainty")}
    colour = rng.normal(0.7 + shift, 0.03, n).astype(np.float32)
    crops = np.repeat((colour * 255).astype(np.uint8)[:, None, None, None], 3, axis=3)
    crops = np.broadcast_to(crops, (n, 16, 16, 3)).copy()
    return labels, values, crops


def reference(rng: np.random.Generator) -> Reference:
    labels, values, crops = cells(rng, 400, 0.0)
    colour = crops[:, 4, 4, :].astype(np.float32) / 255.0
    samples = {**values, **{f"colour_{i}": colour[:, i] for i in range(3)}}
    assert set(samples) == set(FEATURES)
    return Reference.from_samples(samples, np.array(labels))


def test_alarm_stream_never_fires_in_domain_and_flags_foreign_cells_from_the_first_verdict() -> None:
    rng = np.random.default_rng(0)
    ref = reference(rng)
    labels, values, crops = cells(rng, 200, 0.0)
    review = np.zeros(200, bool)
    home = alarm_stream(ref, labels, values["anomaly"], values["uncertainty"], crops, review, orders=3)
    assert home["never_on"] == 3  # in domain only the first 59 cells, before a full familiar window, are flagged
    assert home["flagged_share_with_alarm"] == 59 / 200
    labels, values, crops = cells(rng, 200, 0.1)
    away = alarm_stream(ref, labels, values["anomaly"], values["uncertainty"], crops, review, orders=3)
    assert away["never_on"] == 0 and away["cells_before_on_max"] == 30  # on at the first verdict
    assert away["flagged_share_with_alarm"] > 0.8


def test_alarm_stream_without_a_reference_reports_nothing() -> None:
    crop = np.zeros((1, 4, 4, 3), np.uint8)
    assert alarm_stream(None, ["a"], np.zeros(1), np.zeros(1), crop, np.zeros(1, bool)) is None


def ood_report(model_id: str) -> dict:
    domain = {"n": 10, "um_per_px": 0.2, "balanced_accuracy": 0.5, "per_class_recall": {"neutrophil": 0.5},
              "support": {"neutrophil": 10}, "ece": 0.3, "mean_confidence": 0.9, "review_share": 0.1,
              "accuracy_not_reviewed": 0.5, "predicted": {"neutrophil": 5}, "alarm": None}
    return {"model": model_id, "review_rule": "uncertainty > 0.5 or anomaly > 0.5", "scales": {},
            "domains": {"tecom": domain}, "pbc_test": None}


def test_card_block_is_added_once_and_refreshed_in_place(tmp_path: Path) -> None:
    (tmp_path / "card.json").write_text(json.dumps({"name": "student"}))
    (tmp_path / "card.md").write_text("# Model card: student\n\nWritten by another engine.\n")
    adaptation = {"epochs": 30, "seeds": 3, "domains": {"tecom": {"n_test": 150, "n_pool": 150, "results": [
        {"n_labels": 50, "method": "bn+all+replay",
         "mean_sd": {"balanced_accuracy": [0.876, 0.03], "ece": [0.09, 0.0], "pbc_balanced_accuracy": [0.93, 0.0]}}]}}}
    update_card(tmp_path, ood_report("m-1@aaa"), adaptation)
    update_card(tmp_path, ood_report("m-1@aaa"), None)  # refresh without re-running adaptation
    text = (tmp_path / "card.md").read_text()
    assert text.startswith("# Model card: student\n\nWritten by another engine.")
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert "| tecom | 10 | 0.200 | 50.0% |" in text and "87.6 ± 3.0%" in text
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["name"] == "student" and card["out_of_domain"]["domains"]["tecom"]["n"] == 10
    assert card["adaptation"]["model_id"] == "m-1@aaa"


def test_card_names_the_default_method_and_keeps_runs_without_their_confusion_matrices(tmp_path: Path) -> None:
    run = {"seed": 0, "balanced_accuracy": 0.9, "confusion": [[1, 0], [0, 1]]}
    summary = {"balanced_accuracy": [0.9, 0.0], "ece": [0.1, 0.0], "pbc_balanced_accuracy": [0.96, 0.0]}
    adaptation = {"epochs": None, "seeds": 1, "default_method": "bn+all+lwf", "domains": {"tecom": {
        "n_test": 2, "n_pool": 2, "results": [{"n_labels": 50, "method": "bn+all+lwf", "runs": [run],
                                                "mean_sd": summary}]}}}
    update_card(tmp_path, ood_report("m-1@aaa"), adaptation)
    kept = json.loads((tmp_path / "card.json").read_text())["adaptation"]["domains"]["tecom"]["results"][0]["runs"]
    assert kept == [{"seed": 0, "balanced_accuracy": 0.9}]
    text = (tmp_path / "card.md").read_text()
    assert "| bn+all+lwf (`cytoedge adapt`) |" in text and "each method's own fine-tuning epochs" in text


def test_adaptation_figures_of_another_model_file_are_dropped(tmp_path: Path) -> None:
    adaptation = {"epochs": 30, "seeds": 1, "domains": {}}
    update_card(tmp_path, ood_report("m-1@aaa"), adaptation)
    update_card(tmp_path, ood_report("m-2@bbb"), None)
    assert "adaptation" not in json.loads((tmp_path / "card.json").read_text())
    assert "Adapting to a site" not in (tmp_path / "card.md").read_text()
