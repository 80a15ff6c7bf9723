"""collector.toml: the database, the NATS server, the lab page and the microscopes to watch."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from edge.collector.stream import NatsOptions
from edge.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class Microscope:
    id: str
    endpoint: str = ""  # the edge's PUB endpoint for live status; empty = durable data only
    server_key: str = ""  # CURVE: the edge's public key file
    client_key: str = ""  # CURVE: the collector's secret key file


@dataclass
class CollectorConfig:
    database: str = "sqlite:///cytoedge-lab.db"
    nats: NatsOptions = field(default_factory=NatsOptions)
    listen: str = "127.0.0.1:8090"
    stale_after_s: float = 5.0
    target: int = 100
    microscopes: list[Microscope] = field(default_factory=list)


_SECTIONS = {"database": {"url"}, "nats": {"url", "credentials", "tls_ca"},
             "web": {"listen", "stale_after_s", "target"}, "microscope": {"id", "endpoint", "server_key", "client_key"}}


def load(path: Path) -> CollectorConfig:
    """Parse and check; anything unknown or mistyped is a ConfigError naming the key (exit 2)."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"collector config not found: {path}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for section, value in raw.items():
        if section not in _SECTIONS:
            raise ConfigError(f"{path}: unknown section [{section}]")
        for table in value if isinstance(value, list) else [value]:
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: [{section}] must be a table")
            unknown = set(table) - _SECTIONS[section]
            if unknown:
                raise ConfigError(f"{path}: unknown key {section}.{sorted(unknown)[0]}")
            for key, item in table.items():
                if key not in ("stale_after_s", "target") and not isinstance(item, str):
                    raise ConfigError(f"{path}: {section}.{key} must be a string")
    config = CollectorConfig()
    config.database = raw.get("database", {}).get("url", config.database)
    nats = raw.get("nats", {})
    config.nats = NatsOptions(nats.get("url", config.nats.url), nats.get("credentials", ""), nats.get("tls_ca", ""))
    web = raw.get("web", {})
    config.listen = web.get("listen", config.listen)
    try:
        config.stale_after_s = float(web.get("stale_after_s", config.stale_after_s))
        config.target = int(web.get("target", config.target))
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: web.stale_after_s and web.target must be numbers") from None
    if config.target not in (100, 200):
        raise ConfigError(f"{path}: web.target must be 100 or 200")
    microscopes = raw.get("microscope", [])
    if not isinstance(microscopes, list):
        raise ConfigError(f"{path}: microscopes are [[microscope]] tables")
    seen: set[str] = set()
    for table in microscopes:
        if not table.get("id"):
            raise ConfigError(f"{path}: every [[microscope]] needs an id")
        if table["id"] in seen:
            raise ConfigError(f"{path}: microscope id {table['id']!r} appears twice")
        seen.add(table["id"])
        config.microscopes.append(Microscope(**table))
    return config
