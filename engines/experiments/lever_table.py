"""The robustness-lever table in one place (docs/robustness.md): every lever of the short seeded runs, alone
and combined, against its own reference, from the result files ``engines.experiments.norm_augment`` wrote.

Each lever run is compared with the reference trained at the same budget with the same augmentation and
nothing else (``bn+basic`` or ``bn+strong``), taken from the same file where it was re-run beside the lever
(same CPU load, same code), else from the first file of the same budget that has it. The deltas are
differences of seed means; the sd columns say how far one seed set can be trusted. Written from the files,
never by hand, so the table cannot drift from the measurements::

    python -m engines.experiments.lever_table
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engines import pbc
from engines.experiments.variants import describe

RESULTS = pbc.REPO_ROOT / "engines" / "experiments" / "results"
# the short-run lever files, in the order they were measured (the first holds the oldest references)
SHORT_RUNS = ["norm_augment.json", "plasma.json", "style-basic.json", "style-strong.json", "resolution.json",
              "norm_resolution.json"]
FIGURES = ("pbc_test_balanced_accuracy", "tecom_balanced_accuracy", "cellavision-blog_balanced_accuracy")


def is_augmentation_alone(variant: str) -> bool:
    """``bn+strong``: BatchNorm, no lever but the augmentation itself."""
    return variant.startswith("bn+") and variant.count("+") == 1


def reference_name(variant: str) -> str:
    """The run a lever is judged against: BatchNorm with the same augmentation and no other lever; for the
    augmentation alone (``bn+strong``), BatchNorm with the basic one."""
    return "bn+basic" if is_augmentation_alone(variant) else "bn+" + variant.split("+")[1]


def rows(reports: list[tuple[str, dict]]) -> list[dict]:
    """One row per lever variant (references excluded), with its reference's figures and the deltas."""
    references: dict[tuple, tuple[str, dict]] = {}
    for name, report in reports:  # same file first (below), else the first file of the same budget
        for variant, summary in report.get("summary", {}).items():
            references.setdefault((report.get("per_class"), report.get("epochs"), variant), (name, summary))
    out = []
    for name, report in reports:
        budget = (report.get("per_class"), report.get("epochs"))
        for variant, summary in report.get("summary", {}).items():
            ref = reference_name(variant)
            if variant == ref:
                continue
            own = report["summary"].get(ref)
            if not own and is_augmentation_alone(variant):
                continue  # the augmentation alone: only where its reference was re-run beside it
            ref_file, ref_summary = (name, own) if own else references.get((*budget, ref), (None, None))
            row = {"variant": variant, "lever": describe(variant), "file": name, "reference": ref,
                   "reference_file": ref_file, "seeds": report.get("seeds"), "budget": budget}
            for figure in FIGURES:
                row[figure] = summary[figure]
                if ref_summary:
                    row[figure + "_delta"] = round(summary[figure][0] - ref_summary[figure][0], 4)
            row["lomo_mean_distance"] = summary.get("lomo_mean_distance")
            out.append(row)
    return out


def markdown(table: list[dict]) -> str:
    def cell(row: dict, figure: str) -> str:
        mean, sd = row[figure]
        delta = row.get(figure + "_delta")
        return f"{100 * mean:.1f} ± {100 * sd:.1f}%" + ("" if delta is None else f" ({100 * delta:+.1f})")

    lines = ["| lever (normalisation + augmentation + lever) | reference | PBC test | tecom | cellavision-blog "
             "| LOMO distance | file |", "|---|---|---|---|---|---|---|"]
    for row in table:
        lomo = row["lomo_mean_distance"]
        lines.append(f"| {row['lever']} | {row['reference']} | {cell(row, FIGURES[0])} | {cell(row, FIGURES[1])} "
                     f"| {cell(row, FIGURES[2])} | {'—' if lomo is None else f'{lomo[0]:.2f} ± {lomo[1]:.2f}'} "
                     f"| `{row['file']}` |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.experiments.lever_table",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path, default=[RESULTS / f for f in SHORT_RUNS],
                        help="norm_augment result files (default: every short-run lever file)")
    args = parser.parse_args(argv)
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        print(f"error: no such result file: {', '.join(missing)}", file=sys.stderr)
        return 2
    print(markdown(rows([(f.name, json.loads(f.read_text(encoding="utf-8"))) for f in args.files])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
