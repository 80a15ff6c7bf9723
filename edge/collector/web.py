"""The lab page: microscopes with their live status, slides with differential, review state and report.

Same stack as the bench display (standard library HTTP server, no build step, no outside resources);
the page is rendered on the server and refreshes itself, so it needs no script at all.
"""

from __future__ import annotations

import contextlib
import html
import json
import logging
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from edge.collector import labdata

log = logging.getLogger(__name__)

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'"
_REPORT = re.compile(r"^/report/([A-Za-z0-9._-]{1,128})/([A-Za-z0-9_-]{1,128})\.(pdf|json|fhir\.json)$")
STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin-bottom:1.5em}
td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}th{background:#eee}.off{color:#b00020;font-weight:bold}
.on{color:#137333;font-weight:bold}.banner{background:#b00020;color:#fff;padding:.1em .4em}"""


class LabPage:
    """HTTP server in a thread; ``live`` is the collector's latest status per microscope."""

    def __init__(self, engine: Engine, listen: tuple[str, int], live: dict[str, dict[str, Any]],
                 lock: threading.Lock, stale_after_s: float, target: int = 100,
                 frames_root: list[Path] | None = None) -> None:
        self.engine, self.live, self.lock = engine, live, lock
        self.stale_after_s, self.target = stale_after_s, target
        self.frames_root = frames_root or [Path.cwd()]
        handler = type("Handler", (_Handler,), {"page": self})
        self.server = ThreadingHTTPServer(listen, handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="lab-page", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def overview(self) -> dict[str, Any]:
        with self.lock:
            live = {k: dict(v) for k, v in self.live.items()}
        return labdata.overview(self.engine, live, self.stale_after_s, self.target)


def render(data: dict[str, Any]) -> str:
    e = html.escape
    rows = []
    for m in data["microscopes"]:
        state = f'<span class="{"on" if m["online"] else "off"}">{e(str(m["state"]))}</span>'
        rows.append(f"<tr><td>{e(m['microscope'])}</td><td>{state}</td><td>{e(str(m['fps'] or '—'))}</td>"
                    f"<td>{e(str(m['model'] or '—'))}</td><td>{e(str(m['last_message_age_s']))} s</td>"
                    f"<td>{m['messages']}</td></tr>")
    slides = []
    for s in data["slides"]:
        diff = ", ".join(f"{e(k)} {v:.1f}%" for k, v in s["differential"].items())
        review = s["review"]
        state = ("signed by " + e(s["signoff"]["name"])) if s["signoff"] else (
            f'<span class="off">{review["unreviewed"]} unreviewed</span>' if review["unreviewed"] else "ready to sign")
        banner = f'<span class="banner">{e(s["banner"])}</span>' if s["banner"] else ""
        link = e(s["report"])
        slides.append(f"<tr><td>{e(s['microscope'])}</td><td>{e(s['slide'])}"
                      f"{'' if s['finished'] else ' (open)'}</td><td>{s['white_total']}"
                      f"{'' if s['target_reached'] else ' (target not reached)'}</td><td>{diff}{banner}</td>"
                      f"<td>{review['flagged']} flagged, {review['reviewed']} reviewed, {review['corrected']} corrected"
                      f"</td><td>{state}</td><td><a href=\"{link}\">PDF</a> · <a href=\"{link[:-4]}.json\">JSON</a>"
                      f" · <a href=\"{link[:-4]}.fhir.json\">FHIR</a></td></tr>")
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">
<title>cytoedge lab</title><style>{STYLE}</style></head><body><h1>cytoedge lab</h1>
<h2>Microscopes</h2><table><tr><th>microscope</th><th>state</th><th>fps</th><th>model</th>
<th>last stored message</th><th>messages stored</th></tr>{''.join(rows)}</table>
<h2>Slides</h2><table><tr><th>microscope</th><th>slide</th><th>white cells</th><th>differential</th><th>review</th>
<th>sign-off</th><th>report</th></tr>{''.join(slides)}</table></body></html>"""


class _Handler(BaseHTTPRequestHandler):
    page: LabPage
    server_version = "cytoedge-lab"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/":
                self._send(200, "text/html; charset=utf-8", render(self.page.overview()).encode())
            elif path == "/api/state":
                self._send(200, "application/json", json.dumps(self.page.overview()).encode())
            elif match := _REPORT.match(path):
                self._report(*match.groups())
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found\n")
        except Exception:  # one bad request must not take the page down
            log.exception("lab page: %s failed", path)
            self._send(500, "text/plain; charset=utf-8", b"internal error (see the collector's log)\n")

    def _report(self, microscope: str, slide_id: str, kind: str) -> None:
        slide = labdata.build_slide(self.page.engine, microscope, slide_id, self.page.target)
        if slide is None:
            self._send(404, "text/plain; charset=utf-8", b"no such slide\n")
        elif kind == "pdf":
            from edge.report import pdf

            self._send(200, "application/pdf", pdf.render(slide, self.page.frames_root))
        elif kind == "json":
            self._send(200, "application/json", json.dumps(slide.as_json(), indent=1).encode())
        else:
            from edge.report import fhir

            self._send(200, "application/fhir+json", json.dumps(fhir.bundle(slide), indent=1).encode())

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(HTTPStatus(code))
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)
