"""CURVE authentication and encryption for the publisher and its subscribers.

Results leave the device only for displays that are on the allow-list: the publisher holds a secret
key, each subscriber has its own key pair, and the publisher accepts a subscriber only if that
subscriber's public key file is in the authorised-keys folder. ZeroMQ rejects others silently, so the
ZAP handler logs each rejected key once.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from edge.errors import ConfigError
from edge.fileutil import atomic_write_bytes

log = logging.getLogger(__name__)

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"


def is_loopback(endpoint: str) -> bool:
    """True when only this machine can reach the endpoint (ipc, inproc, or tcp on 127.x / ::1)."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = urlsplit(endpoint).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def _certificate(public: bytes, secret: bytes | None) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines = [
        f"#   cytoedge CURVE {'secret ' if secret else ''}certificate, made {stamp}",
        "#   ZeroMQ certificate format; keep the secret file private.",
        "metadata",
        "curve",
        f'    public-key = "{public.decode()}"',
    ]
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def new_keypair(folder: Path, name: str, overwrite: bool = False) -> tuple[Path, Path]:
    """Write NAME.key (public, 0644) and NAME.key_secret (owner only, 0600)."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"key name {name!r} must be a plain file name")
    folder.mkdir(parents=True, exist_ok=True)
    public_path, secret_path = folder / f"{name}{PUBLIC_SUFFIX}", folder / f"{name}{SECRET_SUFFIX}"
    if not overwrite and (public_path.exists() or secret_path.exists()):
        raise ConfigError(f"{public_path} or {secret_path} already exists; choose another name or --force")
    public, secret = zmq.curve_keypair()
    atomic_write_bytes(secret_path, _certificate(public, secret).encode(), mode=0o600)
    atomic_write_bytes(public_path, _certificate(public, None).encode(), mode=0o644)
    return public_path, secret_path


def load_keys(path: Path, need_secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read CURVE key file {path}: {exc}") from None
    if need_secret and not secret:
        raise ConfigError(f"{path} holds no secret key (use the .key_secret file)")
    if need_secret and os.stat(path).st_mode & 0o077:
        raise ConfigError(f"{path} is readable by others; run: chmod 600 {path}")
    return public, secret


@dataclass(frozen=True)
class ClientKeys:
    """What a subscriber needs: its own key pair and the publisher's public key."""

    client_secret_file: Path
    server_public_file: Path

    def apply(self, socket: zmq.Socket) -> None:
        public, secret = load_keys(self.client_secret_file, need_secret=True)
        server_public, _ = load_keys(self.server_public_file, need_secret=False)
        socket.curve_publickey = public
        socket.curve_secretkey = secret
        socket.curve_serverkey = server_public


class _AllowList:
    """ZAP credentials callback: accept keys found in the folder (re-read on each new connection, so
    adding a display needs no restart), and log each rejected key once."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._rejected: set[bytes] = set()
        self._lock = threading.Lock()

    def allowed_keys(self) -> set[bytes]:
        keys = set()
        for file in sorted(self.folder.glob(f"*{PUBLIC_SUFFIX}")):
            try:
                public, _ = zmq.auth.load_certificate(str(file))
            except (OSError, ValueError):
                log.warning("ignoring unreadable key file %s", file)
                continue
            keys.add(public)
        return keys

    def callback(self, _domain: str, key: bytes) -> bool:
        if key in self.allowed_keys():
            return True
        with self._lock:
            if key not in self._rejected:
                self._rejected.add(key)
                log.warning(
                    "rejected subscriber with unlisted CURVE key %s (add its .key file to %s to allow it)",
                    key.decode(errors="replace"),
                    self.folder,
                )
        return False


def secure_publisher(
    socket: zmq.Socket, context: zmq.Context, server_secret_file: Path, authorized_dir: Path
) -> ThreadAuthenticator:
    """Make ``socket`` a CURVE server that admits only allow-listed subscribers; call before bind."""
    if not authorized_dir.is_dir():
        raise ConfigError(f"security.authorized_keys = {str(authorized_dir)!r} is not a folder")
    public, secret = load_keys(server_secret_file, need_secret=True)
    authenticator = ThreadAuthenticator(context, log=logging.getLogger("edge.security.zap"))
    authenticator.start()
    authenticator.configure_curve_callback(domain="*", credentials_provider=_AllowList(authorized_dir))
    socket.curve_server = True
    socket.curve_publickey = public
    socket.curve_secretkey = secret
    return authenticator


def client_keys_from_flags(server_key: str | None, client_key: str | None) -> ClientKeys | None:
    """The subscriber commands' --server-key/--client-key pair: both or neither."""
    if not server_key and not client_key:
        return None
    if not (server_key and client_key):
        raise ConfigError("CURVE needs both --server-key (the publisher's .key) and --client-key (your .key_secret)")
    return ClientKeys(Path(client_key), Path(server_key))
