"""`cytoedge collect` (lab server) and `cytoedge ship` (each edge): the durable path through NATS JetStream."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from edge.errors import ConfigError, CytoedgeError

log = logging.getLogger(__name__)


def add_collect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="collector.toml (database, nats, web, [[microscope]])")
    parser.add_argument("--listen", help="serve the lab page here instead of web.listen (HOST:PORT)")
    parser.add_argument("--frames-root", action="append", default=[], metavar="DIR",
                        help="where replayed frame paths are found for report pictures (default: current folder)")


def add_ship_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--microscope", required=True, help="this microscope's id (as in the collector's config)")
    parser.add_argument("--audit", required=True, metavar="FILE", help="the edge's audit log (audit.path)")
    parser.add_argument("--sessions", metavar="DIR", help="the display's sessions folder (decisions, sign-offs)")
    parser.add_argument("--nats", default="nats://127.0.0.1:4222", metavar="URL", help="the lab's NATS server")
    parser.add_argument("--credentials", default="", metavar="FILE", help="NATS .creds file, if the server wants one")
    parser.add_argument("--tls-ca", default="", metavar="FILE", help="CA to verify a tls:// NATS server")
    parser.add_argument("--state", metavar="FILE",
                        help="where acknowledged offsets are kept (default: $CYTOEDGE_STATE_DIR/shipper-ID.json)")


def _run_until_signal(main: object, stop: asyncio.Event) -> None:
    async def wrapper() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main  # type: ignore[misc]

    asyncio.run(wrapper())


def _nats_failure(exc: BaseException, url: str) -> CytoedgeError:
    return CytoedgeError(f"NATS at {url}: {exc or type(exc).__name__}")


def ship(args: argparse.Namespace) -> int:
    from edge.collector.ship import Shipper, default_state_path
    from edge.collector.stream import NatsOptions

    if not args.microscope.strip():
        raise ConfigError("--microscope must not be empty")
    if args.sessions and not Path(args.sessions).is_dir():
        raise ConfigError(f"sessions folder not found: {args.sessions}")
    state = Path(args.state) if args.state else default_state_path(args.microscope)
    try:
        shipper = Shipper(args.microscope, Path(args.audit), Path(args.sessions) if args.sessions else None, state,
                          NatsOptions(args.nats, args.credentials, args.tls_ca))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(f"cytoedge ship: {args.audit} → {args.nats} as {args.microscope} (offsets in {state})", flush=True)
    try:
        _run_until_signal(shipper.run(), shipper.stop)
    except OSError as exc:
        raise _nats_failure(exc, args.nats) from None
    except Exception as exc:
        if type(exc).__module__.startswith("nats"):
            raise _nats_failure(exc, args.nats) from None
        raise
    log.info("shipped %d record(s) this session; %d unreadable line(s) skipped in all", shipper.shipped,
             shipper.state.skipped)
    return 0


def collect(args: argparse.Namespace) -> int:
    from edge.collector import config as collector_config
    from edge.collector import db
    from edge.collector.ingest import Collector
    from edge.collector.live import LiveStatus
    from edge.collector.web import LabPage
    from edge.display.server import parse_listen

    config = collector_config.load(Path(args.config))
    try:
        engine = db.connect(config.database)
    except ConfigError:
        raise
    except Exception as exc:
        raise CytoedgeError(f"database {engine_name(config.database)}: {str(exc).splitlines()[0]}") from None
    live = LiveStatus(config.microscopes, engine)
    try:
        page = LabPage(engine, parse_listen(args.listen or config.listen), live.live, live.lock, config.stale_after_s,
                       config.target, [Path(p) for p in args.frames_root] or None)
    except OSError as exc:
        raise CytoedgeError(f"cannot serve the lab page on {args.listen or config.listen}: {exc.strerror}") from None
    collector = Collector(engine, config.nats)
    live.start()
    page.start()
    print(f"cytoedge collect: lab page {page.url}, database {engine_name(config.database)}, "
          f"NATS {config.nats.url}", flush=True)
    try:
        _run_until_signal(collector.run(), collector.stop)
    except OSError as exc:
        raise _nats_failure(exc, config.nats.url) from None
    except Exception as exc:
        if type(exc).__module__.startswith("nats"):
            raise _nats_failure(exc, config.nats.url) from None
        raise
    finally:
        live.stop.set()
        page.stop()
    log.info("stored %d message(s) in %d batch(es); %d unusable dropped", collector.stats.stored,
             collector.stats.batches, collector.stats.malformed)
    return 0


def engine_name(url: str) -> str:
    """The URL without a password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(unparseable url)"
