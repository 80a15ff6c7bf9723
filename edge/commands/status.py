"""`cytoedge status ENDPOINT`: one-shot health for monitoring (Nagios-style exit codes).

0 healthy (running and the source streaming), 1 degraded (source stalled/reconnecting, or the
domain alarm / warnings present with --strict), 2 failed or stopped, 3 unreachable (no status in time).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from edge.client import Subscriber
from edge.messages import TOPIC_STATUS, rejections_text
from edge.security import client_keys_from_flags

HEALTHY, DEGRADED, FAILED, UNREACHABLE = 0, 1, 2, 3


def health(status: dict[str, Any], strict: bool = False) -> int:
    if status["state"] in ("stopped", "stopping") or status["source_state"] == "failed":
        return FAILED
    if status["source_state"] in ("stalled", "reconnecting"):
        return DEGRADED
    if strict and status.get("warnings"):
        return DEGRADED
    return HEALTHY


def main(args: argparse.Namespace) -> int:
    with Subscriber(
        args.endpoint, topics=(TOPIC_STATUS,), curve=client_keys_from_flags(args.server_key, args.client_key)
    ) as subscriber:
        received = subscriber.receive(timeout_s=args.timeout)
    if received is None:
        print(f"UNREACHABLE: no status from {args.endpoint} within {args.timeout:g} s", file=sys.stderr)
        return UNREACHABLE
    status = received.payload
    code = health(status, args.strict)
    if args.json:
        print(json.dumps({"health": ["healthy", "degraded", "failed"][code], **status}))
    else:
        latency = status["latency_ms"].get("total", {})
        word = ["HEALTHY", "DEGRADED", "FAILED"][code]
        print(
            f"{word}: {status['state']}, source {status['source_state']}, {status['fps']:.1f} fps, "
            f"p99 {latency.get('p99', 0):.1f} ms, dropped {status['frames'].get('dropped', 0)}, "
            f"model {status['model']}"
        )
        rejections = rejections_text(status)
        if rejections:
            print(f"  rejected frames by reason: {rejections}")
        for warning in status.get("warnings", []):
            print(f"  warning: {warning}")
    return code
