"""The collector's durable path: a JetStream pull consumer whose messages are stored, then acknowledged.

Acknowledging only after the database committed means a collector killed mid-batch gets the batch
again (ack_wait later, or at once on restart) and the database keys make the second write a no-op.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

from edge.collector import db, stream

log = logging.getLogger(__name__)

DURABLE = "collector"
FETCH = 1000


@dataclass
class IngestStats:
    stored: int = 0
    malformed: int = 0
    batches: int = 0
    lags: list[float] = field(default_factory=list)  # stored_at - published_at of recent cells messages


def parse(subject_name: str, data: bytes) -> tuple[str, str, dict[str, Any]] | None:
    """(microscope, kind, payload) or None for a message the collector cannot use."""
    try:
        parts = subject_name.split(".")
        microscope, kind = parts[1], parts[2]
        payload = json.loads(data)
        if kind == "cells":
            str(payload["run"]), int(payload["seq"]), int(payload["frame_id"])
            for cell in payload.get("cells") or []:
                int(cell["id"]), str(cell["kind"])
        elif kind == "review":
            str(payload["slide"]), int(payload["line"]), dict(payload["record"])
        else:
            return None
        return microscope, kind, payload
    except (ValueError, KeyError, TypeError, IndexError):
        return None


class Collector:
    """Consumes the stream into the database until ``stop`` is set."""

    def __init__(self, engine: Engine, nats: stream.NatsOptions, durable: str = DURABLE) -> None:
        self.engine = engine
        self.nats = nats
        self.durable = durable
        self.stats = IngestStats()
        self.stop = asyncio.Event()
        self.ready = asyncio.Event()

    async def run(self) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig

        client = await stream.connect(self.nats)
        try:
            js = client.jetstream()
            await stream.ensure_stream(js)
            subscription = await js.pull_subscribe(
                stream.SUBJECTS, durable=self.durable, stream=stream.STREAM,
                config=ConsumerConfig(ack_policy=AckPolicy.ALL, ack_wait=30, max_ack_pending=20_000),
            )
            self.ready.set()
            while not self.stop.is_set():
                await self._once(subscription)
        finally:
            await client.close()

    async def _once(self, subscription: Any) -> None:
        import nats.errors

        try:
            batch = await subscription.fetch(FETCH, timeout=0.5)
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            return
        if not batch:
            return
        items = []
        for message in batch:
            item = parse(message.subject, message.data)
            if item is None:
                self.stats.malformed += 1
                log.warning("unusable message on %s: acknowledged and dropped", message.subject)
            else:
                items.append(item)
        try:
            await asyncio.to_thread(self._store, items)
        except sa_exc.DBAPIError as exc:  # the database is down or refused: nothing acknowledged, try again
            log.warning("database did not take %d message(s): %s", len(items), str(exc).splitlines()[0])
            for message in batch:
                await message.nak(delay=1.0)
            await asyncio.sleep(1.0)
            return
        # AckPolicy.ALL: acknowledging the batch's last message acknowledges the batch (one collector per
        # durable consumer; a second one needs its own durable name).
        await batch[-1].ack()
        self.stats.batches += 1

    def _store(self, items: list[tuple[str, str, dict[str, Any]]]) -> None:
        with self.engine.begin() as conn:
            db.store(conn, items)
        now = time.time()
        self.stats.stored += len(items)
        lags = [now - p["published_at"] for _, kind, p in items
                if kind == "cells" and isinstance(p.get("published_at"), (int, float))]
        self.stats.lags = (self.stats.lags + lags)[-100_000:]
