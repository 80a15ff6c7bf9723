"""The systemd notification protocol (sd_notify), spoken directly: no libsystemd, no dependency.

systemd passes the service an AF_UNIX datagram socket in $NOTIFY_SOCKET (a filesystem path, or an
abstract-namespace name written with a leading '@'). Each datagram is newline-separated KEY=VALUE
fields: READY=1, STATUS=..., WATCHDOG=1, STOPPING=1, RELOADING=1 ...

Outside systemd (NOTIFY_SOCKET unset: a terminal, a test, a container) every call is a no-op that
returns False, so callers never need to check where they run. A failed send never raises either: it
is logged once at debug level and the call returns False. Service supervision must not be able to
take the pipeline down.

`Notifier.watchdog()` is meant to be called from the per-frame progress path: it costs one
`time.monotonic()` and a comparison unless a keep-alive is due, and it sends at most one WATCHDOG=1
per quarter of the watchdog interval systemd asked for (WatchdogSec= -> $WATCHDOG_USEC). When the
watchdog is not enabled for this process it never sends.

The environment is read once, when the Notifier is built. Calls from several threads are fine:
each send is one sendto() on a non-blocking socket, and two threads racing in watchdog() can at
worst send one extra keep-alive.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

__all__ = ["Notifier", "notify_address", "watchdog_interval"]


def notify_address(value: str | None) -> str | bytes | None:
    """The sendto() address for a $NOTIFY_SOCKET value, or None when unset or unsupported.

    '/path' -> '/path'; '@name' -> b'\\0name' (Linux abstract namespace). Other forms (systemd 254+
    also allows 'vsock:CID:PORT' for VMs) are not supported and give None.
    """
    if not value:
        return None
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """The watchdog timeout systemd set for this process, in seconds, or None when it is off.

    Parsed from $WATCHDOG_USEC (a positive integer of microseconds). When $WATCHDOG_PID is set the
    watchdog belongs to that process only, so a different pid (a child that inherited the
    environment) gets None, as sd_watchdog_enabled(3) does.
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "").strip()
    if not usec:
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    owner = env.get("WATCHDOG_PID", "").strip()
    if owner:
        try:
            owner_pid = int(owner)
        except ValueError:
            return None
        if owner_pid != (os.getpid() if pid is None else pid):
            return None
    return value / 1_000_000


def _encode_fields(fields: Mapping[str, object]) -> bytes:
    lines = []
    for key, value in fields.items():
        if value is True:
            text = "1"
        elif value is False:
            text = "0"
        else:
            # A newline would start a new field: keep free text (STATUS) on one line.
            text = str(value).replace("\r", " ").replace("\n", " ")
        lines.append(f"{key.upper()}={text}")
    return ("\n".join(lines) + "\n").encode("utf-8", errors="replace")


class Notifier:
    """Sends sd_notify messages to systemd; inert (every method returns False) outside systemd.

    Every sending method returns True when a datagram was handed to the socket, False when nothing
    was sent: no $NOTIFY_SOCKET, a send error (logged once at debug), or for watchdog() a keep-alive
    that is not due yet or a watchdog that is off.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET")
        self._address = notify_address(raw)
        if raw and self._address is None:
            log.debug("NOTIFY_SOCKET=%r is not a form this module supports; notifications are off", raw)
        self._interval = watchdog_interval(env)
        # Rate limit for watchdog(): at most one keep-alive per interval/4.
        self._watchdog_min_gap = self._interval / 4 if self._interval else 0.0
        self._next_watchdog = 0.0
        self._warned = False
        self._sock: socket.socket | None = None
        if self._address is not None:
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # A full receive queue must cost the frame loop a dropped message, never a stall.
                sock.setblocking(False)
                self._sock = sock
            except OSError as exc:
                self._fail(exc)

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notification socket."""
        return self._sock is not None

    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds (WatchdogSec=), or None when not enabled for this pid."""
        return self._interval

    def notify(self, **fields: object) -> bool:
        """Send arbitrary fields in one datagram: notify(READY=1, STATUS="warming up").

        Keys are upper-cased; True/False become 1/0; newlines in values become spaces.
        """
        if self._sock is None or not fields:
            return False
        return self._send(_encode_fields(fields))

    def ready(self) -> bool:
        """READY=1: start-up (or a reload) finished. systemd's start job completes on this."""
        return self.notify(READY=1)

    def status(self, text: str) -> bool:
        """STATUS=<text>: the one-line state shown by `systemctl status`."""
        return self.notify(STATUS=text)

    def stopping(self) -> bool:
        """STOPPING=1: shutdown has begun."""
        return self.notify(STOPPING=1)

    def reloading(self) -> bool:
        """RELOADING=1 with MONOTONIC_USEC=<CLOCK_MONOTONIC µs>, as Type=notify-reload expects.

        Send ready() again once the new configuration is in force. Older systemd (Type=notify)
        accepts these fields too and shows the unit as "reloading" until READY=1.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, MONOTONIC_USEC=usec)

    def watchdog(self) -> bool:
        """WATCHDOG=1, at most once per watchdog_interval()/4; cheap enough to call per frame.

        Returns True only when a keep-alive was sent by this call.
        """
        if self._interval is None or self._sock is None:
            return False
        now = time.monotonic()
        if now < self._next_watchdog:
            return False
        self._next_watchdog = now + self._watchdog_min_gap
        return self._send(b"WATCHDOG=1\n")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _send(self, payload: bytes) -> bool:
        sock = self._sock
        if sock is None:
            return False
        try:
            sock.sendto(payload, self._address)
        except OSError as exc:
            self._fail(exc)
            return False
        return True

    def _fail(self, exc: OSError) -> None:
        if not self._warned:
            self._warned = True
            log.debug("sd_notify to %r failed (%s); further failures are not logged", self._address, exc)
