"""The hand-off between capture and inference.

A live camera must never wait for inference: when the queue is full the *oldest* frame is dropped
(and counted), so the frame classified next is always the newest. A replay at full speed has no
camera to protect, so there the producer waits instead and nothing is lost.
"""

from __future__ import annotations

import threading
from collections import deque

from edge.frames import Frame


class FrameQueue:
    def __init__(self, maxsize: int, drop_oldest: bool) -> None:
        self.maxsize = maxsize
        self.drop_oldest = drop_oldest
        self.dropped = 0
        self._frames: deque[Frame] = deque()
        self._changed = threading.Condition()
        self._closed = False

    def put(self, frame: Frame, stop: threading.Event) -> bool:
        """Queue a frame; False when the queue was closed or stop was requested while waiting."""
        with self._changed:
            while len(self._frames) >= self.maxsize and not self.drop_oldest:
                if self._closed or stop.is_set():
                    return False
                self._changed.wait(0.1)
            if self._closed:
                return False
            if len(self._frames) >= self.maxsize:
                self._frames.popleft()
                self.dropped += 1
            self._frames.append(frame)
            self._changed.notify_all()
            return True

    def get(self, timeout_s: float) -> Frame | None:
        with self._changed:
            if not self._frames:
                self._changed.wait(timeout_s)
            if not self._frames:
                return None
            frame = self._frames.popleft()
            self._changed.notify_all()
            return frame

    def close(self) -> None:
        """No more frames will come; wakes a producer blocked on a full queue."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def __len__(self) -> int:
        return len(self._frames)
