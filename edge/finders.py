"""Which cell finder a config runs: the classic image-processing finder or the learned detector.

Both return the same ``Detection`` list, so the service, ``annotate`` and ``adapt`` call whatever
:func:`configured_finder` gives them and never branch on the method themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge.cellfinder import Detection, FinderParams, find_cells
from edge.errors import ConfigError
from edge.models import bundled_models_dir

FindFn = Callable[[np.ndarray, float], list[Detection]]
DETECTOR_NAME = "detector-v1"


def bundled_detector_path() -> Path:
    return bundled_models_dir() / DETECTOR_NAME / "model.onnx"


def configured_finder(config: Mapping[str, Any]) -> FindFn:
    """``find(image_bgr, um_per_px)`` for the config's ``[detector]`` and ``[finder]`` sections."""
    section = config["detector"]
    if section["method"] == "classic":
        params = FinderParams(**config["finder"])
        return lambda image, um_per_px: find_cells(image, um_per_px, params)
    if section["method"] == "learned":
        from edge.learnedfinder import LearnedFinder

        path = Path(section["model"]).expanduser() if section["model"] else bundled_detector_path()
        return LearnedFinder(path, section["threads"]).find
    raise ConfigError(f"detector.method = {section['method']!r}: expected 'classic' or 'learned'")
