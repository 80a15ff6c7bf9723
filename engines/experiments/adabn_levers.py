"""Do the training levers stack with label-free batch-norm re-estimation at the site (AdaBN)?

``cytoedge adapt`` with no reviewed cells re-estimates the network's batch-norm statistics on the site's
unlabelled crops (``engines.adapt.reestimate_batchnorm``). This re-opens the lever models of
``engines.experiments.norm_augment`` (the weights.pt beside each exported model, in its ``--work`` folder)
and measures each wbc-shift domain with the adaptation protocol of ``engines.adapt.adaptation_curve``: half
the cells (fixed permutation, seed 12345) are the site's unlabelled pool, the other half the test half;
balanced accuracy on the test half before and after AdaBN on the pool. No labels are used to adapt; the
test half is never adapted on.

    python -m engines.experiments.adabn_levers --levers engines/experiments/results/style-strong.json \
        --out engines/experiments/results/style-strong-adabn.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

from engines import evaluate, ood, pbc
from engines.adapt import load_weights, predict_probs, reestimate_batchnorm
from engines.baseline import FIELD_UM, INPUT_SIZE, WEIGHTS_FILE


def halves(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The adaptation protocol's fixed test half and pool half."""
    order = np.random.default_rng(12345).permutation(n)
    return order[: n // 2], order[n // 2:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.experiments.adabn_levers",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--levers", type=Path, required=True, help="a norm_augment results JSON")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=pbc.REPO_ROOT / ".cache" / "levers",
                        help="the --work folder the levers were trained in")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    levers = json.loads(args.levers.read_text())
    domains, _ = ood.domain_crops(pbc.CLASSES, FIELD_UM, INPUT_SIZE)
    report = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": {}}
    report["protocol"] = __doc__.split("\n\n")[1].replace("\n", " ")
    for key in levers["runs"]:
        if key.count("/") != 1 or key in report["runs"]:
            continue  # leave-one-out folds are for selection only
        folder = args.work / key.replace("/", "-")
        if not (folder / WEIGHTS_FILE).is_file():
            print(f"{key}: no {WEIGHTS_FILE} in {folder} (train it with norm_augment --work {args.work}), skipped",
                  file=sys.stderr)
            continue
        # Rebuilt without style-mixing layers (save_weights leaves them out): reestimate_batchnorm runs the
        # network in training mode, where they would re-style the site's crops.
        model, meta = load_weights(folder / "model.onnx")
        result = {}
        for domain, (crops, labels) in domains.items():
            test, pool = halves(len(labels))
            before = predict_probs(model, crops[test], meta).argmax(1)
            adapted = copy.deepcopy(model)
            reestimate_batchnorm(adapted, crops[pool], meta)
            after = predict_probs(adapted, crops[test], meta).argmax(1)
            result[domain] = {f"{when}_balanced_accuracy": round(evaluate.classification_metrics(
                pred, labels[test], meta.classes)["balanced_accuracy"], 4) for when, pred in
                (("before", before), ("adabn", after))}
        report["runs"][key] = result
        print(key, json.dumps(result), flush=True)
        summary = {}
        for variant in sorted({k.split("/")[0] for k in report["runs"]}):
            rows = [r for k, r in report["runs"].items() if k.split("/")[0] == variant]
            summary[variant] = {f"{d}_{w}": [round(float(np.mean([r[d][f"{w}_balanced_accuracy"] for r in rows])), 4),
                                             round(float(np.std([r[d][f"{w}_balanced_accuracy"] for r in rows])), 4)]
                                for d in domains for w in ("before", "adabn")}
        report["summary"] = summary
        pbc.atomic_write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
