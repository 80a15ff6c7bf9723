"""The JetStream side shared by shipper and collector: one stream, subjects per microscope, message ids.

The stream deduplicates on ``Nats-Msg-Id`` within its window and keeps messages on disk until the
collector acknowledges them (and for ``max_age`` after), so neither a collector outage nor a shipper
re-sending after a crash loses or doubles anything; the database key is the second guard.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from typing import Any

STREAM = "CYTOEDGE"
SUBJECTS = "cytoedge.>"
DUPLICATE_WINDOW_S = 600.0
MAX_AGE_S = 14 * 24 * 3600.0  # an outage longer than this loses data: documented in docs/collector.md
_SAFE = re.compile(r"[^A-Za-z0-9_-]")


def subject(microscope: str, kind: str) -> str:
    return f"cytoedge.{_SAFE.sub('_', microscope)}.{kind}"


def microscope_of(subject_name: str) -> str:
    return subject_name.split(".")[1]


def message_id(microscope: str, kind: str, key: str) -> str:
    return f"{_SAFE.sub('_', microscope)}/{kind}/{key}"


@dataclass
class NatsOptions:
    url: str = "nats://127.0.0.1:4222"
    credentials: str = ""  # a NATS .creds file (user JWT + NKEY seed), when the server requires it
    tls_ca: str = ""  # CA file to verify a tls:// server

    def connect_kwargs(self) -> dict[str, Any]:
        options: dict[str, Any] = {"servers": [self.url], "max_reconnect_attempts": -1, "reconnect_time_wait": 0.5,
                                   "connect_timeout": 2, "allow_reconnect": True}
        if self.credentials:
            options["user_credentials"] = self.credentials
        if self.tls_ca:
            options["tls"] = ssl.create_default_context(cafile=self.tls_ca)
        return options


async def connect(options: NatsOptions) -> Any:
    """A client that reconnects for ever once connected; but a server not there at start is an error now
    (nats-py would otherwise retry the first connection silently), so a typo in the URL is seen."""
    import asyncio
    from urllib.parse import urlsplit

    import nats

    parts = urlsplit(options.url if "://" in options.url else f"nats://{options.url}")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port or 4222), 3)
        writer.close()
    except (OSError, asyncio.TimeoutError) as exc:
        raise ConnectionError(f"cannot connect ({exc or 'timed out'})") from None
    return await nats.connect(**options.connect_kwargs())


async def ensure_stream(js: Any) -> None:
    """Create the stream if it is missing (shipper or collector, whichever starts first)."""
    from nats.js.api import StorageType, StreamConfig
    from nats.js.errors import NotFoundError

    try:
        await js.stream_info(STREAM)
    except NotFoundError:
        await js.add_stream(StreamConfig(name=STREAM, subjects=[SUBJECTS], storage=StorageType.FILE,
                                         duplicate_window=DUPLICATE_WINDOW_S, max_age=MAX_AGE_S))
