"""`cytoedge engine build`: the TensorRT engine for the configured (or given) model, flags over [tensorrt]."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge import config as cfg
from edge.models import resolve_model_path
from edge.trt import builder, plan


def build(args: argparse.Namespace) -> int:
    """Build (or confirm) one engine; an engine that is already valid for the key is left alone without --force."""
    config = cfg.load(getattr(args, "config", None))
    settings = plan.settings_from(config["tensorrt"])
    model = resolve_model_path(args.model or config["model"]["path"], config["model"]["store"])
    builder.build_engine(
        model,
        Path(args.engine_dir) if args.engine_dir else settings["engine_dir"],
        args.precision or settings["precision"],
        args.opt_batch or settings["opt_batch"],
        args.max_batch or settings["max_batch"],
        args.workspace_mb or settings["workspace_mb"],
        settings["timing_cache"],
        Path(args.int8_onnx) if args.int8_onnx else settings["int8_onnx"],
        say=lambda message: print(message, flush=True),
        force=args.force,
    )
    return 0
