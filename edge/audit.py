"""Audit log: every published `cells` message as one JSON line, flushed per frame.

Appending whole lines and flushing each means a crash loses at most the frame being written, and
a reader can always drop a torn last line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TextIO

from edge.errors import ConfigError


class AuditLog:
    def __init__(self, path: Path, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle: TextIO = self.path.open("a", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"audit.path = {str(path)!r} cannot be written: {exc.strerror or exc}") from None

    def write(self, message: dict[str, Any]) -> None:
        self._handle.write(json.dumps(message, separators=(",", ":")) + "\n")
        self._handle.flush()
        if self.fsync:
            os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()
