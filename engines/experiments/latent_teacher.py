"""A diffusion teacher (latent, or the pixel teacher of engines.diffusion) measured like the student: PBC
test figures from its label file, agreement with each student, its validation calibration (pruning study
included), and its training budget and loss curve from the checkpoint.

    python -m engines.experiments.latent_teacher --teacher .cache/latent/teacher.pt \
        --test .cache/latent/teacher-test.npz --calib .cache/latent/teacher-calib.json \
        --students engines/models/student-v1 --out engines/experiments/results/latent_teacher.json

Figures come from the saved denoising errors (computed once by ``engines.latent label``); the training
curve and budget from the checkpoint. Nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from engines import pbc
from engines.baseline import TrainConfig, prepare_data
from engines.compare import cohen_kappa, onnx_outputs, prob_report
from engines.teacher import load_labels, summarise


def _curve(history: list[dict], points: int = 12) -> list[dict]:
    """A readable subsample of the loss curve (first, last and evenly spaced rows)."""
    if len(history) <= points:
        return history
    keep = np.unique(np.linspace(0, len(history) - 1, points).round().astype(int))
    return [history[i] for i in keep]


def measure(teacher: Path, test: Path, calib_path: Path, students: list[Path], root: Path) -> dict:
    state = torch.load(teacher, map_location="cpu", weights_only=False)
    calib = json.loads(calib_path.read_text())
    lab = load_labels(test)
    data = prepare_data(root, TrainConfig())
    index = lab["index"]  # the labelled test cells (a class-stratified subset when labelling all was too dear)
    if list(map(str, lab["paths"])) != [data.paths["test"][i] for i in index]:
        raise SystemExit(f"{test} does not match the test split")
    labels, classes = data.labels["test"][index], data.classes
    summ = summarise(lab["errors"], calib["tau"])
    t_pred = summ["posterior"].argmax(1)
    report = {
        "teacher": {"checkpoint": teacher.name, "params": state["params"], "macs_per_pass": state["macs"],
                    "steps": state["step"], "train_minutes": round(state["elapsed"] / 60, 1),
                    "config": state["config"], "loss_curve": _curve(state["history"]),
                    "split_sha256": state["split_sha256"]},
        "scoring": {"timesteps": [int(t) for t in lab["timesteps"]], "tau": calib["tau"],
                    "passes_per_cell": float(lab["passes"].mean()), "ms_per_cell": float(lab["ms_per_cell"]),
                    "validation_accuracy": calib["val_accuracy"], "validation_n": calib["val_n"],
                    "pruning_on_validation": calib["pruning"]},
        "test": {**prob_report(summ["posterior"], labels, summ["uncertainty"], classes), "n": len(labels),
                 "of_split": len(data.labels["test"]), "labelled": json.loads(str(lab["config"]))},
        "students": {},
    }
    ae = state.get("autoencoder")  # the latent teacher's; the pixel teacher has none
    if ae:
        report["teacher"]["autoencoder"] = {"params": ae["params"], "steps": ae["step"],
                                            "train_minutes": round(ae["elapsed"] / 60, 1), "config": ae["config"],
                                            "curve": _curve(ae["history"])}
    for folder in students:
        out = onnx_outputs(folder / "model.onnx", data.images["test"][index])
        s_pred = out["probs"].argmax(1)
        report["students"][folder.name] = {
            "balanced_accuracy": prob_report(out["probs"], labels, out["uncertainty"], classes)["balanced_accuracy"],
            "teacher_student_top1": float((t_pred == s_pred).mean()),
            "teacher_student_kappa": cohen_kappa(t_pred, s_pred, len(classes))}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.experiments.latent_teacher",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True, help="engines.latent label --split test output")
    parser.add_argument("--calib", type=Path, required=True, help="engines.teacher calibrate output (validation)")
    parser.add_argument("--students", type=Path, nargs="*", default=[])
    parser.add_argument("--data", default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    report = measure(args.teacher, args.test, args.calib, args.students, pbc.data_dir(args.data))
    pbc.atomic_write_json(args.out, report)
    t = report["test"]
    print(f"teacher on PBC test: bal_acc {t['balanced_accuracy']:.4f} acc {t['accuracy']:.4f} "
          f"ece {t['ece']:.4f}; agreement {json.dumps(report['students'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
