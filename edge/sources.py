"""Choosing the frame source named in config."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from edge.config import Config
from edge.errors import ConfigError, SourceError
from edge.replay import ReplaySource

if TYPE_CHECKING:
    from edge.capture import LiveSource


def bundled_samples() -> Path:
    """The BCCD frames shipped in the repository (present in a source checkout, not in a wheel)."""
    return Path(__file__).resolve().parents[1] / "samples" / "bccd"


def open_source(config: Config) -> ReplaySource | LiveSource:
    source = config["source"]
    if source["kind"] == "replay":
        path = Path(source["path"]).expanduser() if source["path"] else bundled_samples()
        if not source["path"] and not path.is_dir():
            raise SourceError(
                "source.path is empty and this installation has no bundled samples; "
                "set source.path to a folder, video or recorded session"
            )
        return ReplaySource(
            path,
            pace=source["pace"],
            fps=source["fps"],
            loop=source["loop"],
            max_pixels=config["pipeline"]["max_frame_pixels"],
        )
    if source["kind"] in ("opencv", "picamera2"):
        from edge.capture import open_camera

        return open_camera(
            {**config["camera"], "kind": source["kind"]}, max_pixels=config["pipeline"]["max_frame_pixels"]
        )
    raise ConfigError(f"source.kind = {source['kind']!r} is not one of 'replay', 'opencv', 'picamera2'")
