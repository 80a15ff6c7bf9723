"""A diffusion teacher's accuracy against its training steps: copies of the checkpoint taken while it trained,
each labelled on the same validation cells and calibrated (``engines.teacher label --split val --per-class 40
--no-prune`` then ``engines.teacher calibrate``), gathered into one file with the loss at each point.

    python -m engines.experiments.teacher_curve --points SNAP.pt SNAP-calib.json [--points ...] \
        --out engines/experiments/results/teacher_long_curve.json

It answers "is it still learning?" with the classifier's own figure, not only the denoising loss.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from engines import pbc


def point(checkpoint: Path, calib_path: Path) -> dict:
    """One row: steps, minutes and recent loss from the checkpoint; validation accuracy unpruned, with the
    pruning ``engines.teacher label`` uses by default, and with the best pruning the calibration simulated."""
    from engines.teacher import ScoreConfig

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    calib = json.loads(calib_path.read_text())
    loss = state["history"][-1]["loss"] if state["history"] else None
    default = ScoreConfig()
    pruning = calib["pruning"]
    best = max(pruning, key=lambda p: (p["accuracy"], -p["passes"])) if pruning else None
    return {"checkpoint": checkpoint.name, "step": state["step"], "train_minutes": round(state["elapsed"] / 60, 1),
            "loss": None if loss is None else round(float(loss), 4), "val_accuracy": calib["val_accuracy"],
            "val_n": calib["val_n"], "tau": calib["tau"],
            "pruned_default_accuracy": next((p["accuracy"] for p in pruning if p["prune_after"] == default.prune_after
                                             and p["keep"] == default.keep), None),
            "pruned_best": best,
            "pruned_4_keep_4_accuracy": next((p["accuracy"] for p in pruning
                                              if p["prune_after"] == 4 and p["keep"] == 4), None)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.experiments.teacher_curve",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--points", nargs=2, action="append", type=Path, required=True,
                        metavar=("CHECKPOINT", "CALIB"), help="a checkpoint copy and its validation calibration")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    missing = [str(p) for pair in args.points for p in pair if not p.is_file()]
    if missing:
        print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    rows = sorted((point(c, v) for c, v in args.points), key=lambda r: r["step"])
    pbc.atomic_write_json(args.out, {"points": rows})
    for r in rows:
        print(f"step {r['step']:6d} ({r['train_minutes']:5.1f} min) loss {r['loss']} val {r['val_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
