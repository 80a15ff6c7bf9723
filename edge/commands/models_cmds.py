"""`cytoedge models list|use|rollback`: which site model the service runs, changed only on purpose."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from edge.errors import CytoedgeError
from edge.models import default_model_path
from edge.modelstore import ModelStore, store_dir

RELOAD_HINT = "the service picks it up on `sudo systemctl reload cytoedge` (other commands: at their next start)"


def open_store(args: argparse.Namespace) -> ModelStore:
    """--store, else model.store from --config, else the default store (the service's when run as it)."""
    if args.store:
        return ModelStore(Path(args.store).expanduser())
    from edge import config as cfg

    configured = cfg.load(args.config)["model"]["store"] if args.config else ""
    return ModelStore(store_dir(configured))


def _describe(store: ModelStore, name: str) -> str:
    try:
        info = store.inspect(name)
    except CytoedgeError as exc:
        return f"UNUSABLE: {exc}"
    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.created))
    return f"{info.metadata.name} {info.metadata.version}  sha256 {info.sha256[:12]}  created {created}"


def list_models(args: argparse.Namespace) -> int:
    store = open_store(args)
    active = store.active()
    names = store.names()
    print(f"store: {store.root}")
    for name in names:
        print(f"{'*' if name == active else ' '} {name}  {_describe(store, name)}")
    if not names:
        print("  (no site models)")
    bundled = default_model_path().parent.name
    if active is None:
        print(f"active: bundled default: {bundled}")
        return 0
    if active not in names:
        print(
            f"cytoedge models: ACTIVE names {active!r}, which is not in the store: the service will not start "
            "until it is restored or `cytoedge models use|rollback` chooses another",
            file=sys.stderr,
        )
        return 1
    print(f"active: {active} (* above; the bundled default {bundled} is not used)")
    return 0


def use(args: argparse.Namespace) -> int:
    store = open_store(args)
    previous = store.use(args.name)
    if previous == args.name:
        print(f"{args.name} is already the active model in {store.root}")
        return 0
    print(f"active model: {args.name} (was: {previous or 'the bundled default'}) in {store.root}")
    print(f"{RELOAD_HINT}; undo with `cytoedge models rollback --store {store.root}`")
    return 0


def rollback(args: argparse.Namespace) -> int:
    store = open_store(args)
    before = store.active()
    after = store.rollback()
    if before is None and after is None:
        print(f"nothing to roll back: the bundled default is already in use ({store.root})")
        return 0
    print(f"active model: {after or 'the bundled default'} (was: {before or 'the bundled default'}) in {store.root}")
    print(RELOAD_HINT)
    return 0
