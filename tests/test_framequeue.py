"""The capture/inference hand-off: live sources drop the oldest frame, replays wait."""

from __future__ import annotations

import threading

import numpy as np

from edge.framequeue import FrameQueue
from edge.frames import Frame


def frame(index: int) -> Frame:
    return Frame(np.zeros((2, 2, 3), np.uint8), index, 0.0, "test")


def test_live_queue_drops_the_oldest_frame_and_counts_it() -> None:
    queue = FrameQueue(2, drop_oldest=True)
    stop = threading.Event()
    for index in range(5):
        assert queue.put(frame(index), stop)
    assert queue.dropped == 3
    assert [queue.get(0.01).frame_id, queue.get(0.01).frame_id] == [3, 4]
    assert queue.get(0.01) is None


def test_replay_queue_waits_for_the_consumer_and_loses_nothing() -> None:
    queue = FrameQueue(1, drop_oldest=False)
    stop = threading.Event()
    received: list[int] = []

    def consume() -> None:
        while len(received) < 20:
            item = queue.get(1.0)
            if item is not None:
                received.append(item.frame_id)

    consumer = threading.Thread(target=consume)
    consumer.start()
    for index in range(20):
        assert queue.put(frame(index), stop)
    consumer.join(5)
    assert received == list(range(20))
    assert queue.dropped == 0


def test_blocked_producer_is_released_by_stop() -> None:
    queue = FrameQueue(1, drop_oldest=False)
    stop = threading.Event()
    queue.put(frame(0), stop)
    results: list[bool] = []
    producer = threading.Thread(target=lambda: results.append(queue.put(frame(1), stop)))
    producer.start()
    stop.set()
    producer.join(2)
    assert results == [False]
