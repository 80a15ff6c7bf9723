"""Live status per microscope from its PUB socket (CURVE as the display does). Lossy by design: only the
newest status matters here; the durable record goes through JetStream."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy.engine import Engine

from edge.client import Subscriber
from edge.collector import db
from edge.collector.config import Microscope
from edge.messages import TOPIC_STATUS
from edge.security import client_keys_from_flags

log = logging.getLogger(__name__)
SAVE_EVERY_S = 2.0


class LiveStatus:
    """One thread per microscope with an endpoint, each keeping ``live[id] = {"status", "at"}``."""

    def __init__(self, microscopes: list[Microscope], engine: Engine) -> None:
        self.engine = engine
        self.live: dict[str, dict[str, Any]] = {m.id: {"status": None, "at": None} for m in microscopes}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = []
        for microscope in microscopes:
            if microscope.endpoint:
                keys = client_keys_from_flags(microscope.server_key or None, microscope.client_key or None)
                self.threads.append(threading.Thread(target=self._watch, args=(microscope, keys), daemon=True,
                                                     name=f"live-{microscope.id}"))

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _watch(self, microscope: Microscope, keys: Any) -> None:
        saved = 0.0
        with Subscriber(microscope.endpoint, topics=(TOPIC_STATUS,), curve=keys) as subscriber:
            while not self.stop.is_set():
                received = subscriber.receive(0.5)
                if received is None:
                    continue
                now = time.time()
                with self.lock:
                    self.live[microscope.id] = {"status": received.payload, "at": now}
                if now - saved >= SAVE_EVERY_S:
                    saved = now
                    try:
                        db.set_status(self.engine, microscope.id, _plain(received.payload), now)
                    except Exception as exc:  # the database may be down; live status is still shown
                        log.warning("could not save %s status: %s", microscope.id, exc)


def _plain(payload: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in payload.items() if not isinstance(v, bytes)}
