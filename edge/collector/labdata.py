"""What the lab page shows, read from the collector's database: microscopes and slides, each slide
rebuilt with the same code as `cytoedge report` so the lab and the bench agree."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from edge.collector import db
from edge.report import slide as slides

SLIDES_SHOWN = 50


def session_records(engine: Engine) -> dict[tuple[str, str], list[dict[str, Any]]]:
    query = sa.select(db.reviews.c.microscope, db.reviews.c.slide, db.reviews.c.record).order_by(
        db.reviews.c.microscope, db.reviews.c.slide, db.reviews.c.line)
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    with engine.connect() as conn:
        for microscope, slide_id, record in conn.execute(query):
            grouped[(microscope, slide_id)].append(json.loads(record))
    return grouped


def cells_messages(engine: Engine, microscope: str, runs: list[str]) -> list[dict[str, Any]]:
    """The slide's `cells` messages, rebuilt from the messages and cells tables in frame order."""
    m, c = db.messages, db.cells
    with engine.connect() as conn:
        rows = conn.execute(sa.select(m).where(m.c.microscope == microscope, m.c.run.in_(runs), m.c.topic == "cells")
                            .order_by(m.c.run, m.c.seq)).mappings().all()
        cell_rows = conn.execute(sa.select(c).where(c.c.microscope == microscope, c.c.run.in_(runs))
                                 .order_by(c.c.run, c.c.seq, c.c.cell_id)).mappings().all()
    by_message: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in cell_rows:
        by_message[(row["run"], row["seq"])].append({
            "id": row["cell_id"], "kind": row["kind"], "label": row["label"], "review": row["review"],
            "first_seen": row["first_seen"], "bbox": json.loads(row["bbox"] or "null"),
            "probs": json.loads(row["probs"] or "null"), "uncertainty": row["uncertainty"], "anomaly": row["anomaly"],
        })
    return [
        {"run": r["run"], "seq": r["seq"], "frame_id": r["frame_id"], "published_at": r["published_at"],
         "model": r["model"], "source": r["source"], "domain_alarm": r["domain_alarm"],
         "domain_checked": r["domain_checked"], "cells": by_message[(r["run"], r["seq"])]}
        for r in rows
    ]


def build_slide(engine: Engine, microscope: str, slide_id: str, target: int = 100,
                records: list[dict[str, Any]] | None = None) -> slides.Slide | None:
    """The slide as `cytoedge report` would build it from the same lines; None while nothing is stored."""
    if records is None:
        records = session_records(engine).get((microscope, slide_id))
    if records is None:
        return None
    decisions = slides.latest_decisions(records)
    end = slides.slide_end(records)
    runs = sorted(end["frames"]) if end else sorted({key[0] for key in decisions})
    if not runs:
        return None
    model = None
    messages = cells_messages(engine, microscope, runs)
    if messages:
        model = messages[-1]["model"]
    try:
        slide = slides.build(messages, decisions, slide_id, microscope, target, runs, slides.card_checksum(model),
                             end)
    except (slides.ReportError, KeyError, TypeError, ValueError, IndexError):
        return None  # nothing of the slide stored yet, or a session line the collector cannot read
    signed = slides.recorded_signoff(records)
    if signed is not None and not slide.unreviewed:
        slide.sign(signed["name"], float(signed.get("time", time.time())))
    return slide


def overview(engine: Engine, live: dict[str, dict[str, Any]], stale_after_s: float,
             target: int = 100) -> dict[str, Any]:
    """Microscopes (configured or seen) with their live state, and every slide with its review state."""
    now = time.time()
    with engine.connect() as conn:
        stored = {row["microscope"]: dict(row) for row in conn.execute(sa.select(db.microscopes)).mappings()}
        counts = dict(conn.execute(sa.select(db.messages.c.microscope, sa.func.count()).group_by(
            db.messages.c.microscope)).all())
    names = sorted(set(stored) | set(live))
    scopes = []
    for name in names:
        status_at = live.get(name, {}).get("at") or (stored.get(name) or {}).get("last_status_at")
        status = live.get(name, {}).get("status")
        if status is None and (stored.get(name) or {}).get("last_status"):
            status = json.loads(stored[name]["last_status"])
        online = status_at is not None and now - status_at <= stale_after_s
        scopes.append({
            "microscope": name,
            "online": online,
            "state": (status or {}).get("state") if online else "offline",
            "fps": (status or {}).get("fps") if online else None,
            "model": (status or {}).get("model"),
            "last_status_age_s": None if status_at is None else round(now - status_at, 1),
            "last_message_age_s": None if not (stored.get(name) or {}).get("last_message_at")
            else round(now - stored[name]["last_message_at"], 1),
            "messages": counts.get(name, 0),
        })
    slide_rows = []
    # Newest first (slide ids start with their local start time), at most SLIDES_SHOWN: each is rebuilt
    # from its cells on every refresh.
    newest = sorted(session_records(engine).items(), key=lambda item: (item[0][1], item[0][0]), reverse=True)
    for (microscope, slide_id), records in newest[:SLIDES_SHOWN]:
        slide = build_slide(engine, microscope, slide_id, target, records)
        if slide is None:
            continue
        content = slide.as_json()
        slide_rows.append({
            "microscope": microscope, "slide": slide_id, "white_total": slide.white_total,
            "finished": slides.slide_end(records) is not None,
            "target_reached": slide.target_reached,
            "differential": {r["class"]: r["percent"] for r in content["differential"] if r["count"]},
            "review": content["review"], "banner": slide.banner, "signoff": content["signoff"],
            "report": f"/report/{microscope}/{slide_id}.pdf",
        })
    return {"server_time": now, "microscopes": scopes, "slides": slide_rows}
