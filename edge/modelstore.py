"""The site-model store: model folders by name, one ACTIVE pointer, and a history to roll back along.

A site model is never swapped in silently: only `use` and `rollback` change ACTIVE, each change is
one fsynced line in history.jsonl, model folders are never deleted, and a model that does not open
(or whose bytes differ from its card's checksum) is refused before it becomes active.

Layout: ``STORE/<name>/model.onnx`` (+ card.md, card.json, reference.json ...), ``STORE/ACTIVE``
(the active name; absent = the bundled default model), ``STORE/history.jsonl``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.errors import ConfigError, ModelError
from edge.fileutil import atomic_write_bytes
from edge.modelmeta import ModelMetadata, file_sha256

MODEL_FILE = "model.onnx"
ACTIVE_FILE = "ACTIVE"
HISTORY_FILE = "history.jsonl"
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
_RESERVED = {ACTIVE_FILE, HISTORY_FILE}


def default_store_dir() -> Path:
    """$CYTOEDGE_MODEL_STORE, else $CYTOEDGE_STATE_DIR/models (the service), else ~/.local/share/cytoedge/models."""
    explicit = os.environ.get("CYTOEDGE_MODEL_STORE")
    if explicit:
        return Path(explicit).expanduser()
    state = os.environ.get("CYTOEDGE_STATE_DIR")
    if state:
        return Path(state) / "models"
    return Path.home() / ".local" / "share" / "cytoedge" / "models"


def store_dir(configured: str | Path | None) -> Path:
    """``model.store`` from config; empty = :func:`default_store_dir`."""
    return Path(configured).expanduser() if configured else default_store_dir()


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or name in _RESERVED:
        raise ConfigError(
            f"model name {name!r} is not allowed; use 1-100 of A-Z a-z 0-9 . _ - (not starting with a dot)"
        )
    return name


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path
    metadata: ModelMetadata
    sha256: str
    created: float  # model.onnx's modification time (kept when the folder is copied in)


def check_card(folder: Path, sha256: str) -> None:
    """The card's checksum must name these bytes: a model file changed after its card was written is refused."""
    card = folder / "card.json"
    if not card.exists():
        return
    try:
        expected = json.loads(card.read_text(encoding="utf-8")).get("sha256")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelError(f"{card}: unreadable card ({exc})") from None
    if expected and expected != sha256:
        raise ModelError(f"{folder / MODEL_FILE}: sha256 {sha256[:12]} does not match its card.json ({expected[:12]})")


def inspect_model(folder: Path, name: str = "") -> ModelInfo:
    """Open the model as the service would (ONNX Runtime, metadata, outputs) and check its card."""
    from edge.onnx_backend import OnnxRuntimeClassifier

    path = folder / MODEL_FILE
    classifier = OnnxRuntimeClassifier(path, threads=1)
    check_card(folder, classifier.sha256)
    return ModelInfo(name or folder.name, path, classifier.metadata, classifier.sha256, path.stat().st_mtime)


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".") and (p / MODEL_FILE).is_file())

    def model_path(self, name: str) -> Path:
        return self.root / check_name(name) / MODEL_FILE

    def active(self) -> str | None:
        try:
            name = (self.root / ACTIVE_FILE).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelError(f"cannot read the active site model from {self.root / ACTIVE_FILE}: {exc}") from None
        if not name:
            return None
        if not _NAME.fullmatch(name) or name in _RESERVED:
            raise ModelError(f"{self.root / ACTIVE_FILE} names {name!r}, which is not a model name")
        return name

    def active_model_path(self) -> Path | None:
        """The active model's file, or None for the bundled default; a missing one is an error, never a fallback."""
        name = self.active()
        if name is None:
            return None
        path = self.model_path(name)
        if not path.is_file():
            raise ModelError(
                f"the active site model {name!r} is missing ({path}); restore it, or choose another with "
                f"`cytoedge models use NAME --store {self.root}` or `cytoedge models rollback --store {self.root}`"
            )
        check_card(path.parent, file_sha256(path))
        return path

    def inspect(self, name: str) -> ModelInfo:
        path = self.model_path(name)
        if not path.is_file():
            raise ModelError(f"no model {name!r} in {self.root} (have: {', '.join(self.names()) or 'none'})")
        return inspect_model(path.parent, name)

    def add(self, source_dir: Path, name: str) -> Path:
        """Copy a finished model folder in under ``name``; it appears whole or not at all. Returns its folder."""
        source = Path(source_dir)
        target = self.root / check_name(name)
        if not (source / MODEL_FILE).is_file():
            raise ModelError(f"{source}: no {MODEL_FILE} in this folder")
        self.root.mkdir(parents=True, exist_ok=True)
        with self._locked():
            if target.exists():
                raise ConfigError(f"a model named {name!r} is already in {self.root}; choose another name")
            temp = Path(tempfile.mkdtemp(prefix=f".add-{name}.", dir=self.root))
            try:
                shutil.copytree(source, temp, dirs_exist_ok=True)
                for file in temp.rglob("*"):
                    if file.is_file():
                        with open(file, "rb") as handle:
                            os.fsync(handle.fileno())
                os.chmod(temp, 0o755)  # mkdtemp's 0700 would hide the model from the service user
                inspect_model(temp, name)
                os.rename(temp, target)
            except BaseException:
                shutil.rmtree(temp, ignore_errors=True)
                raise
        return target

    def use(self, name: str) -> str | None:
        """Make ``name`` active after checking it opens; returns the previously active name."""
        if not self.model_path(name).is_file():
            raise ConfigError(f"no model {name!r} in {self.root} (have: {', '.join(self.names()) or 'none'})")
        self.inspect(name)
        with self._locked():
            previous = self.active()
            if previous != name:
                self._set_active(name)
                self._log("use", previous, name)
        return previous

    def rollback(self) -> str | None:
        """Back to what was active before the last `use` still in effect (None = the bundled default)."""
        with self._locked():
            current = self.active()
            stack = self._undo_stack()
            target = stack[-1] if stack else None
            if target is None and current is None:
                return None
            if target is not None:
                try:
                    self.inspect(target)
                except ModelError as exc:
                    raise ModelError(f"cannot roll back to {target!r}: {exc}") from None
            self._set_active(target)
            self._log("rollback", current, target)
        return target

    def history(self) -> list[dict[str, Any]]:
        try:
            lines = (self.root / HISTORY_FILE).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except ValueError:
                raise ModelError(f"{self.root / HISTORY_FILE}:{number}: not a JSON line") from None
        return entries

    def _undo_stack(self) -> list[str | None]:
        """Each `use` pushes what it replaced, each `rollback` pops one: the top is where to go back to."""
        stack: list[str | None] = []
        for entry in self.history():
            if entry.get("action") == "use":
                stack.append(entry.get("from"))
            elif entry.get("action") == "rollback" and stack:
                stack.pop()
        return stack

    def _set_active(self, name: str | None) -> None:
        if name is None:
            (self.root / ACTIVE_FILE).unlink(missing_ok=True)
        else:
            atomic_write_bytes(self.root / ACTIVE_FILE, f"{name}\n".encode())

    def _log(self, action: str, before: str | None, after: str | None) -> None:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "action": action, "from": before, "to": after}
        with open(self.root / HISTORY_FILE, "a", encoding="utf-8") as out:
            out.write(json.dumps(entry) + "\n")
            out.flush()
            os.fsync(out.fileno())

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Two `use`/`rollback`/`add` at once must not interleave their ACTIVE and history writes."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
