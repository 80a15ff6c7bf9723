"""Flags of `cytoedge display`, kept apart so `cytoedge --help` need not load the server."""

from __future__ import annotations

import argparse

from edge.display.state import TARGETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `cytoedge display` (the CLI owns the sub-parser)."""
    parser.add_argument("--connect", required=True, metavar="ENDPOINT", help="publisher, e.g. tcp://127.0.0.1:5555")
    parser.add_argument(
        "--listen",
        default="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="where the page is served (default 127.0.0.1:8080; 0.0.0.0:8080 for a tablet on the bench network)",
    )
    parser.add_argument("--target", type=int, choices=TARGETS, default=100, help="white cells per differential")
    parser.add_argument(
        "--sessions", default="sessions", metavar="DIR", help="folder for review session files (default ./sessions)"
    )
    parser.add_argument(
        "--stale-after",
        type=float,
        default=3.0,
        metavar="S",
        help="warn on the page when nothing arrived for this many seconds (default 3)",
    )
    parser.add_argument("--server-key", metavar="FILE", help="CURVE: the publisher's public key file (.key)")
    parser.add_argument("--client-key", metavar="FILE", help="CURVE: this display's secret key file (.key_secret)")
