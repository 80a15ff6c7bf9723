"""`cytoedge report`: a finished slide (display session + the edge's audit log) as PDF, JSON and FHIR."""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path

from edge.display.state import SessionLog
from edge.errors import ConfigError
from edge.fileutil import atomic_write_bytes
from edge.report import slide as slides
from edge.report.slide import TARGETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("session", help="the display's session file (slide-….jsonl): the reviewer's decisions")
    parser.add_argument("--audit", required=True, metavar="FILE",
                        help="the edge's audit log (audit.path): every cells message of the slide's run(s)")
    parser.add_argument("--out", required=True, metavar="PDF", help="the report PDF to write")
    parser.add_argument("--json", metavar="FILE", help="also write the same content as JSON")
    parser.add_argument("--fhir", metavar="FILE", help="also write an HL7 FHIR R4 Bundle (DiagnosticReport)")
    parser.add_argument("--run", action="append", metavar="RUN",
                        help="count every frame of these run(s) (default: the frames named by the display's "
                        "slide-end line, else every frame of the runs the decisions name)")
    parser.add_argument("--sign", metavar="NAME", help="sign as this reviewer (refused while flagged cells wait)")
    parser.add_argument("--microscope", default=socket.gethostname(), help="microscope id (default: host name)")
    parser.add_argument("--target", type=int, choices=TARGETS, default=100, help="white cells per differential")
    parser.add_argument("--frames-root", metavar="DIR", action="append", default=[],
                        help="where replayed frame paths are found for the gallery (default: current folder)")


def main(args: argparse.Namespace) -> int:
    session = Path(args.session)
    if not session.is_file():
        raise ConfigError(f"session file not found: {session}")
    records = list(slides.read_jsonl(session))
    decisions = slides.latest_decisions(records)
    end = None if args.run else slides.slide_end(records)
    runs = args.run or sorted({key[0] for key in decisions}) or None
    messages = list(slides.read_jsonl(Path(args.audit)))
    model = next((m.get("model") for m in messages if m.get("run") in (runs or [m.get("run")])), None)
    slide = slides.build(
        messages, decisions, session.stem, args.microscope, args.target, runs,
        slides.card_checksum(model if isinstance(model, str) else None), end,
    )
    signed = slides.recorded_signoff(records)
    if args.sign is not None:
        slide.sign(args.sign)
    elif signed is not None:
        slide.sign(str(signed["name"]), float(signed.get("time", 0.0)))  # signed before: the report says so
    from edge.report import pdf  # reportlab loads only here

    search = [Path(p) for p in args.frames_root] + [Path.cwd(), session.parent, Path(args.audit).parent]
    pdf.write(slide, Path(args.out), search)
    if args.json:
        atomic_write_bytes(Path(args.json), json.dumps(slide.as_json(), indent=2).encode() + b"\n")
    if args.fhir:
        from edge.report import fhir

        atomic_write_bytes(Path(args.fhir), json.dumps(fhir.bundle(slide), indent=2).encode() + b"\n")
    if args.sign is not None and slide.signoff is not None:
        # The signature joins the slide's record (and reaches the lab collector with it), after the PDF exists.
        SessionLog(session).append(slides.signoff_record(slide.signoff))
    state = f"signed by {slide.signoff.name}" if slide.signoff else "unsigned draft"
    print(f"{args.out}: slide {slide.slide_id}, {slide.white_total} white cells, {state}")
    return 0
