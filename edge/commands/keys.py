"""`cytoedge keys new NAME`: a CURVE key pair for the publisher or for one subscriber."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge.security import new_keypair


def new(args: argparse.Namespace) -> int:
    public, secret = new_keypair(Path(args.dir), args.name, overwrite=args.force)
    print(f"public key: {public}  (give this to the other side; publishers keep subscribers' in authorized_keys)")
    print(f"secret key: {secret}  (owner-only; never copy it off this machine)")
    return 0
