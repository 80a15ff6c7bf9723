"""Do the foreign-cell levers work from a converged model? Fine-tune a trained network a few epochs with and
without them.

The short lever runs (``engines.experiments.norm_augment``) start from scratch on 1,600 crops for 4 epochs, so
their calls on other microscopes' cells are poor pseudo-labels and poor content for style mixing. Here every
variant starts from the same converged weights (default: ``baseline-isolate``, the shipped network trained
30 epochs with ``strong-isolate``) and trains ``--epochs`` more on the whole PBC training split with the same
augmentation, at a lower learning rate; the control continues without the lever, so what differs is the
lever only. Foreign cells: txl-pbc train frames, all three sources (the label-free leave-one-microscope-out
figure is therefore on frames of microscopes the model has seen; tecom and cellavision-blog stay unseen).

    python -m engines.experiments.finetune_foreign --cells .cache/foreign/white64.npz \
        --out engines/experiments/results/finetune-foreign.json --variants control xfix xmix
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from engines import pbc
from engines.baseline import TrainConfig
from engines.experiments.levers import inputs, row
from engines.experiments.norm_augment import fit_and_export

# name -> TrainConfig overrides on top of the fine-tuning recipe
VARIANTS: dict[str, dict] = {"control": {}, "xfix": {"consistency": 1.0}, "xmix": {"style": "foreign"},
                             # detail limited to 32 px across the field (engines.baseline.LowPass; no foreign cells)
                             "res32": {"resolution": 32}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.experiments.finetune_foreign",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=Path, required=True, help="python -m engines.foreign cut output")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=sorted(VARIANTS))
    parser.add_argument("--init", default="engines/models/baseline-isolate/weights.pt")
    parser.add_argument("--augment", default="strong-isolate")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-class", type=int, default=0, help="crops per class (0 = all; small for a smoke run)")
    parser.add_argument("--work", type=Path, default=pbc.REPO_ROOT / ".cache" / "finetune-foreign")
    args = parser.parse_args(argv)
    root, full, cells, domains = inputs(args.cells)
    report = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": {}}
    report["recipe"] = {"init": args.init, "augment": args.augment, "epochs": args.epochs, "lr": args.lr,
                        "seed": args.seed, "per_class": args.per_class, "variants": VARIANTS}
    for name in args.variants:
        key = f"{name}/seed{args.seed}"
        if key in report["runs"]:
            continue
        began = time.time()
        cfg = TrainConfig(epochs=args.epochs, lr=args.lr, augment=args.augment, init=args.init, seed=args.seed,
                          threads=1, per_class_limit=args.per_class, **VARIANTS[name])
        cfg = replace(cfg, foreign_cells=str(args.cells) if cfg.uses_foreign_cells else "")
        folder = args.work / f"{name}-seed{args.seed}"
        fit_and_export(root, cfg, full, folder, f"finetune-{name}", args.work / "checkpoints")
        result = row(folder, full, cells, domains)
        result["seconds"] = round(time.time() - began, 1)
        report["runs"][key] = result
        print(key, json.dumps(result), flush=True)
        pbc.atomic_write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
