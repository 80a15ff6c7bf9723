"""Out-of-domain and adaptation figures in a model card, written by ``python -m engines.evaluate``.

A lab deciding whether to trust a model at *its* microscope needs the in-domain figures and the
foreign-microscope figures side by side, plus what adapting buys. Both land in ``card.json``
(``out_of_domain``, ``adaptation``) and in a marked block of ``card.md``, so the block can be refreshed
without touching the rest of a card written by another engine (baseline or student).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.drift import DomainAlarm, Reference, features, stream
from engines import card

BLOCK = "out-of-domain"
BEGIN, END = card.markers(BLOCK)


def alarm_stream(reference: Reference | None, labels: list[str], anomaly: np.ndarray, uncertainty: np.ndarray,
                 crops: np.ndarray, review: np.ndarray, orders: int = 20, seed: int = 0) -> dict | None:
    """The service's domain alarm over a domain's cells, one cell at a time in random orders: how many
    cells pass before it comes on, and what share of cells is flagged once the alarm's flags are added to
    the per-cell review rule (as in the service: every cell while the alarm is on, and every cell before
    its first verdict, ``drift.flag_until_checked``)."""
    if reference is None or not len(labels):
        return None
    values = features(anomaly, uncertainty, crops)
    rng = np.random.default_rng(seed)
    first_on: list[int] = []
    flagged = total = 0
    for _ in range(orders):
        alarm = DomainAlarm(reference)
        on_at = None
        for step, index in enumerate(stream(alarm, labels, values, rng.permutation(len(labels)))):
            if alarm.active and on_at is None:
                on_at = step + 1
            flagged += bool(alarm.flags_cells or review[index])
            total += 1
        first_on.append(on_at if on_at is not None else -1)
    never = sum(1 for x in first_on if x < 0)
    fired = [x for x in first_on if x > 0]
    return {"orders": orders, "window": alarm.window, "never_on": never,
            "cells_before_on_median": float(np.median(fired)) if fired else None,
            "cells_before_on_max": int(max(fired)) if fired else None,
            "flagged_share_with_alarm": round(flagged / total, 4)}


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _alarm_cells(alarm: dict | None) -> tuple[str, str]:
    if alarm is None:
        return "no reference", "—"
    if alarm["cells_before_on_median"] is None:
        return _pct(alarm["flagged_share_with_alarm"]), "never on"
    return (_pct(alarm["flagged_share_with_alarm"]),
            f"{alarm['cells_before_on_median']:.0f} (max {alarm['cells_before_on_max']}; never in "
            f"{alarm['never_on']}/{alarm['orders']})")


def _adaptation_rows(adaptation: dict) -> list[str]:
    rows = ["| domain | site labels | method | balanced accuracy (mean ± sd) | ECE | PBC balanced accuracy after |",
            "|---|---|---|---|---|---|"]
    for domain, block in adaptation["domains"].items():
        for result in block["results"]:
            summary = result["mean_sd"]
            mean, sd = summary["balanced_accuracy"]
            method = result["method"] + (" (`cytoedge adapt`)" if result["method"] == adaptation.get("default_method")
                                         else "")
            rows.append(f"| {domain} | {result['n_labels']} | {method} | {100 * mean:.1f} ± {100 * sd:.1f}% "
                        f"| {summary['ece'][0]:.3f} | {_pct(summary['pbc_balanced_accuracy'][0])} |")
    return rows


def _teacher_rows(teacher: dict) -> list[str]:
    rows = ["", "### The diffusion teacher on the same cells", "",
            f"Scored with its own code (`python -m engines.experiments.ood_teacher`, "
            f"K = {len(teacher['timesteps'])} timesteps, "
            f"τ {teacher['tau']:.4g}, anomaly `{teacher['anomaly']}`), on the same crops; PBC from its test-split run.",
            "", "| data | n | balanced accuracy | ECE | mean confidence | sent to review |",
            "|---|---|---|---|---|---|"]
    for name, d in (("PBC test, 8 classes", teacher["pbc_test"]), *teacher["domains"].items()):
        rows.append(f"| {name} | {d['n']} | {_pct(d['balanced_accuracy'])} | {d['ece']:.3f} | "
                    f"{d['mean_confidence']:.2f} | {_pct(d['review_share'])} |")
    rows += ["", "Telling foreign white cells from PBC white cells by one score alone (AUROC; 0.5 = chance, "
             "below 0.5 = the score is *lower* on foreign cells):", ""]
    for domain, scores in teacher["separation_auroc"].items():
        rows.append(f"- {domain}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()) + ".")
    return rows


def _risk_rows(ood: dict) -> list[str]:
    """Risk-coverage per set: accuracy of the cells kept when the most uncertain share goes to review."""
    rows = [(name, d["risk_coverage"]) for name, d in
            ([("PBC test", ood["pbc_test"])] if ood.get("pbc_test") else []) + list(ood["domains"].items())
            if d.get("risk_coverage")]
    if not rows:
        return []
    keys = list(rows[0][1])
    header = " | ".join(f"{k.removeprefix('exclude_').removesuffix('pct')}% to review" for k in keys)
    return ["", "Risk-coverage (the model's uncertainty output decides which cells go to review; accuracy of the "
            "cells it keeps, not balanced):", "", f"| data | {header} |", "|---|" + "---|" * len(keys),
            *(f"| {name} | " + " | ".join(_pct(rc[k]) for k in keys) + " |" for name, rc in rows)]


def render_section(ood: dict, adaptation: dict | None, teacher: dict | None = None) -> str:
    """Markdown for the card: per-domain figures next to PBC, the alarm, and the adaptation curve."""
    lines = [BEGIN, "## Other microscopes (out of domain)", "",
             "Measured by `python -m engines.evaluate MODEL_DIR --ood --write` on `wbc-shift` (white cells from two "
             "other microscopes and stains, evaluation only; protocol in docs/robustness.md): scale matched by cell "
             f"size, the model's field cut as the runtime cuts it, review rule {ood['review_rule']}.", "",
             "| data | n | µm/px | balanced accuracy | ECE | mean confidence | sent to review | with the domain "
             "alarm | cells before the alarm |",
             "|---|---|---|---|---|---|---|---|---|"]
    pbc_test = ood.get("pbc_test")
    if pbc_test:
        white = pbc_test["white_five"]
        lines.append(f"| PBC test, 8 classes (in domain) | {pbc_test['n']} | 0.25 "
                     f"| {_pct(pbc_test['balanced_accuracy'])} "
                     f"| {pbc_test['ece']:.3f} | {pbc_test['mean_confidence']:.2f} | {_pct(pbc_test['review_share'])} "
                     "| — | — |")
        with_alarm, before = _alarm_cells(white.get("alarm"))
        lines.append(f"| PBC test, 5 white classes | {white['n']} | 0.25 | {_pct(white['balanced_accuracy'])} "
                     f"| {white['ece']:.3f} | — | {_pct(white['review_share'])} | {with_alarm} | {before} |")
    for domain, d in ood["domains"].items():
        with_alarm, before = _alarm_cells(d.get("alarm"))
        lines.append(f"| {domain} | {d['n']} | {d['um_per_px']:.3f} | {_pct(d['balanced_accuracy'])} | {d['ece']:.3f} "
                     f"| {d['mean_confidence']:.2f} | {_pct(d['review_share'])} | {with_alarm} | {before} |")
    lines += ["", "Balanced accuracy out of domain is the mean recall over the white classes present (tecom has one "
              "basophil, cellavision-blog three). \"With the domain alarm\": share of cells flagged when the "
              "service's alarm runs over the domain's cells in 20 random orders (every cell is flagged while it is "
              "on, and until a full window has looked familiar); \"cells before the alarm\": median (max) "
              "cells seen before it came on.", ""]
    for domain, d in ood["domains"].items():
        recall = ", ".join(f"{c} {_pct(r)} ({d['support'][c]})" for c, r in d["per_class_recall"].items())
        lines.append(f"- {domain}: recall per class (support): {recall}.")
    lines += _risk_rows(ood)
    if teacher:
        lines += _teacher_rows(teacher)
    if adaptation:
        lines += ["", "### Adapting to a site (`cytoedge adapt`)", "",
                  "Each domain split once into a fixed test half and a pool half; n cells of the pool labelled as a "
                  "reviewer meets them, the whole pool unlabelled; "
                  + (f"{adaptation['epochs']} fine-tuning epochs; " if adaptation.get("epochs")
                     else "each method's own fine-tuning epochs; ")
                  + f"{adaptation['seeds']} seeds (`python -m engines.evaluate --adapt`, method definitions in "
                  "engines/adapt.py). Test halves: "
                  + ", ".join(f"{d} n={b['n_test']} (pool {b['n_pool']})" for d, b in adaptation["domains"].items())
                  + "; balanced accuracy over the classes present in the half, so the 'none' rows differ from the "
                  "whole-domain figures above; no 100-label row where the pool is smaller."
                  + (" `bn+normal` (`cytoedge adapt --frames ... --normal-controls`, no labels) is given a normal "
                     "control run: pool cells drawn so their classes follow a normal differential, as a healthy "
                     "donor's smear would show them (docs/robustness.md)." if any(
                         r["method"] == "bn+normal" for b in adaptation["domains"].values() for r in b["results"])
                     else ""), "",
                  *_adaptation_rows(adaptation)]
    lines += ["", "What was tried to make models hold up on other microscopes, each measured on these sets "
              "(docs/robustness.md): lab-to-lab augmentations (stain, colour, optics, sensor, scale) and a "
              "leave-one-group-out ablation; wider colour ranges; hiding the neighbours of the centred cell "
              "at random in training or always at runtime; per-image and per-site colour matching; batch-norm "
              "re-estimation on the site's cells; entropy minimisation, information maximisation and "
              "self-training on them; fine-tuning on reviewed cells with PBC replay. The diffusion teacher "
              "was scored on the same cells.", "", END]
    return "\n".join(lines)


def summarise(ood: dict) -> dict:
    """What card.json keeps of the OOD report (the full report, less per-scale repetition)."""
    keep = ("n", "um_per_px", "balanced_accuracy", "per_class_recall", "support", "ece", "mean_confidence",
            "review_share", "accuracy_not_reviewed", "predicted", "sensitivity", "alarm", "risk_coverage")
    return {"model": ood["model"], "review_rule": ood["review_rule"], "scales": ood["scales"],
            "domains": {d: {k: v for k, v in r.items() if k in keep} for d, r in ood["domains"].items()},
            "pbc_test": ood.get("pbc_test")}


def _without_confusions(adaptation: dict) -> dict:
    """The curve as the card keeps it: each run's confusion matrix is for experiments (results/*.json),
    and 8×8 per run would bury the card's figures."""
    def kept(result: dict) -> dict:
        runs = [{k: v for k, v in run.items() if k != "confusion"} for run in result.get("runs", [])]
        return {**result, "runs": runs} if "runs" in result else result

    domains = {d: {**block, "results": [kept(r) for r in block["results"]]}
               for d, block in adaptation["domains"].items()}
    return {**adaptation, "domains": domains}


def update_card(model_dir: Path, ood: dict, adaptation: dict | None, teacher: dict | None = None) -> None:
    """Put the OOD (and adaptation, and for a student its teacher's) figures into card.json and refresh
    the marked block of card.md."""
    def change(figures: dict) -> str:
        figures["out_of_domain"] = summarise(ood)
        if adaptation is not None:
            figures["adaptation"] = {**_without_confusions(adaptation), "model_id": ood["model"]}
        elif figures.get("adaptation", {}).get("model_id") != ood["model"]:
            figures.pop("adaptation", None)  # measured on another file: stale
        if teacher is not None:
            figures["teacher_out_of_domain"] = teacher
        return render_section(figures["out_of_domain"], figures.get("adaptation"),
                              figures.get("teacher_out_of_domain"))

    card.update_block(model_dir, BLOCK, change)
