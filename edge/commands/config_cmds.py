"""`cytoedge config check|show`."""

from __future__ import annotations

import argparse

from edge import config as cfg


def check(args: argparse.Namespace) -> int:
    cfg.load(args.file)
    print(f"{args.file}: ok")
    return 0


def show(args: argparse.Namespace) -> int:
    print(cfg.to_toml(cfg.load(args.file)), end="")
    return 0
