"""The shipper, on each edge: sends its audit log (every `cells` message) and the display's session files
(decisions and sign-offs) to NATS JetStream, and remembers how far the stream acknowledged.

The offset is saved (write-then-rename) only after JetStream acknowledged every line before it, so a
crash re-sends at most one batch; JetStream drops the repeats by message id, and the database by key.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.collector import stream
from edge.fileutil import atomic_write_bytes

log = logging.getLogger(__name__)

BATCH = 500  # lines published before waiting for their acknowledgements
MAX_LINE = 8 << 20
MAX_CROP = 256 << 10


@dataclass
class Position:
    inode: int = 0
    offset: int = 0
    line: int = 0  # lines consumed so far (names a review line)


@dataclass
class ShipperState:
    """Per file: how far JetStream has acknowledged. Saved as JSON beside nothing else."""

    files: dict[str, Position] = field(default_factory=dict)
    skipped: int = 0  # unreadable lines (a line torn by a crash); counted, never shipped

    @classmethod
    def load(cls, path: Path) -> ShipperState:
        try:
            raw = json.loads(path.read_text())
            return cls({k: Position(**v) for k, v in raw["files"].items()}, int(raw.get("skipped", 0)))
        except FileNotFoundError:
            return cls()
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"shipper state {path} is unreadable ({exc}); move it away to ship all again") from None

    def save(self, path: Path) -> None:
        data = {"files": {k: vars(v) for k, v in self.files.items()}, "skipped": self.skipped}
        atomic_write_bytes(path, json.dumps(data, indent=1).encode(), mode=0o600)


@dataclass
class Outgoing:
    subject: str
    msg_id: str
    data: bytes


def with_crop(record: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A decision's saved crop (beside the session file) travels inside it, base64, so reports made at
    the lab show the cell the reviewer saw; a missing or oversized crop is left out."""
    crop = record.get("crop")
    if not isinstance(crop, str) or ".." in Path(crop).parts:
        return record
    try:
        data = (folder / crop).read_bytes()
    except OSError:
        return record
    if len(data) > MAX_CROP:
        return record
    return {**record, "crop_jpeg_b64": base64.b64encode(data).decode("ascii")}


def read_new(path: Path, position: Position, limit: int) -> tuple[list[bytes], Position]:
    """Complete lines after ``position`` (a torn last line waits for its newline); a new or shorter file
    (rotated, replaced) starts again at 0."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return [], position
    if stat.st_ino != position.inode or stat.st_size < position.offset:
        if position.inode:
            log.warning("%s was replaced or truncated: shipping it from the start", path)
        position = Position(stat.st_ino, 0, 0)
    if stat.st_size == position.offset:
        return [], position
    with path.open("rb") as handle:
        handle.seek(position.offset)
        chunk = handle.read(min(stat.st_size - position.offset, MAX_LINE * 2))
    lines = chunk.split(b"\n")[:-1][:limit]  # the part after the last newline is not a whole line yet
    consumed = sum(len(line) + 1 for line in lines)
    if not lines and len(chunk) >= MAX_LINE * 2:
        raise ValueError(f"{path}: a line longer than {MAX_LINE} bytes")
    return lines, Position(position.inode, position.offset + consumed, position.line + len(lines))


class Shipper:
    """Ships one edge's files; ``run`` loops until ``stop`` is set."""

    def __init__(self, microscope: str, audit: Path, sessions: Path | None, state_path: Path,
                 nats: stream.NatsOptions, poll_s: float = 0.1) -> None:
        self.microscope = microscope
        self.audit = Path(audit)
        self.sessions = Path(sessions) if sessions else None
        self.state_path = Path(state_path)
        self.state = ShipperState.load(self.state_path)
        self.nats = nats
        self.poll_s = poll_s
        self.shipped = 0
        self.stop = asyncio.Event()

    def _files(self) -> list[tuple[str, Path]]:
        files = [("cells", self.audit)]
        if self.sessions is not None and self.sessions.is_dir():
            files += [("review", p) for p in sorted(self.sessions.glob("slide-*.jsonl"))]
        return files

    def _outgoing(self, kind: str, path: Path, lines: list[bytes], first_line: int) -> list[Outgoing]:
        out: list[Outgoing] = []
        for number, line in enumerate(lines, first_line + 1):
            try:
                record = json.loads(line)
                if kind == "cells":
                    key = f"{record['run']}/{int(record['seq'])}"
                    data = line
                else:
                    key = f"{path.stem}/{number}"
                    record = with_crop(record, path.parent)
                    data = json.dumps({"slide": path.stem, "line": number, "record": record}).encode()
            except (ValueError, KeyError, TypeError):
                self.state.skipped += 1
                log.warning("%s line %d is not a whole message (torn by a crash?): skipped", path, number)
                continue
            out.append(Outgoing(stream.subject(self.microscope, kind), stream.message_id(self.microscope, kind, key),
                                data))
        return out

    async def run(self) -> None:
        client = await stream.connect(self.nats)
        try:
            js = client.jetstream()
            await stream.ensure_stream(js)
            while not self.stop.is_set():
                if not await self._once(js):
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self.stop.wait(), self.poll_s)
        finally:
            await client.close()

    async def _once(self, js: Any) -> bool:
        """Ship one batch per file; True when anything was sent."""
        sent = False
        for kind, path in self._files():
            name = str(path.resolve())
            position = self.state.files.get(name, Position())
            lines, after = read_new(path, position, BATCH)
            if after.inode != position.inode:
                position = Position(after.inode, 0, 0)
            if not lines:
                if after != position:
                    self.state.files[name] = after
                continue
            batch = self._outgoing(kind, path, lines, position.line)
            await self._publish(js, batch)
            self.state.files[name] = after
            self.state.save(self.state_path)  # only after every line before ``after`` was acknowledged
            self.shipped += len(batch)
            sent = True
        return sent

    async def _publish(self, js: Any, batch: list[Outgoing]) -> None:
        """Publish and wait for every acknowledgement, retrying the whole batch until the stream takes it."""
        from nats.errors import Error as NatsError

        delay = 0.2
        while True:
            try:
                await asyncio.gather(*(js.publish(m.subject, m.data, timeout=5, headers={"Nats-Msg-Id": m.msg_id})
                                       for m in batch))
                return
            except (NatsError, asyncio.TimeoutError, OSError) as exc:
                log.warning("JetStream did not take %d message(s) (%s); retrying", len(batch), exc or type(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


def default_state_path(microscope: str) -> Path:
    base = Path(os.environ.get("CYTOEDGE_STATE_DIR", Path.home() / ".local/share/cytoedge"))
    return base / f"shipper-{microscope}.json"
