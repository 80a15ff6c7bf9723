"""ZeroMQ PUB side of the contract in docs/messages.md.

One thread owns the socket (ZeroMQ sockets are not thread-safe), so the pipeline's inference loop
publishes everything, status included. PUB never blocks: a slow subscriber loses messages at the
high-water mark and sees the gap in `seq`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import zmq

from edge.errors import CytoedgeError
from edge.messages import SCHEMA_BY_TOPIC, encode
from edge.security import is_loopback, secure_publisher

log = logging.getLogger(__name__)


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}"


class Publisher:
    def __init__(
        self,
        endpoint: str,
        send_hwm: int = 1000,
        linger_ms: int = 2000,
        context: zmq.Context | None = None,
        curve: tuple[Path, Path] | None = None,
    ) -> None:
        """``curve``: (publisher secret key file, folder of authorised subscriber keys), or None."""
        self.endpoint = endpoint
        self.run = new_run_id()
        self._seq: dict[bytes, int] = {}
        self._context = context or zmq.Context.instance()
        self._socket = self._context.socket(zmq.PUB)
        # HWM and linger apply only to binds made after they are set.
        self._socket.setsockopt(zmq.SNDHWM, send_hwm)
        self._socket.setsockopt(zmq.LINGER, linger_ms)
        self._authenticator = None
        if curve is not None:
            self._authenticator = secure_publisher(self._socket, self._context, *curve)
        elif not is_loopback(endpoint):
            log.warning(
                "publishing on %s WITHOUT encryption or authentication (security.allow_insecure = true)", endpoint
            )
        try:
            self._socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self.close()
            hint = " (is another cytoedge running? choose another port)" if exc.errno == zmq.EADDRINUSE else ""
            raise CytoedgeError(f"cannot publish on {endpoint}: {exc.strerror}{hint}") from None
        self.bound_endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("publishing on %s", self.bound_endpoint)

    def publish(self, topic: bytes, payload: dict[str, Any]) -> dict[str, Any]:
        """Stamp the common fields and send; returns the payload as sent (for the audit log)."""
        seq = self._seq.get(topic, -1) + 1
        self._seq[topic] = seq
        message = {
            "schema": SCHEMA_BY_TOPIC[topic],
            "run": self.run,
            "seq": seq,
            "published_at": time.time(),
            **payload,
        }
        self._socket.send_multipart([topic, encode(message)], copy=False)
        return message

    def close(self) -> None:
        self._socket.close()
        if self._authenticator is not None:
            self._authenticator.stop()
