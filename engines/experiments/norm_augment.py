"""Lever ablation (issue 15): normalisation (BatchNorm vs GroupNorm) x augmentation (basic vs ``strong``:
wide colour, optics and scale), each alone and combined, several seeds, short runs on a PBC subset; also
plasma-relative input normalisation (optical density or transmittance against each crop's own plasma) and
feature-style mixing (engines.style_mix) with PBC or other microscopes' unlabelled cells as donors.

Short on purpose (a shared 2-core CPU): ``--per-class`` training crops per class, ``--epochs`` epochs, the
baseline network and recipe (engines.baseline.train), so what differs between rows is the lever only. A
variant is named ``<norm>+<augment>[+<lever>]`` (engines.experiments.variants), so a new combination such
as ``gn+strong+xfix`` runs without editing this file.
Every model is exported like a shipped one (ONNX, temperature on validation) and measured by
``engines.experiments.levers.row``: selection figures (PBC validation, label-free leave-one-microscope-out
on txl-pbc) and test figures (PBC test, tecom, cellavision-blog). Resumable: a finished run is skipped.

    python -m engines.experiments.norm_augment --cells .cache/foreign/white64.npz \
        --out engines/experiments/results/norm_augment.json

Plasma-relative input (``engines.plasma_norm``; docs/robustness.md), with the references re-run beside it::

    python -m engines.experiments.norm_augment --cells .cache/foreign/white64.npz \
        --out engines/experiments/results/plasma.json \
        --variants bn+basic+plasma bn+strong+plasma bn+basic bn+strong bn+basic+ratio bn+strong+ratio

Layer norm (``ln+``) and input resolution (``+res32`` / ``+res16``: the crop's detail limited to 32 or 16
pixels across the same field, in training and in the exported graph; engines.baseline.LowPass)::

    python -m engines.experiments.norm_augment --cells .cache/foreign/white64.npz \
        --out engines/experiments/results/resolution.json --variants bn+basic+res32 bn+strong+res32 bn+strong+res16
    python -m engines.experiments.norm_augment --cells .cache/foreign/white64.npz \
        --out engines/experiments/results/norm_resolution.json \
        --variants ln+basic ln+strong ln+strong+res32 gn+strong+res32

Style mixing (``+mix``: PBC donors; ``+xmix``: txl-pbc train-frame white cells as donors). A model that
trained on foreign cells has seen those microscopes, so for ``+xmix`` the leave-one-microscope-out figure
comes from three more runs per seed, each without one source's cells, measured on that source only::

    python -m engines.experiments.norm_augment --cells .cache/foreign/white64.npz \
        --out engines/experiments/results/style.json \
        --variants bn+basic bn+strong bn+basic+mix bn+strong+mix bn+basic+xmix bn+strong+xmix
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from calibration.temperature import fit_temperature
from engines import evaluate, export, foreign, pbc
from engines.baseline import FIELD_UM, INPUT_SIZE, WEIGHTS_FILE, TrainConfig, save_weights, train
from engines.experiments.levers import inputs, row
from engines.experiments.variants import FIELDS, overrides


def variant_name(text: str) -> str:
    """argparse type: any name the grammar allows (a new combination need not be listed first)."""
    try:
        overrides(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


DEFAULT_VARIANTS = ["bn+basic", "gn+basic", "bn+strong", "gn+strong"]


def summarise(runs: list[dict]) -> dict:
    """Mean and sd over seeds of every number in the rows (nested one level for the domains)."""
    out = {}
    folded = [r for r in runs if "lomo_seen_mean_distance" in r]  # foreign-cell runs whose folds are all done
    for key in ("pbc_val_balanced_accuracy", "pbc_test_balanced_accuracy", "lomo_mean_distance",
                "lomo_seen_mean_distance"):
        chosen = folded if key.startswith("lomo") and folded else runs
        v = [r[key] for r in chosen if key in r]
        if not v:
            continue
        out[key] = [round(float(np.mean(v)), 4), round(float(np.std(v)), 4)]
    for domain in ("tecom", "cellavision-blog"):
        v = [r[domain]["balanced_accuracy"] for r in runs]
        out[f"{domain}_balanced_accuracy"] = [round(float(np.mean(v)), 4), round(float(np.std(v)), 4)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.experiments.norm_augment",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=Path, required=True, help="python -m engines.foreign cut output")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", type=variant_name, default=DEFAULT_VARIANTS,
                        help="<bn|gn|ln>+<basic|strong>[+<lever>] (engines.experiments.variants); e.g. gn+strong+amp")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--no-folds", action="store_true",
                        help="skip the leave-one-microscope-out runs of foreign-cell levers (a first look only)")
    parser.add_argument("--work", type=Path, default=pbc.REPO_ROOT / ".cache" / "levers")
    args = parser.parse_args(argv)
    root, full, cells, domains = inputs(args.cells)
    report = json.loads(args.out.read_text()) if args.out.is_file() else {}
    earlier = [key.split("/")[0] for key in report.get("runs", {})]
    report.update({"per_class": args.per_class, "epochs": args.epochs, "seeds": args.seeds,
                   "variants": {k: recorded(k) for k in dict.fromkeys([*earlier, *args.variants])}})
    report.setdefault("runs", {})
    sources = sorted(set(cells["source"].tolist()))
    held = cells["split"] != "train"
    for seed in range(args.seeds):  # seed-major: an interrupted run still has every variant at seed 0
        for name in args.variants:
            base = lever_config(name, seed, args.epochs, args.per_class, args.cells)
            # A model that trained on foreign cells is measured leave-one-microscope-out by runs without each.
            folds = [(f"/without-{s}", (s,)) for s in sources] if base.foreign_cells and not args.no_folds else []
            for suffix, exclude in [("", ()), *folds]:
                key = f"{name}/seed{seed}{suffix}"
                if key in report["runs"]:
                    continue
                began = time.time()
                folder = args.work / f"{name}-seed{seed}{suffix.replace('/', '-')}"
                cfg = replace(base, foreign_exclude=exclude)
                fit_and_export(root, cfg, full, folder, f"lever-{name}", args.work / "checkpoints")
                if exclude:
                    mask = held & (cells["source"] == exclude[0])
                    spread = foreign.measure(folder / "model.onnx", {k: v[mask] for k, v in cells.items()
                                                                     if k != "scales"})
                    result = {"left_out": exclude[0], "distance": spread["mean_distance_from_normal"]}
                else:
                    result = row(folder, full, cells, domains)
                result["seconds"] = round(time.time() - began, 1)
                report["runs"][key] = result
                print(key, json.dumps(result), flush=True)
                if folds and all(f"{name}/seed{seed}{f}" in report["runs"] for f, _ in [("", ()), *folds]):
                    whole = report["runs"][f"{name}/seed{seed}"]
                    whole.setdefault("lomo_seen_mean_distance", whole["lomo_mean_distance"])
                    left = {s: report["runs"][f"{name}/seed{seed}/without-{s}"]["distance"] for s in sources}
                    whole["lomo_distance_from_normal"] = left
                    whole["lomo_mean_distance"] = round(float(np.mean(list(left.values()))), 4)
                report["summary"] = {v: summarise([r for k, r in report["runs"].items()
                                                   if k.startswith(v + "/") and k.count("/") == 1])
                                     for v in dict.fromkeys(k.split("/")[0] for k in report["runs"])}
                pbc.atomic_write_json(args.out, report)
    return 0


def lever_config(name: str, seed: int, epochs: int, per_class: int, cells: Path) -> TrainConfig:
    """The TrainConfig of one lever run (one thread; foreign cells only where the lever uses them)."""
    cfg = replace(TrainConfig(epochs=epochs, per_class_limit=per_class, seed=seed, threads=1), **overrides(name))
    return replace(cfg, foreign_cells=str(cells) if cfg.uses_foreign_cells else "")


def recorded(name: str) -> dict:
    """A variant's settings as its result file records them (every lever field, defaults included)."""
    cfg = replace(TrainConfig(), **overrides(name))
    return {f: getattr(cfg, f) for f in FIELDS}


def fit_and_export(root: Path, cfg: TrainConfig, full, folder: Path, name: str, checkpoints: Path) -> Path:
    """Train one lever model, export it like a shipped one (ONNX; temperature on the full validation split;
    weights.pt beside it)."""
    model, data, _ = train(root, cfg, checkpoints, resume=True, log=lambda *_: None)
    folder.mkdir(parents=True, exist_ok=True)
    meta = export.make_metadata(name=name, version=str(cfg.seed), classes=data.classes,
                                input_size=INPUT_SIZE, mean=data.mean, std=data.std, field_um=FIELD_UM,
                                kind="baseline")  # the subset's mean/std: what the network trained with
    onnx_path = export.export_onnx(model, folder / "model.onnx", meta)
    temperature = fit_temperature(evaluate.onnx_logits(onnx_path, full.images["val"]), full.labels["val"])
    export.write_metadata(onnx_path, export.replace(meta, temperature=round(temperature, 4)))
    save_weights(model, folder / WEIGHTS_FILE)  # what engines.adapt.load_weights (and adabn_levers) reopens
    return onnx_path


if __name__ == "__main__":
    sys.exit(main())
