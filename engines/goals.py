"""Issue 15's goals against what a model's card measured: a marked block of card.md, every figure read from
card.json (and the teacher's results file), none typed in.

    python -m engines.goals engines/models/student-v1 --teacher engines/experiments/results/teacher_long.json

Sources: ``evaluation`` (engines.compare, PBC test split), ``out_of_domain`` and ``adaptation`` (engines.evaluate
--ood --adapt), ``held_back`` (engines.heldback), and the teacher's measurements. A goal without a measurement
is listed as not measured, never as met.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from engines import pbc

BEGIN = "<!-- cytoedge:goals-issue15:begin -->"
END = "<!-- cytoedge:goals-issue15:end -->"
LABELS = 50


def _curve_row(card: dict, domain: str, n_labels: int, method: str) -> dict | None:
    """mean_sd of one row of the card's adaptation curve."""
    rows = card.get("adaptation", {}).get("domains", {}).get(domain, {}).get("results", [])
    row = next((r for r in rows if r["n_labels"] == n_labels and r["method"] == method), None)
    return row["mean_sd"] if row else None


def _adapted(card: dict, domain: str) -> dict | None:
    # The method `cytoedge adapt` used when the card was measured (cards before it was recorded: bn+all+replay).
    return _curve_row(card, domain, LABELS, card.get("adaptation", {}).get("default_method", "bn+all+replay"))


def _control_calibrated(card: dict, domain: str) -> float | None:
    """Balanced accuracy of the frames-only site model calibrated on a (simulated) normal control run."""
    row = _curve_row(card, domain, 0, "bn+normal")
    return row["balanced_accuracy"][0] if row else None


def goals(card: dict, teacher: dict | None) -> list[dict]:
    """(goal, measured, target, met, note) rows; measured None = not measured. A row may carry a fifth value,
    a figure the measurement must also beat (the CNN's, for the held-out-class AUROC)."""
    student = card.get("evaluation", {}).get("student", {})
    ood = card.get("out_of_domain", {}).get("domains", {})
    held = card.get("held_back", {}).get("models", {}).get(card.get("model", {}).get("name", ""), {})
    rows = [("PBC test balanced accuracy ≥ 0.975", student.get("balanced_accuracy"), 0.975, "this repository's split"),
            ("held-back PBC balanced accuracy ≥ 0.975", held.get("pbc_heldback"), 0.975, "issue 15, measured outside"),
            ("ECE ≤ 0.03 (PBC test)", student.get("ece"), 0.03, "lower is better")]
    for domain in ("tecom", "cellavision-blog"):
        calibrated = _control_calibrated(card, domain)
        rows.append((f"{domain} balanced accuracy ≥ 0.80 without site labels",
                     ood.get(domain, {}).get("balanced_accuracy"), 0.80, "wbc-shift, matched scale, the shipped model"
                     + ("" if calibrated is None else f"; {calibrated:.2f} (test half) after `cytoedge adapt "
                        "--normal-controls` on a normal control run, still no labels")))
        adapted = _adapted(card, domain)
        rows.append((f"{domain} ≥ 0.92 with {LABELS} site labels (cytoedge adapt)",
                     adapted["balanced_accuracy"][0] if adapted else None, 0.92, "test half, 3 seeds"))
        rows.append((f"PBC ≥ 0.97 after adapting to {domain}",
                     adapted["pbc_balanced_accuracy"][0] if adapted else None, 0.97, "3 seeds"))
    rows.append(("BCCD white cells balanced accuracy ≥ 0.80", held.get("bccd_white"), 0.80,
                 "issue 15, measured outside"))
    if teacher:
        info = teacher.get("teacher", {})
        kind = ("latent teacher" if "autoencoder" in info else
                "pixel teacher" + (f", {info['steps']:,} steps" if "steps" in info else ""))
        rows.append(("teacher PBC balanced accuracy ≥ 0.95", teacher["test"]["balanced_accuracy"], 0.95,
                     f"{kind}, n = {teacher['test']['n']}"))
        top1 = teacher["students"].get(card.get("model", {}).get("name", ""), {}).get("teacher_student_top1")
        rows.append(("teacher–student agreement ≥ 97%", top1, 0.97, f"{kind} vs this student"))
    anomaly = card.get("evaluation", {}).get("anomaly")  # engines.compare's held-out-class test
    if anomaly and anomaly.get("teacher"):
        primary = anomaly.get("teacher_primary", "lr_gap")
        cnn = anomaly.get("baseline", {}).get("maxprob")
        rows.append(("held-out-class AUROC ≥ 0.95 and above the CNN's", anomaly["teacher"][primary], 0.95,
                     f"teacher without {anomaly['held_out']}, {primary}"
                     + ("" if cnn is None else f"; the CNN's max-softmax {cnn:.3f}"), cnn))
    else:
        rows.append(("held-out-class AUROC ≥ 0.95 and above the CNN's", None, 0.95,
                     "needs a second teacher trained without a class"))
    out = []
    for goal, measured, target, note, *beat in rows:
        lower_better = goal.startswith("ECE")
        met = None if measured is None else (measured <= target if lower_better else measured >= target)
        if met and beat and beat[0] is not None:
            met = measured > beat[0]
        out.append({"goal": goal, "measured": measured, "target": target, "met": met, "note": note,
                    "gap": None if measured is None else round(target - measured if not lower_better
                                                               else measured - target, 4)})
    return out


def render(rows: list[dict], tried: list[str]) -> str:
    lines = [BEGIN, "## Goals of issue 15", "",
             "Written by `python -m engines.goals` from this card's measurements (and the teacher's results file); "
             "a goal without a measurement is not counted as met.", "",
             "| goal | measured | met | short by | where |", "|---|---|---|---|---|"]
    for r in rows:
        measured = "not measured" if r["measured"] is None else f"{r['measured']:.3f}"
        met = "—" if r["met"] is None else ("yes" if r["met"] else "**no**")
        gap = "" if r["met"] in (None, True) else f"{r['gap']:.3f}"
        lines.append(f"| {r['goal']} | {measured} | {met} | {gap} | {r['note']} |")
    lines += ["", "What was tried (details and figures: docs/diffusion.md §7, docs/robustness.md):", "",
              *(f"- {t}" for t in tried), "", END]
    return "\n".join(lines)


TRIED = [
    "A latent diffusion teacher (autoencoder trained under colour/optics augmentation, class-conditional UNet in "
    "its 16×16×4 latent, diffusion-classifier scoring): 40 CPU minutes, 1,041 steps; below the pixel teacher in "
    "domain, not better out of domain overall; so it did not replace the teacher.",
    "Distilling students on the teacher's posterior over unlabelled white cells of three other microscopes "
    "(txl-pbc), against the same student without them (docs/robustness.md, foreign-cell lever).",
    "Normalisation (BatchNorm / GroupNorm / layer norm) × colour/optics augmentation, 3 seeds at three budgets: at "
    "3,200 crops × 10 epochs GroupNorm or layer norm with the augmentation beat BatchNorm on tecom (0.59 / 0.58 vs "
    "0.35) and cellavision-blog (0.42 vs 0.33) at 0.64–0.67 in domain; trained further (7,210 crops × 20 epochs) "
    "GroupNorm reached 0.92 in domain and fell back to 0.31 on tecom (cellavision-blog 0.41): the gain was a stage "
    "of training, so no student was distilled on that body (docs/robustness.md).",
    "Greyscale input (luminance only, in the graph), 3 seeds at 3,200 crops × 10 epochs: tecom 0.08 with the basic "
    "recipe (colour: 0.28) and 0.32 with the augmentation (colour: 0.35); the foreign microscopes break more than "
    "colour.",
    "Fourier amplitude mixing (FACT) with other microscopes' unlabelled white cells as donors, 3 seeds at 3,200 "
    "crops × 10 epochs and at 7,210 × 20: tecom +3 and +5 points (0.37 at the larger budget), cellavision-blog −4 "
    "and ±0, PBC −1–2: a small gain that held with training, far from the goal (docs/robustness.md).",
    "Input resolution (detail limited to 32 or 16 px across the field, in the graph), from scratch and from "
    "converged weights, 3 seeds: 1–11 points worse on tecom, no better on cellavision-blog.",
    "Plasma-relative input normalisation (optical density against each crop's own plasma, in the graph): invariant to "
    "a lamp/camera gain as designed, but 6–24 points worse on both foreign sets (docs/robustness.md).",
    "Other microscopes' unlabelled white cells (txl-pbc) in training without a teacher: as style donors for feature-"
    "style mixing (MixStyle), and as targets of a FixMatch-style consistency loss, with leave-one-microscope-out "
    "folds, 3 seeds; neither beat the colour/optics augmentation alone on tecom or cellavision-blog, and label-free "
    "batch-norm re-estimation at the site did not stack with that augmentation. Fine-tuning a converged network "
    "with them (3 seeds) moved tecom 2–6 points (0.47 → 0.49–0.52) and cellavision-blog +2 (style donors) or −6 "
    "(consistency, which also called every BCCD and BCD white cell one class) (docs/robustness.md).",
    "`cytoedge adapt` from the student (its weights unfolded from the ONNX file): batch-norm re-estimation and "
    "fine-tuning with PBC replay, 0/20/50/100 labels, 3 seeds (the adaptation table above). Since issue 15's last "
    "round the replay crops also keep the posterior the starting model gave them (learning without forgetting), at "
    "a third of the rate for 100 epochs (`bn+all+lwf`, chosen on the tecom pool and PBC validation among 18 "
    "methods): for student-v1 with 50 labels PBC after adapting went 0.88 / 0.90 → 0.96 / 0.96 and tecom 0.84 → "
    "0.88; cellavision-blog stayed at 0.64 (one basophil in its 50 test cells, lymphocytes called monocytes). "
    "Self-training on the unlabelled pool after it lowered tecom (docs/robustness.md, 'Keeping PBC while adapting').",
    "Without labels, calibrating the class balance on a normal control run (`cytoedge adapt --normal-controls`: "
    "batch-norm re-estimation, then per-class offsets so the controls read as a normal differential), 3 seeds on a "
    "control run simulated from the pool: tecom 0.39 → 0.66 for student-v1 and 0.58 → 0.77 for baseline-robust, "
    "cellavision-blog 0.45 → 0.48 (0.38–0.49 → 0.48–0.53 for the others): the first label-free gain on both sets "
    "and every model, short of 0.80; after fine-tuning on 50 labels it hurt (tecom 0.88 → 0.79), so it is used "
    "for frames-only site models (docs/robustness.md, 'Calibrating on normal control smears').",
]


def update_card(model_dir: Path, teacher: dict | None) -> list[dict]:
    card_path = Path(model_dir) / "card.json"
    card = json.loads(card_path.read_text(encoding="utf-8"))
    rows = goals(card, teacher)
    card["goals_issue15"] = rows
    pbc.atomic_write_json(card_path, card)
    md_path = Path(model_dir) / "card.md"
    text = md_path.read_text(encoding="utf-8")
    section = render(rows, TRIED)
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section + "\n"
    pbc.atomic_write_text(md_path, text)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.goals", description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="model folder with card.json / card.md")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="engines.experiments.latent_teacher output (either teacher)")
    args = parser.parse_args(argv)
    teacher = json.loads(args.teacher.read_text()) if args.teacher else None
    for row in update_card(args.model, teacher):
        print(("MET    " if row["met"] else "MISSED " if row["met"] is False else "n/a    ") + row["goal"],
              row["measured"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
