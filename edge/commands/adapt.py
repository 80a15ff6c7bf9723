"""`cytoedge adapt`: a site model from this microscope's reviewed cells (needs the [train] extra)."""

from __future__ import annotations

import argparse
import dataclasses
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reviews", action="append", default=[], metavar="DIR",
                        help="folder of display session files (slide-*.jsonl with their saved crops); repeatable")
    parser.add_argument("--frames", action="append", default=[], metavar="PATH",
                        help="recorded frames from this microscope (folder, video or recorded session) whose "
                             "cells are used unlabelled; repeatable")
    parser.add_argument("--config", default=None, help="config file (microscope scale, cell finder, model, store)")
    parser.add_argument("--model", default=None, help="model to adapt (default: the configured one)")
    parser.add_argument("--store", default=None, help="model store to add the site model to (default: from config)")
    parser.add_argument("--name", default=None, help="site model name (default: site-YYYYmmdd-HHMMSS)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="fine-tuning epochs over the labelled cells (default: the method's own, 100)")
    parser.add_argument("--normal-controls", action="store_true",
                        help="the --frames are of healthy donors' smears: also calibrate the class balance so "
                             "their white cells read as a normal differential (fitted once, kept for later "
                             "patients; frames only: with --reviews the reviewed cells set the balance instead)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=5,
                        help="cross-validation folds for the card's site-versus-base figures (0 = skip, faster)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")


def site_model_helped(cross_validation: dict) -> bool:
    """Whether the site model beat its base on held-out folds of the site's reviewed cells by more than
    one cell's worth of accuracy (less is noise with a few dozen labels)."""
    site, base = cross_validation["site"], cross_validation["base"]
    return site["balanced_accuracy"] - base["balanced_accuracy"] > 1.0 / max(site["n"], 1)


def main(args: argparse.Namespace) -> int:
    """Gather the site's cells, build the site model in a temporary folder, add it to the store (inactive)."""
    import tempfile
    import time
    from pathlib import Path

    import numpy as np

    from edge import config as cfg
    from edge.errors import CytoedgeError, ModelError
    from edge.finders import configured_finder
    from edge.models import resolve_model_path
    from edge.modelstore import ModelStore, store_dir
    from edge.onnx_backend import OnnxRuntimeClassifier
    from edge.sitedata import batchnorm_pool, crops_from_frames, read_reviews

    try:
        from engines.adapt import method_for
        from engines.differential_prior import MIN_CELLS as MIN_CONTROL_CELLS
        from engines.site_model import build_site_model
    except ImportError as exc:
        raise CytoedgeError(f"cytoedge adapt needs the training extra ({exc.name} is missing): "
                            "pip install 'cytoedge[train]'") from None
    config = cfg.load(args.config)
    if not args.reviews and not args.frames:
        raise CytoedgeError("nothing to adapt from: give --reviews (display sessions) and/or --frames")
    store = ModelStore(store_dir(args.store or config["model"]["store"]))
    base_path = resolve_model_path(args.model or config["model"]["path"] or None, store.root)
    meta = OnnxRuntimeClassifier(base_path, threads=1).metadata
    name = args.name or time.strftime("site-%Y%m%d-%H%M%S")
    if name in store.names():
        raise CytoedgeError(f"a model named {name!r} is already in {store.root}; choose another --name")
    try:
        reviewed = read_reviews([Path(p) for p in args.reviews], meta.classes, meta.input_size)
        unlabelled = crops_from_frames([Path(p) for p in args.frames], config["microscope"]["um_per_px"],
                                       configured_finder(config), meta.field_um, meta.input_size)
    except FileNotFoundError as exc:
        raise CytoedgeError(str(exc)) from None
    print(f"{len(reviewed.labels)} reviewed cells from {reviewed.sessions} session file(s), "
          f"{len(unlabelled.kinds)} crops from {unlabelled.frames} frame(s)"
          + (f"; skipped {dict(reviewed.skipped + unlabelled.skipped)}" if reviewed.skipped or unlabelled.skipped
             else ""))
    # The alarm sees the finder's white cells, each once, cut from full frames: so does its reference.
    # (Reviewed crops are those same cells again, JPEG-compressed, and include platelets.)
    white = [c for c, kind in zip(unlabelled.crops, unlabelled.kinds, strict=True) if kind == "wbc"]
    white_crops = np.stack(white) if white else unlabelled.crops[:0]
    pool = np.concatenate([unlabelled.crops, reviewed.crops])
    if len(pool) < 16 or len(white_crops) < 10:
        raise CytoedgeError(f"too few cells to adapt: {len(pool)} crops, {len(white_crops)} white cells "
                            "(need at least 16 and 10); record more frames or review more cells")
    if args.normal_controls and len(reviewed.labels):
        print("note: the reviewed cells set the class balance; the --normal-controls calibration is applied only "
              "to frames-only site models (after fine-tuning it lowered accuracy, docs/robustness.md)", file=sys.stderr)
    elif args.normal_controls and len(white_crops) < MIN_CONTROL_CELLS:
        raise CytoedgeError(f"--normal-controls needs at least {MIN_CONTROL_CELLS} white cells in the control frames "
                            f"to calibrate a differential, found {len(white_crops)}; record more control fields")
    normalising, platelets_left_out = batchnorm_pool(unlabelled, seed=args.seed)
    provenance = {"sessions": reviewed.sessions, "frames": unlabelled.frames, "reviews": list(args.reviews),
                  "platelets_left_out_of_batchnorm": platelets_left_out,
                  "frame_sources": list(args.frames), "um_per_px": config["microscope"]["um_per_px"],
                  "skipped": dict(reviewed.skipped + unlabelled.skipped)}
    # The method is chosen in engines.adapt from docs/robustness.md's measurements; the card records it.
    method = method_for(len(reviewed.labels), normal_controls=args.normal_controls)
    settings = dataclasses.replace(method, epochs=args.epochs or method.epochs, seed=args.seed, threads=args.threads)
    store.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".adapt-", dir=store.root) as temp:
        try:
            card = build_site_model(base_path, Path(temp) / name, name, normalising, white_crops, reviewed.crops,
                                    reviewed.labels, settings, provenance, folds=args.folds)
        except (FileNotFoundError, ValueError) as exc:
            raise ModelError(f"cannot adapt {base_path}: {exc}") from None
        target = store.add(Path(temp) / name, name)
    cv = card["cross_validation"]
    if cv:
        print(f"cross-validated on {cv['site']['n']} labelled cells: balanced accuracy base "
              f"{100 * cv['base']['balanced_accuracy']:.1f}% -> site {100 * cv['site']['balanced_accuracy']:.1f}%")
        if not site_model_helped(cv):
            print("warning: on this site's own reviewed cells the site model is no better than the one it was "
                  "adapted from; review more cells (all classes) before using it", file=sys.stderr)
    random, ordered = card["alarm_self_check"]["random_halves"], card["alarm_self_check"]["recording_halves"]
    if random["checks"] and random["alarm_share"] > 0.01:
        print(f"warning: the domain alarm fired in {100 * random['alarm_share']:.1f}% of checks on this site's own "
              "held-out cells: too few white cells for a steady reference; record more frames and adapt again",
              file=sys.stderr)
    if ordered["checks"] and ordered["alarm_share"] > 0.01:
        print(f"note: the site's cells changed while recorded (alarm in {100 * ordered['alarm_share']:.1f}% of checks, "
              "first half against second); the reference covers both, later changes will raise the alarm",
              file=sys.stderr)
    print(f"site model {name} written to {target} (sha256 {card['sha256'][:12]}); NOT active.")
    print(f"activate: cytoedge models use {name} --store {store.root}   then: systemctl reload cytoedge")
    return 0
