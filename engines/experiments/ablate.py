"""Ablation of the lab-to-lab augmentations (issue 9): which group of ops buys how much out of domain.

    python -m engines.experiments.ablate --epochs 8 --threads 1 --out artifacts/ablation [--variants ...]

"robust" helped one foreign microscope and hurt the other (docs/robustness.md), so it is retrained
with each group of ops left out (``engines.augment.GROUPS``: colour, optics, sensor, scale), next to
the two ends, ``basic`` (none) and ``robust`` (all). Every variant has the same seed, split, epoch
budget and export path (``engines.baseline.build``, so the models are exactly what a real run ships),
and every model is scored by ``engines.ood.evaluate_model`` with ONE scale estimate, so differences
come from the training augmentation alone. Results go to ``<out>/ablation.json`` after each variant
(written atomically); a rerun skips the variants already there, so an interrupted ablation resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from engines import baseline, ood, pbc
from engines.augment import GROUPS, PIPELINES

VARIANTS: tuple[str, ...] = ("basic", "robust", *(f"robust-no-{group}" for group in GROUPS), "strong", "strong-isolate")
# A variant's figures are comparable only under the same protocol; a rerun must not mix budgets.
PROTOCOL_KEYS = ("epochs", "seed", "preset", "threads")
# tecom has 1 basophil and cellavision-blog 3: one cell moves the 5-class balanced accuracy by up to
# 20 points, so the mean recall over the classes with at least this many cells is reported beside it.
COMMON_SUPPORT = 10


def summarise(variant: str, report: dict, training: dict) -> dict:
    """The few figures the ablation compares, from an engines.ood report and the card's training block."""
    row: dict = {"variant": variant, "pipeline": "none" if variant == "basic" else PIPELINES[variant].describe(),
                 "train_minutes": round(training["train_seconds"] / 60.0, 1)}
    test = report.get("pbc_test") or {}
    row["pbc_test"] = {k: test[k] for k in ("balanced_accuracy", "ece", "review_share") if k in test}
    row["domains"] = {}
    for name, d in report["domains"].items():
        common = [c for c, n in d["support"].items() if n >= COMMON_SUPPORT]
        row["domains"][name] = {
            **{k: d[k] for k in ("balanced_accuracy", "ece", "review_share", "mean_confidence")},
            "common_classes": common,
            "common_recall": round(sum(d["per_class_recall"][c] for c in common) / max(len(common), 1), 4),
            "per_class_recall": d["per_class_recall"], "support": d["support"]}
    return row


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def table(rows: Sequence[dict]) -> str:
    """A Markdown table, one line per variant, so the log and docs/robustness.md show the same thing."""
    head = ["variant", "PBC test bal. acc."]
    for domain in ood.DOMAINS:
        head += [f"{domain} bal. acc.", f"recall n≥{COMMON_SUPPORT}", "ECE", "review"]
    lines = ["| " + " | ".join([*head, "train min"]) + " |", "|" + "---|" * (len(head) + 1)]
    for row in rows:
        cells = [row["variant"], _pct(row["pbc_test"].get("balanced_accuracy"))]
        for domain in ood.DOMAINS:
            d = row["domains"].get(domain)
            cells += ["—"] * 4 if d is None else [_pct(d["balanced_accuracy"]), _pct(d.get("common_recall")),
                                                   f"{d['ece']:.3f}", _pct(d["review_share"])]
        lines.append("| " + " | ".join([*cells, f"{row['train_minutes']:.1f}"]) + " |")
    return "\n".join(lines)


@contextlib.contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    """baseline.build records sys.argv as the card's rebuild command; show it the equivalent baseline
    command, not this module's arguments, so each variant's card says how to rebuild that model."""
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def train_variant(variant: str, args: argparse.Namespace, model_dir: Path) -> dict:
    """Train, export and card one variant through engines.baseline; returns the card's training block.
    resume=True: an interrupted variant continues from its epoch checkpoint (keyed by its config)."""
    build_args = argparse.Namespace(
        data=args.data, out=str(model_dir), preset=args.preset, epochs=args.epochs, seed=args.seed,
        threads=args.threads, exclude=None, augment=variant, name=f"ablation-{variant}", version="0.0.0",
        timing_repeats=3, resume=True)
    argv = ["engines.baseline", "train", "--out", str(model_dir), "--preset", args.preset, "--epochs",
            str(args.epochs), "--seed", str(args.seed), "--threads", str(args.threads), "--augment", variant,
            "--name", build_args.name, "--version", build_args.version, "--timing-repeats", "3"]
    if args.data:
        argv += ["--data", args.data]
    with _argv(argv):
        if baseline.build(build_args) != 0:
            raise RuntimeError(f"training {variant} failed")
    return json.loads((model_dir / "card.json").read_text())["training"]


def load_results(path: Path, protocol: dict) -> dict:
    """The results so far, or a fresh record; refuses one made under another protocol."""
    if not path.is_file():
        return {"protocol": protocol, "scales": None, "variants": {}}
    results = json.loads(path.read_text())
    old = {k: results["protocol"].get(k) for k in PROTOCOL_KEYS}
    new = {k: protocol[k] for k in PROTOCOL_KEYS}
    if old != new:
        raise SystemExit(f"{path} was made with {old}, not {new}: use another --out")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.experiments.ablate", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("artifacts/ablation"))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="trained in this order (default: all)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--preset", choices=sorted(baseline.PRESETS), default="full")
    parser.add_argument("--data", default=None, help="PBC folder (default $CYTOEDGE_PBC or ../shared/data/pbc)")
    parser.add_argument("--wbc-shift", default=None, help="wbc-shift folder (default $CYTOEDGE_WBC_SHIFT)")
    args = parser.parse_args(argv)
    pbc_root, wbc_root = pbc.data_dir(args.data), ood.data_dir(args.wbc_shift)
    for root in (pbc_root, wbc_root):
        if not (root / "manifest.csv").is_file():
            print(f"skipped: no data at {root}", file=sys.stderr)
            return 2
    protocol = {"epochs": args.epochs, "seed": args.seed, "preset": args.preset, "threads": args.threads,
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
                "groups": {k: list(v) for k, v in GROUPS.items()}}
    path = args.out / "ablation.json"
    args.out.mkdir(parents=True, exist_ok=True)
    results = load_results(path, protocol)
    if results["scales"] is None:  # once for all models, so they are scored on the same crops
        cells = [c for c in ood.read_manifest(wbc_root) if c.domain in ood.DOMAINS]
        results["scales"] = ood.estimate_scales(wbc_root, cells, pbc_root)
        pbc.atomic_write_json(path, results)
    for variant in args.variants:
        if variant in results["variants"]:
            print(f"{variant}: done already, skipped")
            continue
        began = time.time()
        model_dir = args.out / variant
        training = train_variant(variant, args, model_dir)
        report = ood.evaluate_model(model_dir / "model.onnx", wbc_root, pbc_root, scales=results["scales"])
        pbc.atomic_write_json(model_dir / "ood.json", report)
        results["variants"][variant] = {**summarise(variant, report, training),
                                        "wall_minutes": round((time.time() - began) / 60.0, 1)}
        pbc.atomic_write_json(path, results)
        print(f"{variant}: done in {(time.time() - began) / 60:.1f} min", flush=True)
    print(table([results["variants"][v] for v in VARIANTS if v in results["variants"]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
