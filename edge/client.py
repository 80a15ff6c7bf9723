"""A subscriber for cytoedge's publisher, for tools and third-party displays.

Skips (and counts) malformed messages instead of raising, tracks `seq` gaps per topic, and makes
ZeroMQ's silent late-join behaviour visible: the caller sees ``None`` on timeout and can warn.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import zmq

from edge.messages import TOPIC_CELLS, TOPIC_STATUS, MessageError, decode
from edge.security import ClientKeys


@dataclass
class Received:
    topic: bytes
    payload: dict[str, Any]


@dataclass
class SubscriberStats:
    received: int = 0
    malformed: int = 0
    gaps: int = 0  # messages missed, from seq jumps
    last_seq: dict[tuple[str, bytes], int] = field(default_factory=dict)


class Subscriber:
    """SUB socket connected to one publisher endpoint, decoding and checking every message."""

    def __init__(
        self,
        endpoint: str,
        topics: Iterable[bytes] = (TOPIC_CELLS, TOPIC_STATUS),
        context: zmq.Context | None = None,
        max_bytes: int = 8 << 20,
        curve: ClientKeys | None = None,
    ) -> None:
        self._context = context or zmq.Context.instance()
        self._socket = self._context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RCVHWM, 10000)
        self._socket.setsockopt(zmq.MAXMSGSIZE, max_bytes + 64)
        if curve is not None:
            curve.apply(self._socket)
        for topic in topics:
            self._socket.setsockopt(zmq.SUBSCRIBE, topic)
        self._socket.connect(endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        self._max_bytes = max_bytes
        self.stats = SubscriberStats()

    def receive(self, timeout_s: float) -> Received | None:
        """Next well-formed message, or None when nothing arrives in time."""
        deadline_ms = max(0, int(timeout_s * 1000))
        while True:
            if not self._poller.poll(deadline_ms):
                return None
            parts = self._socket.recv_multipart()
            if len(parts) != 2:
                self.stats.malformed += 1
                continue
            topic, data = parts
            try:
                payload = decode(topic, data, self._max_bytes)
            except MessageError:
                self.stats.malformed += 1
                continue
            self._track_seq(topic, payload)
            self.stats.received += 1
            return Received(topic, payload)

    def messages(self, timeout_s: float) -> Iterator[Received | None]:
        """Endless stream; yields None on each quiet period so callers can notice silence."""
        while True:
            yield self.receive(timeout_s)

    def _track_seq(self, topic: bytes, payload: dict[str, Any]) -> None:
        key = (str(payload.get("run")), topic)
        seq = payload.get("seq")
        if not isinstance(seq, int):
            return
        previous = self.stats.last_seq.get(key)
        if previous is not None and seq > previous + 1:
            self.stats.gaps += seq - previous - 1
        self.stats.last_seq[key] = seq

    def close(self) -> None:
        self._socket.close(linger=0)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
