"""The cell as it travels from the finder to the publisher.

One typed record instead of a dict that three stages add keys to: the finder's box and kind, the
classifier's answer, the tracker's identity, and the crop the model saw (kept for thumbnails and the
domain alarm, never sent). ``edge.messages.cell_record`` turns it into the wire map of docs/messages.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CLASSIFIED_KINDS = ("wbc", "platelet")  # red cells are counted, not classified


@dataclass
class Cell:
    id: int  # index within its frame
    bbox: tuple[int, int, int, int]  # x, y, width, height in frame pixels
    kind: str  # "wbc" | "rbc" | "platelet", from the cell finder
    label: str | None = None  # the classifier's top class; None for red cells
    probs: dict[str, float] | None = None
    uncertainty: float | None = None
    anomaly: float | None = None
    review: bool = False
    track: int | None = None  # set by the tracker
    first_seen: bool = True
    crop: np.ndarray | None = field(default=None, repr=False, compare=False)  # what the classifier saw

    @property
    def classified(self) -> bool:
        return self.kind in CLASSIFIED_KINDS
