"""pipeline.max_cells_per_frame caps what is classified (white cells, platelets), never the red cells,
which are only counted: a real frame through the real pipeline, model and publisher."""

from __future__ import annotations

import cv2
from conftest import SAMPLES

from edge import config as cfg
from edge.analysis import CLASSIFIED_KINDS
from edge.finders import configured_finder
from edge.frames import Frame
from edge.models import open_classifier
from edge.pipeline import Pipeline, Settings
from edge.publisher import Publisher
from edge.replay import ReplaySource


def test_cap_counts_classified_cells_and_keeps_every_red_cell(endpoint: str) -> None:
    config = cfg.load(None)
    find_cells = configured_finder(config)  # the finder the pipeline runs
    image = max((cv2.imread(str(p)) for p in sorted(SAMPLES.glob("*.jpg"))),
                key=lambda im: sum(d.kind in CLASSIFIED_KINDS for d in find_cells(im, 0.075)))
    found = find_cells(image, config["microscope"]["um_per_px"])
    classifiable = sum(d.kind in CLASSIFIED_KINDS for d in found)
    red = sum(d.kind == "rbc" for d in found)
    assert classifiable >= 2 and red > classifiable  # red cells come first in a frame's count, as on a smear
    cap = classifiable - 1
    config = cfg.with_overrides(config, "test", pipeline__max_cells_per_frame=cap)
    publisher = Publisher(endpoint)
    try:
        pipeline = Pipeline(ReplaySource(SAMPLES), open_classifier(None, "onnxruntime", 1), publisher,
                            Settings.from_config(config))
        message = pipeline.process(Frame(image, 0, 0.0, "test"))
    finally:
        publisher.close()
    assert message is not None
    cells = message["cells"]
    assert sum(c["kind"] == "rbc" for c in cells) == red, "red cells were cut by a cap meant for classification"
    assert sum(c["label"] is not None for c in cells) == cap
    assert pipeline.counters.truncated_cells == 1
    assert "1 cell(s) over the per-frame cap not classified" in pipeline.status_payload()["warnings"]
