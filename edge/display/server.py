"""`cytoedge display`: a bench web page fed by the publisher.

Standard library only (ThreadingHTTPServer + Server-Sent Events): a lab PC or tablet needs nothing
beyond cytoedge's own dependencies, and there is no build step. One background thread subscribes to
the publisher and updates a `DisplayState` under a lock; each page connection gets the newest
snapshot at most `PUSH_INTERVAL_S` apart, so a fast publisher never builds a backlog per client.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import re
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq

from edge.client import Subscriber
from edge.display.flags import add_arguments  # noqa: F401  (re-exported for callers)
from edge.display.state import DecisionError, DisplayState
from edge.errors import ConfigError, CytoedgeError
from edge.messages import TOPICS
from edge.security import ClientKeys, client_keys_from_flags

log = logging.getLogger(__name__)

PUSH_INTERVAL_S = 0.2  # at most 5 snapshots a second per page
HEARTBEAT_S = 1.0  # a snapshot at least this often, so the page sees its connection is alive
MAX_BODY = 64 * 1024
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
# The page is served only from its own origin; no inline scripts, no outside resources.
CSP = "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; connect-src 'self'"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARDS = frozenset({"", "0.0.0.0", "::"})


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def allowed_host_names(listen_host: str) -> frozenset[str]:
    """The Host names the page may be asked for, from the address it listens on (DNS rebinding defence).

    A rebinding attack points the attacker's own name at this address, so the browser sends *that* name
    as Host: only names and addresses this server was configured with are accepted. Loopback also answers
    to ``localhost``; a wildcard listen (0.0.0.0, ::) to this machine's host names, and to any IP literal
    (a browser sends an IP as Host only when the page's own origin is that IP, so no rebinding is possible).
    """
    host = listen_host.strip("[]").lower()
    names = {host}
    if host in LOOPBACK_NAMES or host.startswith("127."):
        names |= LOOPBACK_NAMES
    if host in WILDCARDS:
        names |= LOOPBACK_NAMES | {socket.gethostname().lower(), socket.getfqdn().lower()}
    return frozenset(n for n in names if n)


def host_is_allowed(header: str | None, allowed: frozenset[str], port: int, wildcard: bool) -> bool:
    """True when a request's Host header names this server: an allowed name (or, behind a wildcard
    listen, an IP literal) and this server's port (absent only when the port is 80)."""
    if not header:
        return False
    try:
        parts = urlsplit(f"//{header.strip()}")
        name, given_port = (parts.hostname or ""), parts.port
    except ValueError:
        return False
    if (given_port if given_port is not None else 80) != port:
        return False
    return name in allowed or (wildcard and _is_ip(name))


class DisplayServer:
    """The subscriber thread, the shared state and the HTTP server, started and stopped together."""

    def __init__(
        self,
        connect: str,
        listen: tuple[str, int],
        sessions_dir: Path,
        target: int = 100,
        stale_after_s: float = 3.0,
        curve: ClientKeys | None = None,
    ) -> None:
        self.connect = connect
        self.state = DisplayState(sessions_dir, target=target, stale_after_s=stale_after_s)
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.stopping = threading.Event()
        try:
            self.httpd = _HTTPServer(listen, _Handler)
        except OSError as exc:
            raise CytoedgeError(f"cannot serve the display on {listen[0]}:{listen[1]}: {exc.strerror}") from None
        self.httpd.display = self
        self.allowed_hosts = allowed_host_names(listen[0])
        self.port = int(self.httpd.server_address[1])
        self.wildcard = listen[0].strip("[]") in WILDCARDS
        try:
            # Created here so a bad endpoint fails at start; only the subscriber thread uses it afterwards.
            self.subscriber = Subscriber(connect, topics=TOPICS, curve=curve)
        except zmq.ZMQError as exc:
            self.httpd.server_close()
            raise ConfigError(f"cannot subscribe to {connect}: {exc.strerror}") from None
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> None:
        for target, name in ((self._subscribe, "display-sub"), (self.httpd.serve_forever, "display-http")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self.stopping.set()
        with self.changed:
            self.changed.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _subscribe(self) -> None:
        """Feed the state from the publisher; ZeroMQ reconnects by itself if the publisher restarts."""
        with self.subscriber as subscriber:
            while not self.stopping.is_set():
                received = subscriber.receive(timeout_s=0.25)
                stats = subscriber.stats
                with self.changed:
                    if received is not None:
                        self.state.handle(received.topic, received.payload)
                    if (stats.malformed, stats.gaps) != (self.state.rejected_by_decoder, self.state.missed):
                        # What decode() rejected never reaches handle(); the Subscriber counted it.
                        self.state.rejected_by_decoder, self.state.missed = stats.malformed, stats.gaps
                        self.state.version += 1
                    self.changed.notify_all()

    def snapshot_json(self) -> tuple[int, bytes]:
        with self.lock:
            return self.state.version, json.dumps(self.state.snapshot()).encode()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    display: DisplayServer


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "cytoedge-display"

    # -- routing ------------------------------------------------------------------------------
    def _host_ok(self) -> bool:
        """Every request (GET too: the state and the CSV export are patient data) must name this server
        in Host; anything else is a DNS-rebinding page in the bench browser, refused with 403."""
        display = self.server.display
        if host_is_allowed(self.headers.get("Host"), display.allowed_hosts, display.port, display.wildcard):
            return True
        self._error(HTTPStatus.FORBIDDEN, "unknown Host: open the display at the address it listens on")
        return False

    def do_GET(self) -> None:
        if not self._host_ok():
            return
        path = urlsplit(self.path).path
        display = self.server.display
        if path in ("/", "/index.html"):
            self._static("index.html")
        elif path.startswith("/static/"):
            self._static(path.removeprefix("/static/"))
        elif path == "/events":
            self._events()
        elif path == "/api/state":
            self._send(HTTPStatus.OK, display.snapshot_json()[1], "application/json")
        elif path == "/preview.jpg":
            with display.lock:
                jpeg = display.state.preview_jpeg
            self._image(jpeg, cache=False)
        elif match := re.fullmatch(r"/thumb/(\d{1,12})\.jpg", path):
            with display.lock:
                jpeg = display.state.thumb(int(match.group(1)))
            self._image(jpeg, cache=True)
        elif path == "/export.csv":
            with display.lock:
                body, slide_id = display.state.csv().encode(), display.state.slide.slide_id
            self._send(
                HTTPStatus.OK,
                body,
                "text/csv; charset=utf-8",
                {"Content-Disposition": f'attachment; filename="{slide_id}.csv"'},
            )
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such page: {path}")

    def do_POST(self) -> None:
        if not self._host_ok():
            return
        path = urlsplit(self.path).path
        body = self._json_body()
        if body is None:
            return
        display = self.server.display
        if path == "/api/decision":
            try:
                with display.changed:
                    decision = display.state.decide(
                        body.get("run"),
                        body.get("frame_id"),
                        body.get("cell_id"),
                        body.get("action"),
                        body.get("label"),
                    )
                    display.changed.notify_all()
            except DecisionError as exc:
                self._error(HTTPStatus.BAD_REQUEST, str(exc))
                return
            except OSError as exc:
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"could not write the session file: {exc}")
                return
            self._send(HTTPStatus.OK, json.dumps(decision.as_json()).encode(), "application/json")
        elif path == "/api/new-slide":
            with display.changed:
                slide = display.state.new_slide()
                display.changed.notify_all()
            reply = {"slide": slide.slide_id, "session_file": str(slide.session.path)}
            self._send(HTTPStatus.OK, json.dumps(reply).encode(), "application/json")
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")

    # -- pieces -------------------------------------------------------------------------------
    def _events(self) -> None:
        """Server-Sent Events: the newest snapshot when something changed, at most every PUSH_INTERVAL_S."""
        display = self.server.display
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()
        sent_version = -1
        last_sent = 0.0
        try:
            self.wfile.write(b"retry: 1000\n\n")
            while not display.stopping.is_set():
                deadline = last_sent + HEARTBEAT_S
                with display.changed:
                    while display.state.version == sent_version and not display.stopping.is_set():
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        display.changed.wait(remaining)
                if display.stopping.is_set():
                    break
                sent_version, body = display.snapshot_json()
                self.wfile.write(b"event: state\ndata: " + body + b"\n\n")
                self.wfile.flush()
                last_sent = time.monotonic()
                time.sleep(PUSH_INTERVAL_S)  # coalesce: whatever arrives meanwhile goes out in the next one
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the page went away; EventSource reconnects by itself

    def _json_body(self) -> dict[str, Any] | None:
        """The POST's JSON object, or None after answering with an error. Requires application/json
        and a same-origin Origin, so another web page in the bench browser cannot post decisions."""
        origin = self.headers.get("Origin")
        if origin and urlsplit(origin).netloc != self.headers.get("Host"):
            self._error(HTTPStatus.FORBIDDEN, "cross-origin requests are not accepted")
            return None
        if not (self.headers.get("Content-Type") or "").startswith("application/json"):
            self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the request body as application/json")
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self._error(HTTPStatus.BAD_REQUEST, f"request body must be 0..{MAX_BODY} bytes")
            return None
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            self._error(HTTPStatus.BAD_REQUEST, "request body is not valid JSON")
            return None
        if not isinstance(body, dict):
            self._error(HTTPStatus.BAD_REQUEST, "request body must be a JSON object")
            return None
        return body

    def _static(self, name: str) -> None:
        if not re.fullmatch(r"[a-z0-9_-]+\.[a-z]+", name) or Path(name).suffix not in STATIC_TYPES:
            self._error(HTTPStatus.NOT_FOUND, f"no such file: {name}")
            return
        resource = resources.files("edge.display").joinpath("static", name)
        if not resource.is_file():
            self._error(HTTPStatus.NOT_FOUND, f"no such file: {name}")
            return
        self._send(HTTPStatus.OK, resource.read_bytes(), STATIC_TYPES[Path(name).suffix], {"Cache-Control": "no-cache"})

    def _image(self, jpeg: bytes | None, cache: bool) -> None:
        if jpeg is None:
            self._error(HTTPStatus.NOT_FOUND, "no such image (yet)")
            return
        headers = {"Cache-Control": "private, max-age=3600, immutable" if cache else "no-store"}
        self._send(HTTPStatus.OK, jpeg, "image/jpeg", headers)

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._send(status, json.dumps({"error": message}).encode(), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("Referrer-Policy", "no-referrer")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--listen wants HOST:PORT, e.g. 127.0.0.1:8080, not {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted (the CLI turns Ctrl-C into 130); CytoedgeError for what the user can fix."""
    if args.stale_after <= 0:
        raise ConfigError("--stale-after must be a positive number of seconds")
    sessions = Path(args.sessions)
    try:
        sessions.mkdir(parents=True, exist_ok=True)  # fail now, not at the first reviewer click
    except OSError as exc:
        raise CytoedgeError(f"cannot create the sessions folder {sessions}: {exc.strerror}") from None
    display = DisplayServer(
        args.connect,
        parse_listen(args.listen),
        sessions,
        target=args.target,
        stale_after_s=args.stale_after,
        curve=client_keys_from_flags(args.server_key, args.client_key),
    )
    display.start()
    log.info("bench display at %s (publisher %s, sessions in %s)", display.url, args.connect, args.sessions)
    print(f"cytoedge display: {display.url}  (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        display.stop()
