"""TensorRT engine cache: which engine fits, whether the file on disk is whole, and safe replacement.

An engine is only valid for the exact ONNX file, TensorRT version, GPU, precision and batch profile it
was built for (and, for INT8, the calibration data or Q/DQ model). Deserialising a wrong or truncated
engine can crash the process or silently give other answers, so every engine file starts with a
small header that records its key, the blob's length and sha256; :func:`check` verifies all of it
*before* TensorRT sees a byte. A JSON sidecar holds the same key for people and for `cytoedge doctor`.

Layout in ``engine_dir``::

    <model>-<precision>-<keyhash16>.engine       header + serialised engine (atomic replace)
    <model>-<precision>-<keyhash16>.engine.json  sidecar: full key, sizes, checksums, build facts

Pure Python: no TensorRT needed here, so all of this is tested on any machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.fileutil import TEMP_SUFFIX, atomic_write

MAGIC = b"CYTOENG1"
# magic, header length (uint32 LE), header JSON, engine blob.
_PREFIX = struct.Struct("<8sI")
KEY_FORMAT = 2  # 2: sm_count and tf32 added
PRECISIONS = ("fp32", "fp16", "int8")
STALE_TEMP_S = 3600.0


@dataclass(frozen=True)
class EngineKey:
    """Everything that makes an engine unusable when it changes."""

    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.7" (Jetson Orin)
    precision: str  # fp32 | fp16 | int8
    min_batch: int
    opt_batch: int
    max_batch: int
    # INT8 only: what the scales came from ("calibrator" = TRT 10 entropy calibrator over the
    # calibration set; "qdq" = a Q/DQ ONNX) and that input's checksum.
    int8_source: str | None = None
    int8_sha256: str | None = None
    # Multiprocessor count: pycuda's GPU name can be the same across Orin modules (Nano / NX / AGX).
    sm_count: int = 0
    # TF32 allowed in FP32 layers (TensorRT 10's default); False for fp32 engines, which clear it.
    tf32: bool = False
    model_name: str = "model"
    key_format: int = KEY_FORMAT

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {self.batch_profile}")
        if self.precision == "int8" and not (self.int8_source and self.int8_sha256):
            raise ValueError("an int8 key needs int8_source and int8_sha256 (what the INT8 scales came from)")
        if self.precision != "int8" and (self.int8_source or self.int8_sha256):
            raise ValueError("int8_source/int8_sha256 belong to int8 keys only")

    @property
    def batch_profile(self) -> tuple[int, int, int]:
        return (self.min_batch, self.opt_batch, self.max_batch)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> EngineKey:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def digest(self) -> str:
        """sha256 of the canonical JSON of the key (model_name excluded: renaming changes nothing)."""
        payload = {k: v for k, v in self.as_dict().items() if k != "model_name"}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"


def engine_filename(key: EngineKey) -> str:
    return f"{safe_name(key.model_name)}-{key.precision}-{key.digest()[:16]}.engine"


def engine_path(engine_dir: Path, key: EngineKey) -> Path:
    return Path(engine_dir) / engine_filename(key)


def sidecar_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".json")


def rebuild_command(onnx_path: Path | str, key: EngineKey, engine_dir: Path | str,
                    int8_onnx: Path | str | None = None) -> str:
    """The one command that builds the wanted engine; printed by every non-ok cache state."""
    parts = ["cytoedge", "engine", "build", str(onnx_path), "--precision", key.precision,
             "--opt-batch", str(key.opt_batch), "--max-batch", str(key.max_batch), "--engine-dir", str(engine_dir)]
    if key.precision == "int8" and key.int8_source == "qdq" and int8_onnx:
        parts += ["--int8-onnx", str(int8_onnx)]
    return " ".join(_quote(p) for p in parts)


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


@dataclass
class CacheState:
    """The verdict on one engine file; ``message`` is one line a user can act on."""

    status: str  # missing | mismatch | corrupt | ok
    path: Path
    reason: str = ""
    differences: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # field -> (found, wanted)
    command: str = ""
    found_key: EngineKey | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def message(self) -> str:
        text = f"engine {self.status}: {self.path}"
        if self.reason:
            text += f" ({self.reason})"
        if self.command and not self.ok:
            text += f"; rebuild with: {self.command}"
        return text


def _header(key: EngineKey, blob_len: int, blob_sha256: str) -> bytes:
    return json.dumps(
        {"key": key.as_dict(), "engine_bytes": blob_len, "engine_sha256": blob_sha256}, sort_keys=True
    ).encode()


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The parsed header and the offset where the engine blob starts; ValueError if malformed."""
    with open(path, "rb") as handle:
        prefix = handle.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size:
            raise ValueError("file shorter than the cytoedge engine header")
        magic, length = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise ValueError("not a cytoedge engine file (bad magic); raw TensorRT engines are not accepted")
        if length > 1 << 20:
            raise ValueError(f"header length {length} is implausible")
        raw = handle.read(length)
    if len(raw) < length:
        raise ValueError("header truncated")
    try:
        header = json.loads(raw)
        EngineKey.from_dict(header["key"])
        int(header["engine_bytes"])
        str(header["engine_sha256"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"header unreadable ({exc})") from None
    return header, _PREFIX.size + length


def _blob_digest(path: Path, offset: int) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        handle.seek(offset)
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def differences(found: EngineKey, wanted: EngineKey) -> dict[str, tuple[Any, Any]]:
    """Field -> (found, wanted) for every field that differs (model_name ignored)."""
    a, b = found.as_dict(), wanted.as_dict()
    return {k: (a[k], b[k]) for k in b if k != "model_name" and a.get(k) != b[k]}


def _describe(diffs: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k}: engine has {v[0]!r}, wanted {v[1]!r}" for k, v in diffs.items())


def check(path: Path, wanted: EngineKey, command: str = "", verify_blob: bool = True) -> CacheState:
    """missing / mismatch (which fields) / corrupt (truncated, bit flip, bad header) / ok.

    Reads the whole blob to hash it (tens of MB at most, well under a second on a Jetson), because a
    flipped bit in an engine is otherwise found only by a crash or by wrong answers.
    """
    path = Path(path)
    if not path.is_file():
        return CacheState("missing", path, "no engine built for this model, precision, profile and device yet",
                          command=command)
    try:
        header, offset = read_header(path)
    except (OSError, ValueError) as exc:
        return CacheState("corrupt", path, str(exc), command=command)
    found = EngineKey.from_dict(header["key"])
    diffs = differences(found, wanted)
    if diffs:
        return CacheState("mismatch", path, _describe(diffs), diffs, command, found)
    actual_len = path.stat().st_size - offset
    if actual_len != header["engine_bytes"]:
        return CacheState("corrupt", path, f"engine blob is {actual_len} bytes, header says {header['engine_bytes']} "
                          "(truncated or appended to)", command=command, found_key=found)
    if verify_blob:
        _, digest = _blob_digest(path, offset)
        if digest != header["engine_sha256"]:
            return CacheState("corrupt", path, "engine sha256 differs from its header (file damaged)",
                              command=command, found_key=found)
    return CacheState("ok", path, command=command, found_key=found)


def find(engine_dir: Path, wanted: EngineKey, command: str = "") -> CacheState:
    """The state of the wanted engine; when it is missing but an engine for the same model and
    precision exists (built on another TensorRT, GPU or profile), report that one as a mismatch so
    the user learns *why* a rebuild is needed."""
    target = engine_path(engine_dir, wanted)
    state = check(target, wanted, command)
    if state.status != "missing":
        return state
    best: CacheState | None = None
    for candidate in sorted(Path(engine_dir).glob(f"{safe_name(wanted.model_name)}-{wanted.precision}-*.engine")):
        other = check(candidate, wanted, command, verify_blob=False)
        if other.status == "mismatch" and (best is None or len(other.differences) < len(best.differences)):
            best = other
    if best is not None:
        best.reason = f"no engine for this key at {target.name}; nearest is {best.path.name}: {best.reason}"
        best.path = target
        return best
    return state


def read_engine(path: Path, wanted: EngineKey) -> bytes:
    """The verified engine blob; ValueError with the cache verdict if it is not usable."""
    state = check(path, wanted)
    if not state.ok:
        raise ValueError(state.message)
    _, offset = read_header(path)
    with open(path, "rb") as handle:
        handle.seek(offset)
        blob = handle.read()
    # Checked again on the bytes in memory: the file could have changed between check and read.
    if hashlib.sha256(blob).hexdigest() != read_header(path)[0]["engine_sha256"]:
        raise ValueError(f"engine corrupt: {path} changed while being read")
    return blob


def store(engine_dir: Path, key: EngineKey, blob: bytes, extra: dict[str, Any] | None = None,
          before_replace: Callable[[Path], None] | None = None) -> Path:
    """Write header + blob atomically, then the sidecar. The engine file is self-describing, so a
    crash between the two renames leaves a valid engine with an old or absent sidecar, never a
    sidecar that vouches for a damaged engine."""
    path = engine_path(engine_dir, key)
    digest = hashlib.sha256(blob).hexdigest()
    header = _header(key, len(blob), digest)
    atomic_write(path, [_PREFIX.pack(MAGIC, len(header)), header, blob], before_replace)
    sidecar = {"key": key.as_dict(), "key_sha256": key.digest(), "engine_file": path.name, "engine_bytes": len(blob),
               "engine_sha256": digest, "written_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               **(extra or {})}
    atomic_write(sidecar_path(path), [(json.dumps(sidecar, indent=1, sort_keys=True) + "\n").encode()])
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(engine_dir: Path, older_than_s: float = STALE_TEMP_S) -> list[Path]:
    """Remove temp files left by a crashed writer: its PID is gone, or the file is older than
    ``older_than_s`` (PIDs get reused). A live writer's temp file is left alone."""
    removed = []
    folder = Path(engine_dir)
    if not folder.is_dir():
        return removed
    now = time.time()
    for temp in folder.glob(f".*{TEMP_SUFFIX}"):
        match = re.match(rf"^\..+\.(\d+)\.[0-9a-f]{{8}}{re.escape(TEMP_SUFFIX)}$", temp.name)
        if not match:
            continue
        try:
            age = now - temp.stat().st_mtime
        except FileNotFoundError:
            continue
        if not _pid_alive(int(match.group(1))) or age > older_than_s:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
            removed.append(temp)
    return removed


@contextlib.contextmanager
def build_lock(engine_dir: Path) -> Iterator[None]:
    """One builder per engine folder (two services starting at once would both spend minutes building
    and race on the timing cache). An advisory flock, released by the kernel if the process dies."""
    import fcntl

    folder = Path(engine_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".build.lock", "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def default_engine_dir() -> Path:
    """$CYTOEDGE_STATE_DIR/engines under systemd (StateDirectory), else ~/.cache/cytoedge/engines."""
    state = os.environ.get("CYTOEDGE_STATE_DIR")
    if state:
        return Path(state) / "engines"
    return Path.home() / ".cache" / "cytoedge" / "engines"
