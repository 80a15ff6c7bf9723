"""The learned finder's model card: data, split, training and figures per microscope (with leave-one-out).

    python -m engines.detector.card [--model engines/models/detector-v1]

Figures are measured as ``engines.finder.bench`` measures the classic finder: each source's **test**
frames, at the scale ``calibrate`` estimates from its unlabelled val+test frames, matched at IoU 0.5.
The leave-one-out column runs the detector trained without that microscope
(``engines/finder/loo/detector-without-*.onnx``). Written to card.json and card.md (engines/card.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
from pathlib import Path

import onnx

from edge.learnedfinder import METADATA_KEY, LearnedFinder
from engines import card as cards
from engines.finder.bench import LOO_DIR, MACHINE, MICROSCOPE, Score, score, site_frames
from engines.finder.data import SOURCES, available, frames

DEFAULT_DIR = Path(__file__).resolve().parents[1] / "models" / "detector-v1"


def figures(s: Score) -> dict[str, float | int]:
    return {"frames": s.frames, "wbc_recall": round(s.recall("wbc"), 3), "wbc_precision": round(s.precision("wbc"), 3),
            "wbc": [s.tp["wbc"], s.truth["wbc"], s.found["wbc"]],
            "platelet_recall": round(s.recall("platelet"), 3), "platelet_precision": round(s.precision("platelet"), 3),
            "platelet": [s.tp["platelet"], s.truth["platelet"], s.found["platelet"]],
            "rbc_found_over_boxed": round(s.count_ratio("rbc"), 3), "ms_per_frame": round(sum(s.ms) / len(s.ms), 1)}


def measure(model_dir: Path) -> dict[str, dict]:
    from edge.calibrate import estimate_um_per_px

    shipped = LearnedFinder(model_dir / "model.onnx")
    out: dict[str, dict] = {}
    for source in SOURCES:
        scale = estimate_um_per_px(site_frames(source, 60)).um_per_px
        test = [f for f in frames(source) if f.split == "test"]
        row = {"um_per_px_estimated": round(scale, 4), "shipped": figures(score(test, scale, shipped.find))}
        loo = LOO_DIR / f"detector-without-{MICROSCOPE[source]}.onnx"
        if loo.is_file():
            row["leave_one_out"] = figures(score(test, scale, LearnedFinder(loo).find))
        out[source] = row
        print(source, json.dumps(row), flush=True)
    return out


def training_summary(model_dir: Path) -> dict:
    path = model_dir / "loss.csv"
    if not path.is_file():
        return {}
    rows = list(csv.DictReader(path.open()))
    last = rows[-1]
    return {"steps": int(last["step"]), "cpu_seconds_wall": int(float(last["seconds"])),
            "final_loss": float(last["loss"]), "loss_at": {r["step"]: float(r["loss"]) for r in rows[::30]}}


def render(title: str, meta: dict, results: dict[str, dict], training: dict) -> str:
    lines = [f"# Model card: {title} (learned cell finder, {meta['name']} version {meta['version']})", "",
             "A CenterNet-style heat-map detector (white cell / red cell / platelet) on a small encoder-decoder "
             "(`engines/detector/model.py`), seeing the frame as optical density relative to its own plasma at "
             f"{meta['work_um_per_px']} µm/px. Runs with ONNX Runtime (`edge/learnedfinder.py`); "
             "`[detector] method = \"learned\"` selects it.", "",
             "## Data and licence", "",
             "- Trained on the **train** split of TXL-PBC (Gan & Li, arXiv:2407.13214, MIT): its re-annotated "
             "frames of three microscopes — BCCD (Shenggan/BCCD_Dataset, MIT), BCD and Raabin-WBC — with every "
             "white cell, red cell and platelet boxed. TXL-PBC bccd train frames that are copies of a BCCD VOC "
             "val/test frame are dropped, so the BCCD VOC test row is unseen.",
             "- Thresholds per class: the F1-best on the **val** split of the training microscopes.",
             "- Figures: the **test** split of each source, at the µm/px `calibrate` estimated from its "
             "unlabelled val+test frames (not the true scale), IoU 0.5.", "",
             "## Training", "",
             f"- `python -m engines.detector.train --preset full` then `python -m engines.detector.export`: "
             f"{training.get('steps', '?')} steps of 16 random 192 px squares (scale ×0.8–1.25, defocus, gamma, "
             "white balance, noise, random stain mix in optical density, flips and quarter turns), "
             f"{training.get('cpu_seconds_wall', 0) / 60:.0f} min wall-clock on a {MACHINE} (shared with two other "
             "engineers' jobs; about 10 min when it had the machine, as the leave-one-out runs did); "
             f"final loss {training.get('final_loss', float('nan')):.3f} (loss.csv).", "",
             f"Thresholds: {json.dumps(meta['thresholds'])}", "",
             "## Figures per microscope", "",
             "| source | test frames | µm/px used | WBC recall | WBC precision | platelet recall | platelet precision "
             "| red cells found / boxed | leave-one-microscope-out WBC recall / precision / platelet recall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for source, row in results.items():
        s = row["shipped"]
        loo = row.get("leave_one_out")
        held = ("—" if not loo else
                f"{loo['wbc_recall']:.3f} / {loo['wbc_precision']:.3f} / {loo['platelet_recall']:.3f}")
        lines.append(f"| {source} | {s['frames']} | {row['um_per_px_estimated']} | {s['wbc_recall']:.3f} "
                     f"| {s['wbc_precision']:.3f} | {s['platelet_recall']:.3f} | {s['platelet_precision']:.3f} "
                     f"| {s['rbc_found_over_boxed']:.2f} | {held} |")
    lines += ["", f"Measured by `python -m engines.detector.card` on a {MACHINE} ({platform.machine()}).",
              "BCCD VOC boxes under-count red cells, so its red-cell ratio only says more were found than boxed.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args(argv)
    if not available():
        print("the shared data (../shared/data: txl-pbc, bccd) is not here", file=sys.stderr)
        return 2
    proto = onnx.load(str(args.model / "model.onnx"), load_external_data=False)
    meta = json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
    results = measure(args.model)
    training = training_summary(args.model)
    card = {"format": cards.FORMAT, "kind": "detector", "metadata": meta, "training": training,
            "data": {"train": "TXL-PBC train (bccd, bcd, raabin), BCCD VOC val/test copies dropped",
                     "licence": "TXL-PBC MIT; BCCD MIT"},
            "figures": results}
    cards.save(args.model, card, render(args.model.name, meta, results, training))
    print(f"wrote {args.model / 'card.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
