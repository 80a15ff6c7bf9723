"""`cytoedge watch ENDPOINT`: the running differential in a terminal, from the published stream."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from typing import Any, TextIO

from edge.client import Subscriber
from edge.drift import ALARM_TEXT
from edge.messages import TOPIC_CELLS, TOPIC_STATUS, rejections_text
from edge.security import client_keys_from_flags


class Differential:
    """Counts white cells by label, platelets and red cells by kind, as a haematologist tallies them."""

    def __init__(self) -> None:
        self.white: Counter[str] = Counter()
        self.platelets = 0
        self.red = 0
        self.review = 0
        self.frames = 0
        self.domain_alarm = False
        self.domain_checked = True

    def add(self, cells_message: dict[str, Any]) -> None:
        self.frames += 1
        self.domain_alarm = bool(cells_message.get("domain_alarm", False))
        self.domain_checked = bool(cells_message.get("domain_checked", True))
        for cell in cells_message["cells"]:
            if not cell.get("first_seen", True):
                continue  # the same cell, still in view: counted when first seen
            if cell["kind"] == "wbc" and cell["label"]:
                self.white[cell["label"]] += 1
            elif cell["kind"] == "platelet":
                self.platelets += 1
            elif cell["kind"] == "rbc":
                self.red += 1
            self.review += bool(cell["review"])

    def banner(self) -> str:
        """The domain state, first line of the screen: the one thing that says whether to trust the rest."""
        if self.domain_alarm:
            return f"!! DOMAIN ALARM: {ALARM_TEXT}; every cell goes to review"
        if not self.domain_checked:
            return ("CHECKING: the first white cells are being compared with the model's training data; "
                    "every cell goes to review until they look familiar")
        return "domain: checked, cells look like the training data"

    def render(self, status: dict[str, Any] | None, colour: bool = False) -> str:
        total = sum(self.white.values())
        banner = self.banner()
        if colour and (self.domain_alarm or not self.domain_checked):
            banner = ("\x1b[1;41;97m" if self.domain_alarm else "\x1b[1;43;30m") + banner + "\x1b[0m"
        lines = [
            banner,
            f"white cells: {total}   platelets: {self.platelets}   red cells: {self.red}   "
            f"to review: {self.review}   frames: {self.frames}"
        ]
        for label, count in sorted(self.white.items(), key=lambda item: (-item[1], item[0])):
            lines.append(f"  {label:<14}{count:>6}  {100.0 * count / total:5.1f}%")
        if status:
            latency = status["latency_ms"].get("total", {})
            lines.append(
                f"source {status['source_state']}, {status['fps']:.1f} fps, p50 {latency.get('p50', 0):.1f} ms,"
                f" p99 {latency.get('p99', 0):.1f} ms, dropped {status['frames'].get('dropped', 0)},"
                f" model {status['model']}"
            )
            rejections = rejections_text(status)
            if rejections:
                lines.append(f"rejected frames by reason: {rejections}")
            lines.extend(f"  warning: {w}" for w in status.get("warnings", [])[:5] if w != ALARM_TEXT)
        return "\n".join(lines)


def main(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    differential = Differential()
    status: dict[str, Any] | None = None
    interactive = out.isatty()
    last_draw = 0.0
    last_message = time.monotonic()
    with Subscriber(
        args.endpoint,
        topics=(TOPIC_CELLS, TOPIC_STATUS),
        curve=client_keys_from_flags(args.server_key, args.client_key),
    ) as subscriber:
        while True:
            received = subscriber.receive(timeout_s=0.5)
            now = time.monotonic()
            if received is None:
                if args.timeout and now - last_message > args.timeout:
                    print(f"cytoedge watch: nothing from {args.endpoint} for {args.timeout:g} s", file=sys.stderr)
                    return 1
                continue
            last_message = now
            if received.topic == TOPIC_CELLS:
                differential.add(received.payload)
            else:
                status = received.payload
            final = bool(status and status.get("final"))
            if final or now - last_draw >= 0.5:
                last_draw = now
                text = differential.render(status, colour=interactive)
                out.write(("\x1b[H\x1b[J" + text + "\n") if interactive else text + "\n\n")
                out.flush()
            if final and args.exit_on_end:
                return 0
