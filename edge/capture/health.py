"""Keeping a live camera alive: stall and frozen-frame detection, reconnect with backoff, state reporting.

Cameras fail in three ways a lab sees: the device vanishes (USB unplugged, RTSP server restarted,
ribbon cable loose), the driver stops delivering frames while ``read()`` blocks forever, or it keeps
"succeeding" with the same buffer over and over. `LiveCapture` handles all three the same way for
every camera kind: the blocking calls (open, read, close) run in a worker thread that owns the
device, the consumer waits for frames with a timeout, and any failure ends that connection and
opens a new one after an exponentially growing pause. States change rarely and are logged once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

from edge.errors import SourceError
from edge.frames import Frame
from edge.replay import SourceStats

log = logging.getLogger(__name__)

STATES = ("connecting", "streaming", "stalled", "reconnecting", "failed")
StateCallback = Callable[[str, str], None]


@dataclass(frozen=True)
class ReconnectPolicy:
    """When to give up on a connection and how long to wait before the next one."""

    stall_timeout_s: float = 5.0  # no new frame for this long = stalled
    open_timeout_s: float = 20.0  # opening the device and its first frame may take this long
    initial_s: float = 0.5  # first pause before reconnecting ...
    max_s: float = 30.0  # ... doubling (``factor``) up to this
    factor: float = 2.0
    max_attempts: int = 0  # consecutive failed connections before `failed`; 0 = retry forever
    frozen_frames: int = 30  # this many identical frames (or timestamps) in a row = stalled; 0 = off

    def __post_init__(self) -> None:
        if not (self.stall_timeout_s > 0 and self.open_timeout_s > 0):
            raise ValueError("stall_timeout_s and open_timeout_s must be > 0")
        if not (0 < self.initial_s <= self.max_s) or self.factor < 1:
            raise ValueError("reconnect delays need 0 < initial_s <= max_s and factor >= 1")
        if self.max_attempts < 0 or self.frozen_frames < 0:
            raise ValueError("max_attempts and frozen_frames must be >= 0")


class Backoff:
    """Exponential delays: initial, initial*factor, ... capped at max; reset after a good connection."""

    def __init__(self, initial_s: float, max_s: float, factor: float = 2.0) -> None:
        self.initial_s, self.max_s, self.factor = initial_s, max_s, factor
        self._next = initial_s

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self.max_s, self._next * self.factor)
        return delay

    def reset(self) -> None:
        self._next = self.initial_s


def fingerprint(image: np.ndarray) -> int:
    """A cheap hash of a strided subsample (about 80x60 pixels). Not averaged: sensor noise makes two
    real exposures differ somewhere, while a driver re-delivering one buffer gives identical bytes."""
    step = max(1, min(image.shape[0], image.shape[1]) // 60)
    return zlib.crc32(np.ascontiguousarray(image[::step, ::step]).data)


class FrozenDetector:
    """Counts consecutive repeats of the same image or the same device timestamp."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._last_print: int | None = None
        self._last_stamp: float | None = None
        self.same_image = 0
        self.same_stamp = 0

    def is_repeat(self, image: np.ndarray) -> bool:
        """True when this image is byte-identical (in the subsample) to the previous one."""
        if self.limit <= 0:
            return False
        value = fingerprint(image)
        repeat = value == self._last_print
        self._last_print = value
        self.same_image = self.same_image + 1 if repeat else 0
        return repeat

    def stamp_repeats(self, stamp: float | None) -> None:
        if self.limit <= 0 or stamp is None:
            return
        self.same_stamp = self.same_stamp + 1 if stamp == self._last_stamp else 0
        self._last_stamp = stamp

    def problem(self) -> str | None:
        """A reason when the camera looks frozen, else None."""
        if self.limit <= 0:
            return None
        if self.same_image >= self.limit:
            return f"frozen: the same image {self.same_image + 1} times in a row"
        if self.same_stamp >= self.limit:
            return f"frozen: the same timestamp {self.same_stamp + 1} times in a row"
        return None


class StateTracker:
    """Holds the source state; logs and calls ``on_state`` only when it changes, never per frame."""

    def __init__(self, name: str, on_state: StateCallback | None = None, initial: str = "connecting") -> None:
        self.name = name
        self.on_state = on_state
        self.state = initial
        self.reason = ""
        self.problems: list[str] = []

    def set(self, state: str, reason: str) -> bool:
        if state == self.state:
            return False
        previous, self.state, self.reason = self.state, state, reason
        level = logging.INFO if state == "streaming" else logging.WARNING
        log.log(level, "camera %s: %s -> %s (%s)", self.name, previous, state, reason)
        problem = f"camera {state}: {reason}"
        if state != "streaming" and problem not in self.problems and len(self.problems) < 20:
            self.problems.append(problem)
        if self.on_state is not None:
            try:
                self.on_state(state, reason)
            except Exception:  # a broken hook must not kill the capture loop
                log.exception("on_state callback failed")
        return True


@dataclass
class Grab:
    """One frame from a device: BGR image, capture time (Unix s) and the device's own stamp if any."""

    image: np.ndarray
    captured_at: float
    device_stamp: float | None = None


class Device(Protocol):
    """An open camera. All three methods may block; they are only ever called from one worker thread."""

    def read(self) -> Grab | None: ...  # None = end of stream / device gone

    def close(self) -> None: ...


Opener = Callable[[], Device]


@dataclass
class _Failed:
    reason: str


class _Opened:
    pass


class _Connection:
    """One attempt at a device: a worker thread that opens, reads and finally closes it.

    The consumer never touches the device, so abandoning a connection whose ``read()`` hangs in the
    driver is safe: the worker closes the device whenever the call returns.
    """

    def __init__(self, opener: Opener, name: str) -> None:
        self._opener = opener
        self.items: queue.Queue[Grab | _Failed | _Opened] = queue.Queue(maxsize=1)
        self.cancelled = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"grab {name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            device = self._opener()
        except Exception as exc:
            self._post(_Failed(f"cannot open: {exc}"))
            return
        try:
            self._post(_Opened())
            while not self.cancelled.is_set():
                try:
                    grab = device.read()
                except Exception as exc:
                    self._post(_Failed(f"read failed: {exc}"))
                    return
                if grab is None:
                    self._post(_Failed("no frame from the device (end of stream, unplugged or closed)"))
                    return
                self._post(grab)
        finally:
            try:
                device.close()
            except Exception as exc:
                log.debug("closing the camera failed: %s", exc)

    def _post(self, item: Grab | _Failed | _Opened) -> None:
        """Hand one item over; waits while the consumer is busy (the driver then drops, not us)."""
        while not self.cancelled.is_set():
            try:
                self.items.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def cancel(self) -> None:
        self.cancelled.set()


class LiveCapture:
    """The reconnecting frame loop shared by every live camera kind."""

    HEARTBEAT_SLICE_S = 0.25
    STOP_JOIN_S = 2.0
    MAX_HUNG_WORKERS = 2

    def __init__(self, opener: Opener, name: str, policy: ReconnectPolicy, tracker: StateTracker) -> None:
        self.opener = opener
        self.name = name
        self.policy = policy
        self.tracker = tracker
        self.heartbeat = time.monotonic()
        self.duplicates = 0  # repeated frames not passed on
        self.connections = 0  # connections that delivered frames
        self.failures = 0  # consecutive failed connections (0 while streaming)
        self.last_problem = ""  # why the last connection ended or could not be made
        self._abandoned: list[_Connection] = []
        self._end_reason = ""

    def grabs(self, stop: threading.Event) -> Iterator[Grab]:
        """Yield frames until ``stop`` is set; reconnect on every failure; raise SourceError when the
        policy's attempts are used up."""
        backoff = Backoff(self.policy.initial_s, self.policy.max_s, self.policy.factor)
        self.failures = 0
        while not stop.is_set():
            self.heartbeat = time.monotonic()
            streamed = False
            reason = self._hung_workers()
            if reason is None:
                connection = _Connection(self.opener, self.name)
                ended = False
                try:
                    for grab in self._stream(connection, stop):
                        if not streamed:
                            streamed = True
                            self.failures = 0
                            backoff.reset()
                            self.connections += 1
                            self.tracker.set("streaming", "frames arriving")
                        yield grab
                    reason = self._end_reason
                    ended = not stop.is_set()
                finally:
                    connection.cancel()
                    if not ended:
                        # Stopping: let the worker leave the driver call and close the device, so the
                        # process never exits while a thread is inside OpenCV or libcamera.
                        connection.thread.join(timeout=self.STOP_JOIN_S)
                    if connection.thread.is_alive():
                        self._abandoned.append(connection)
            if stop.is_set():
                return
            self.failures += 1
            self.last_problem = reason
            if self.policy.max_attempts and self.failures >= self.policy.max_attempts:
                message = f"gave up after {self.failures} failed attempt(s): {reason}"
                self.tracker.set("failed", message)
                raise SourceError(f"camera {self.name}: {message}")
            delay = backoff.next_delay()
            self.tracker.set("reconnecting", f"{reason}; retrying")
            log.debug("camera %s: attempt %d failed (%s); next in %.2f s", self.name, self.failures, reason, delay)
            if self._sleep(delay, stop):
                return

    def _stream(self, connection: _Connection, stop: threading.Event) -> Iterator[Grab]:
        """Frames from one connection; sets ``_end_reason`` when it ends for any cause but stop."""
        frozen = FrozenDetector(self.policy.frozen_frames)
        timeout = self.policy.open_timeout_s
        opened = False
        while not stop.is_set():
            item = self._next(connection, timeout, stop)
            if item is None:
                if stop.is_set():
                    return
                if not opened:
                    self._end_reason = f"device did not open within {timeout:g} s"
                else:
                    self._end_reason = f"no frame for {timeout:g} s"
                    self.tracker.set("stalled", self._end_reason)
                return
            if isinstance(item, _Failed):
                self._end_reason = item.reason
                return
            if isinstance(item, _Opened):
                opened = True
                continue
            timeout = self.policy.stall_timeout_s
            repeat = frozen.is_repeat(item.image)
            frozen.stamp_repeats(item.device_stamp)
            problem = frozen.problem()
            if problem is not None:
                self._end_reason = problem
                self.tracker.set("stalled", problem)
                return
            if repeat:
                self.duplicates += 1
                continue
            yield item

    def _next(self, connection: _Connection, timeout: float, stop: threading.Event) -> object | None:
        """The next item, or None after ``timeout`` s or a stop; refreshes the heartbeat while waiting."""
        deadline = time.monotonic() + timeout
        while not stop.is_set():
            self.heartbeat = time.monotonic()
            left = deadline - self.heartbeat
            if left <= 0:
                return None
            try:
                return connection.items.get(timeout=min(self.HEARTBEAT_SLICE_S, left))
            except queue.Empty:
                continue
        return None

    def _sleep(self, seconds: float, stop: threading.Event) -> bool:
        """Wait, honouring a stop at once and keeping the heartbeat fresh; True when stopped."""
        deadline = time.monotonic() + seconds
        while True:
            self.heartbeat = time.monotonic()
            left = deadline - self.heartbeat
            if left <= 0:
                return stop.is_set()
            if stop.wait(min(self.HEARTBEAT_SLICE_S, left)):
                return True

    def _hung_workers(self) -> str | None:
        """Refuse to pile up threads stuck in a driver call; a hung device must return before we reopen."""
        self._abandoned = [c for c in self._abandoned if c.thread.is_alive()]
        if len(self._abandoned) >= self.MAX_HUNG_WORKERS:
            return f"{len(self._abandoned)} earlier capture call(s) still blocked in the driver"
        return None


class LiveSource:
    """What the pipeline sees of a camera: the ReplaySource protocol plus ``heartbeat`` and ``on_state``.

    Subclasses give an ``_open()`` that returns a `Device`; everything else is shared.
    """

    live = True

    def __init__(self, name: str, policy: ReconnectPolicy, on_state: StateCallback | None, max_pixels: int) -> None:
        self._name = name
        self.policy = policy
        self.max_pixels = max_pixels
        self.stats = SourceStats()
        self.tracker = StateTracker(name, on_state)
        self.tracker.problems = self.stats.warnings  # state changes show in status warnings
        self.capture = LiveCapture(self._open, name, policy, self.tracker)
        self._frame_id = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def state(self) -> str:
        return self.tracker.state

    @state.setter
    def state(self, value: str) -> None:  # the pipeline marks a source `failed` when it raises
        self.tracker.set(value, "set by the pipeline")

    @property
    def on_state(self) -> StateCallback | None:
        return self.tracker.on_state

    @on_state.setter
    def on_state(self, callback: StateCallback | None) -> None:
        self.tracker.on_state = callback

    @property
    def heartbeat(self) -> float:
        """time.monotonic() of the capture loop's last sign of life, frame or not (for the watchdog)."""
        return self.capture.heartbeat

    def _open(self) -> Device:
        raise NotImplementedError

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        """Frames until ``stop``; never ends on its own unless reconnect attempts are limited."""
        for grab in self.capture.grabs(stop):
            image = _as_bgr(grab.image)
            if image is None:
                self.stats.skip(f"{self.name}: frame with unexpected shape {grab.image.shape}")
                continue
            if image.shape[0] * image.shape[1] > self.max_pixels:
                self.stats.skip(f"{self.name}: {image.shape[1]}x{image.shape[0]} frame exceeds the pixel limit")
                continue
            self.stats.read += 1
            yield Frame(image, self._frame_id, grab.captured_at, self.name)
            self._frame_id += 1


def _as_bgr(image: np.ndarray) -> np.ndarray | None:
    """BGR uint8 H x W x 3 from what cameras deliver (grey, BGR, BGRA/XBGR); None if it is none of these."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.size == 0:
        return None
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return None
