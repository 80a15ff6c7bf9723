"""The collector's durable path: a JetStream pull consumer whose messages are stored, then acknowledged.

Acknowledging each message only after the database committed means a collector killed mid-batch gets
that batch again (after ack_wait, from JetStream) and the database keys make a second write a no-op.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
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

    def __init__(self, engine: Engine, nats: stream.NatsOptions, durable: str = DURABLE,
                 ack_wait_s: float = 30.0) -> None:
        self.engine = engine
        self.nats = nats
        self.durable = durable
        self.ack_wait_s = ack_wait_s  # a batch not acknowledged by then (its collector died) is delivered again
        self.stats = IngestStats()
        self.stop = asyncio.Event()
        self.ready = asyncio.Event()
        self._dbapi = engine.dialect.dbapi  # the driver's own errors (COPY runs on its cursor)
        self._refused = (sa_exc.DataError, sa_exc.IntegrityError, self._dbapi.DataError, self._dbapi.IntegrityError)

    async def run(self) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig

        client = await stream.connect(self.nats)
        try:
            js = client.jetstream()
            await stream.ensure_stream(js)
            subscription = await js.pull_subscribe(
                stream.SUBJECTS, durable=self.durable, stream=stream.STREAM,
                config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=self.ack_wait_s, max_ack_pending=20_000),
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
        try:
            await asyncio.to_thread(self._store_batch, batch)
        except (sa_exc.DBAPIError, self._dbapi.Error) as exc:  # the database is down: nothing acknowledged, again
            log.warning("database did not take %d message(s): %s", len(batch), str(exc).splitlines()[0])
            for message in batch:
                await message.nak(delay=1.0)
            await asyncio.sleep(1.0)
            return
        # Every message acknowledged by itself, after the commit. Not AckPolicy.ALL: a collector restarted
        # while a killed one's batch is still pending would acknowledge that batch unstored (a fault run
        # lost cells that way).
        for message in batch:
            await message.ack()
        self.stats.batches += 1

    def _store_batch(self, batch: list[Any]) -> None:
        """One transaction per batch. On PostgreSQL the database decodes the `cells` lines itself; if it
        refuses one (a type it cannot cast), the batch goes again through the Python checks below."""
        if self.engine.dialect.name == "postgresql":
            raw = [(stream.microscope_of(m.subject), m.data) for m in batch if m.subject.endswith(".cells")]
            others = [m for m in batch if not m.subject.endswith(".cells")]
            try:
                with self.engine.begin() as conn:
                    if raw:
                        db.store_raw_cells(conn, raw)
                    db.store(conn, self._checked(others))
                self.stats.stored += len(batch)
                return
            except (sa_exc.DBAPIError, self._dbapi.Error, UnicodeDecodeError) as exc:
                # a value PostgreSQL cannot cast (or the database went away: then the path below fails too)
                log.warning("batch needs the message-by-message path: %s", str(exc).splitlines()[0])
        items = self._checked(batch)
        try:
            with self.engine.begin() as conn:
                db.store(conn, items)
            self.stats.stored += len(items)
        except self._refused:
            for item in items:  # one message the database refuses must not hold up the stream for ever
                try:
                    with self.engine.begin() as conn:
                        db.store(conn, [item])
                    self.stats.stored += 1
                except self._refused as exc:
                    self.stats.malformed += 1
                    log.warning("database refused a message from %s: %s; dropped", item[0],
                                str(exc).splitlines()[0])

    def _checked(self, batch: list[Any]) -> list[tuple[str, str, dict[str, Any]]]:
        items = []
        for message in batch:
            item = parse(message.subject, message.data)
            if item is None:
                self.stats.malformed += 1
                log.warning("unusable message on %s: acknowledged and dropped", message.subject)
            else:
                items.append(item)
        return items
