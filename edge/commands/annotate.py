"""`cytoedge annotate FRAME --out FILE`: one frame through the cell finder and model, drawn as an image."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2

from edge import config as cfg
from edge.analysis import classify_detections
from edge.annotate import annotate
from edge.errors import SourceError
from edge.fileutil import atomic_write_bytes
from edge.finders import configured_finder
from edge.frames import BadImage, read_image
from edge.messages import cell_record
from edge.models import open_configured_classifier


def main(args: argparse.Namespace) -> int:
    config = cfg.with_overrides(
        cfg.load(args.config), "command line", model__path=args.model, microscope__um_per_px=args.um_per_px
    )
    classifier = open_configured_classifier(config)
    try:
        image = read_image(Path(args.frame), config["pipeline"]["max_frame_pixels"])
    except BadImage as exc:
        raise SourceError(str(exc)) from None
    um_per_px = config["microscope"]["um_per_px"]
    detections = configured_finder(config)(image, um_per_px)
    cells = classify_detections(
        image, detections, classifier, um_per_px, config["review"]["uncertainty"], config["review"]["anomaly"]
    )
    suffix = Path(args.out).suffix.lower() or ".png"
    ok, encoded = cv2.imencode(suffix, annotate(image, cells, show_rbc=args.show_rbc))
    if not ok:
        raise SourceError(f"cannot encode an image as {suffix}")
    atomic_write_bytes(Path(args.out), encoded.tobytes())
    if args.json:
        print(json.dumps({"frame": args.frame, "model": classifier.model_id, "cells": [cell_record(c) for c in cells]}))
    else:
        kinds = [c.kind for c in cells]
        print(
            f"{args.out}: {kinds.count('wbc')} white cells, {kinds.count('platelet')} platelets, "
            f"{kinds.count('rbc')} red cells"
        )
    return 0
