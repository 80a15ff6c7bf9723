"""The collector's database through SQLAlchemy Core: PostgreSQL for a lab, SQLite for one bench, same code.

Every row has a natural key taken from the edge — (microscope, run, topic, seq) for a message and its
cells, (microscope, slide, line) for a review — and is inserted with ON CONFLICT DO NOTHING, so a
message delivered twice (a redelivery after a crash, a shipper replaying its log) is stored once.
The schema is versioned in `schema_version`; `migrate` applies the missing steps in one transaction.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from edge.errors import ConfigError

metadata = sa.MetaData()

schema_version = sa.Table("schema_version", metadata, sa.Column("version", sa.Integer, nullable=False))

microscopes = sa.Table(
    "microscopes", metadata,
    sa.Column("microscope", sa.String(128), primary_key=True),
    sa.Column("last_status", sa.Text),  # the latest `status` payload as JSON (live, from the PUB socket)
    sa.Column("last_status_at", sa.Float),
    sa.Column("last_message_at", sa.Float),  # the latest durable message stored
)

messages = sa.Table(
    "messages", metadata,
    sa.Column("microscope", sa.String(128), primary_key=True),
    sa.Column("run", sa.String(128), primary_key=True),
    sa.Column("topic", sa.String(16), primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("frame_id", sa.BigInteger),
    sa.Column("published_at", sa.Float),
    sa.Column("stored_at", sa.Float, nullable=False),
    sa.Column("model", sa.String(200)),
    sa.Column("source", sa.Text),
    sa.Column("domain_alarm", sa.Boolean),
    sa.Column("domain_checked", sa.Boolean),
    sa.Column("n_cells", sa.Integer, nullable=False),
)

cells = sa.Table(
    "cells", metadata,
    sa.Column("microscope", sa.String(128), primary_key=True),
    sa.Column("run", sa.String(128), primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),  # of the `cells` message that carried it
    sa.Column("cell_id", sa.Integer, primary_key=True),
    sa.Column("frame_id", sa.BigInteger, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("label", sa.String(64)),
    sa.Column("uncertainty", sa.Float),
    sa.Column("anomaly", sa.Float),
    sa.Column("review", sa.Boolean, nullable=False),
    sa.Column("first_seen", sa.Boolean, nullable=False),
    sa.Column("bbox", sa.String(64)),
    sa.Column("probs", sa.Text),
)

reviews = sa.Table(
    "reviews", metadata,
    sa.Column("microscope", sa.String(128), primary_key=True),
    sa.Column("slide", sa.String(128), primary_key=True),
    sa.Column("line", sa.Integer, primary_key=True),  # line number in the display's session file
    sa.Column("record", sa.Text, nullable=False),  # the line as written (a decision, or a sign-off)
    sa.Column("stored_at", sa.Float, nullable=False),
)


def _v1(conn: Connection) -> None:
    for table in (microscopes, messages, cells, reviews):
        table.create(conn, checkfirst=True)


def _v2(conn: Connection) -> None:
    # Plain DDL (both databases know IF NOT EXISTS): Index objects would attach to the shared tables above.
    # No second index on cells: the primary key's (microscope, run) prefix serves the slide queries, and each
    # index costs about a fifth of the insert time.
    conn.execute(sa.text("CREATE INDEX IF NOT EXISTS messages_by_time ON messages (microscope, published_at)"))


MIGRATIONS: Sequence[Callable[[Connection], None]] = (_v1, _v2)  # append only; index + 1 = version


def connect(url: str) -> Engine:
    """An engine for ``url`` (``sqlite:///lab.db``, ``postgresql+psycopg://user@host/db``), schema up to date."""
    try:
        backend = sa.engine.make_url(url).get_backend_name()
    except sa.exc.ArgumentError as exc:
        raise ConfigError(f"database url {url!r}: {exc}") from None
    if backend not in ("postgresql", "sqlite"):
        raise ConfigError(f"database url {url!r}: {backend} is not supported (PostgreSQL or SQLite)")
    try:
        engine = sa.create_engine(url, pool_pre_ping=True)
    except (sa.exc.ArgumentError, ImportError) as exc:
        raise ConfigError(f"database url {url!r}: {exc}") from None
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    migrate(engine)
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # the lab page reads while the collector writes
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def version(conn: Connection) -> int:
    if not sa.inspect(conn).has_table("schema_version"):
        return 0
    return int(conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0)


def migrate(engine: Engine) -> int:
    """Bring the schema to the newest version; a database newer than this code is refused, not touched."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(18018)"))  # two collectors starting at once
        current = version(conn)
        if current > len(MIGRATIONS):
            raise ConfigError(f"database schema version {current} is newer than this cytoedge ({len(MIGRATIONS)})")
        if current == 0:
            schema_version.create(conn, checkfirst=True)
        for step in MIGRATIONS[current:]:
            step(conn)
        if current < len(MIGRATIONS):
            conn.execute(schema_version.delete())
            conn.execute(schema_version.insert().values(version=len(MIGRATIONS)))
    return len(MIGRATIONS)


def _insert(conn: Connection, table: sa.Table) -> Any:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise ConfigError(f"database {conn.dialect.name} is not supported (PostgreSQL or SQLite)")
    return insert(table).on_conflict_do_nothing()


def store(conn: Connection, items: Iterable[tuple[str, str, dict[str, Any]]]) -> int:
    """Store shipped records (microscope, kind, payload) in the caller's transaction; returns how many.

    kind ``cells``: an audit-log line (one `cells` message); kind ``review``: one session-file line with
    ``slide`` and ``line`` added by the shipper.
    """
    now = time.time()
    message_rows: list[dict[str, Any]] = []
    cell_rows: list[dict[str, Any]] = []
    review_rows: list[dict[str, Any]] = []
    last: dict[str, float] = {}
    for microscope, kind, payload in items:
        last[microscope] = now
        if kind == "review":
            review_rows.append({"microscope": microscope, "slide": str(payload["slide"]),
                                "line": int(payload["line"]), "record": json.dumps(payload["record"]),
                                "stored_at": now})
            continue
        run, seq, frame_id = str(payload["run"]), int(payload["seq"]), int(payload["frame_id"])
        message_cells = payload.get("cells") or []
        message_rows.append({
            "microscope": microscope, "run": run, "topic": "cells", "seq": seq, "frame_id": frame_id,
            "published_at": payload.get("published_at"), "stored_at": now, "model": payload.get("model"),
            "source": payload.get("source"), "domain_alarm": bool(payload.get("domain_alarm", False)),
            "domain_checked": bool(payload.get("domain_checked", True)), "n_cells": len(message_cells),
        })
        for cell in message_cells:
            cell_rows.append({
                "microscope": microscope, "run": run, "seq": seq, "cell_id": int(cell["id"]),
                "frame_id": frame_id, "kind": str(cell["kind"]), "label": cell.get("label"),
                "uncertainty": cell.get("uncertainty"), "anomaly": cell.get("anomaly"),
                "review": bool(cell.get("review")), "first_seen": cell.get("first_seen", True) is not False,
                "bbox": json.dumps(cell.get("bbox")), "probs": json.dumps(cell.get("probs")),
            })
    for table, rows in ((messages, message_rows), (cells, cell_rows), (reviews, review_rows)):
        if not rows:
            continue
        if conn.dialect.name == "postgresql" and table is not reviews:
            _copy_insert(conn, table, rows)
        else:
            conn.execute(_insert(conn, table), rows)
    for microscope, at in last.items():
        _touch(conn, microscope, last_message_at=at)
    return len(message_rows) + len(review_rows)


def _copy_insert(conn: Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    """PostgreSQL's bulk path, same rows and same rule: COPY into a temporary table, then INSERT … ON
    CONFLICT DO NOTHING. Row-at-a-time INSERTs cost 1 s per 1000 messages of 20 cells here; this 0.2 s."""
    names = [column.name for column in table.columns]
    listed = ", ".join(names)
    staging = f"{table.name}_incoming"
    cursor = conn.connection.driver_connection.cursor()
    try:
        cursor.execute(f"CREATE TEMP TABLE IF NOT EXISTS {staging} (LIKE {table.name}) ON COMMIT DELETE ROWS")
        with cursor.copy(f"COPY {staging} ({listed}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row([row[name] for name in names])
        cursor.execute(f"INSERT INTO {table.name} ({listed}) SELECT {listed} FROM {staging} ON CONFLICT DO NOTHING")
    finally:
        cursor.close()


_CELLS_FROM_JSON = """
INSERT INTO messages (microscope, run, topic, seq, frame_id, published_at, stored_at, model, source,
                      domain_alarm, domain_checked, n_cells)
SELECT microscope, body->>'run', 'cells', (body->>'seq')::bigint, (body->>'frame_id')::bigint,
       (body->>'published_at')::float8, %(now)s, body->>'model', body->>'source',
       coalesce((body->>'domain_alarm')::boolean, false), coalesce((body->>'domain_checked')::boolean, true),
       jsonb_array_length(coalesce(body->'cells', '[]'::jsonb))
FROM raw_cells_incoming
ON CONFLICT DO NOTHING;
INSERT INTO cells (microscope, run, seq, cell_id, frame_id, kind, label, uncertainty, anomaly, review, first_seen,
                   bbox, probs)
SELECT i.microscope, i.body->>'run', (i.body->>'seq')::bigint, (c->>'id')::integer, (i.body->>'frame_id')::bigint,
       c->>'kind', c->>'label', (c->>'uncertainty')::float8, (c->>'anomaly')::float8,
       coalesce((c->>'review')::boolean, false), coalesce((c->>'first_seen')::boolean, true),
       (c->'bbox')::text, (c->'probs')::text
FROM raw_cells_incoming i, jsonb_array_elements(coalesce(i.body->'cells', '[]'::jsonb)) c
ON CONFLICT DO NOTHING;
"""


def store_raw_cells(conn: Connection, raw: list[tuple[str, bytes]]) -> None:
    """PostgreSQL only: audit lines as shipped, decoded and split into message and cell rows by the
    database itself (COPY as jsonb, then INSERT … SELECT … ON CONFLICT DO NOTHING): the collector's Python
    then does almost nothing per cell. Raises on anything PostgreSQL cannot cast; the caller then stores
    the batch through `store`, which checks each message in Python."""
    cursor = conn.connection.driver_connection.cursor()
    try:
        cursor.execute("CREATE TEMP TABLE IF NOT EXISTS raw_cells_incoming (microscope text, body jsonb) "
                       "ON COMMIT DELETE ROWS")
        with cursor.copy("COPY raw_cells_incoming (microscope, body) FROM STDIN") as copy:
            for microscope, data in raw:
                copy.write_row((microscope, data.decode("utf-8")))
        for statement in _CELLS_FROM_JSON.split(";")[:2]:
            cursor.execute(statement, {"now": time.time()} if "%(now)s" in statement else None)
    finally:
        cursor.close()
    for microscope in {m for m, _ in raw}:
        _touch(conn, microscope, last_message_at=time.time())


def _touch(conn: Connection, microscope: str, **values: Any) -> None:
    conn.execute(_insert(conn, microscopes), [{"microscope": microscope}])
    conn.execute(microscopes.update().where(microscopes.c.microscope == microscope).values(**values))


def set_status(engine: Engine, microscope: str, status: dict[str, Any] | None, at: float) -> None:
    with engine.begin() as conn:
        _touch(conn, microscope, last_status=None if status is None else json.dumps(status, default=str),
               last_status_at=at)
