"""Ingest: inbound media and data-channel input of one session, turned into input for micro-turns.

- :class:`AudioIngest` takes each decoded 48 kHz mono packet (from :mod:`webrtc_gateway.jitter`), resamples it to
  16 kHz and writes it onto the :class:`~webrtc_gateway.timeline.InputTimeline` at the position its RTP timestamp
  names, and tells the :class:`~webrtc_gateway.timeline.MediaClock` when it arrived.
- :class:`VideoIngest` keeps only the latest frame and downscales it when a micro-turn asks for it.
- :class:`Inbox` holds typed text and control events until the micro-turn in which they arrived is dispatched.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import TypeVar

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from microturn.contracts import MICRO_TURN_MS, VIDEO_HEIGHT, VIDEO_WIDTH, ControlEvent
from webrtc_gateway.resample import RATIO, Decimator
from webrtc_gateway.timeline import InputTimeline, MediaClock

log = logging.getLogger(__name__)

INPUT_RATE = 48_000
FrameT = TypeVar("FrameT", av.AudioFrame, av.VideoFrame)


async def consume(track: MediaStreamTrack, kind: type[FrameT], feed: Callable[[FrameT], None]) -> None:
    """Read a remote track until it ends, feeding every frame (an unread aiortc track's queue grows without bound)."""
    try:
        while True:
            frame = await track.recv()
            assert isinstance(frame, kind)
            feed(frame)
    except MediaStreamError:
        log.debug("%s track ended", track.kind)


class AudioIngest:
    """Feeds one session's inbound audio onto its timeline."""

    def __init__(self, timeline: InputTimeline, clock: MediaClock,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.timeline = timeline
        self.clock = clock
        self.frames = 0
        self.gaps = 0  # discontinuities in the RTP timestamps (lost packets)
        # set when the clock first anchors and when the pending micro-turn is complete: the micro-turn clock waits on
        # it, and waking it for every packet in between would only cost time
        self.changed = asyncio.Event()
        self._now = now
        self._decimator = Decimator()
        self._expected_pts: int | None = None

    def feed(self, pts: int, mono: np.ndarray) -> None:
        """``mono``: 48 kHz float samples starting at ``pts`` (48 kHz samples since the stream began)."""
        if self._expected_pts is not None and pts != self._expected_pts:
            self.gaps += 1
            self._decimator.reset()
        self._expected_pts = pts + len(mono)
        usable = len(mono) - len(mono) % RATIO
        self.timeline.write(pts // RATIO, self._decimator.process(mono[:usable]))
        self.clock.observe((pts + len(mono)) / INPUT_RATE, self._now())
        self.frames += 1
        if self.frames == 1 or self.timeline.complete(self.timeline.next_turn):
            self.changed.set()


class VideoIngest:
    """Keeps the latest inbound video frame; converts it to the model's size only when asked."""

    def __init__(self, stale_after_s: float = 2.0, now: Callable[[], float] = time.monotonic) -> None:
        self.frames = 0
        self.stale_after_s = stale_after_s
        self._now = now
        self._latest: av.VideoFrame | None = None
        self._latest_at = -math.inf
        self._converted: tuple[av.VideoFrame, np.ndarray] | None = None

    def feed(self, frame: av.VideoFrame) -> None:
        self._latest, self._latest_at = frame, self._now()
        self.frames += 1

    def current(self) -> np.ndarray | None:
        """The latest frame as (VIDEO_HEIGHT, VIDEO_WIDTH, 3) RGB, or None if there is none recent."""
        frame = self._latest
        if frame is None or self._now() - self._latest_at > self.stale_after_s:
            return None
        if self._converted is None or self._converted[0] is not frame:
            rgb = frame.reformat(width=VIDEO_WIDTH, height=VIDEO_HEIGHT, format="rgb24").to_ndarray()
            self._converted = (frame, rgb)
        return self._converted[1]

    async def run(self, track: MediaStreamTrack) -> None:
        await consume(track, av.VideoFrame, self.feed)


class Inbox:
    """Typed text and control events waiting for their micro-turn."""

    def __init__(self, timeline: InputTimeline, clock: MediaClock,
                 now: Callable[[], float] = time.monotonic) -> None:
        self._timeline = timeline
        self._clock = clock
        self._now = now
        self._items: list[tuple[int, str | ControlEvent]] = []

    def turn_now(self) -> int:
        """The micro-turn the current moment belongs to (never one already dispatched)."""
        pending = self._timeline.next_turn
        if not self._clock.anchored:
            return pending
        media_ms = self._clock.media_of(self._now()) * 1000
        return max(pending, int(media_ms // MICRO_TURN_MS))

    def put(self, item: str | ControlEvent) -> int:
        turn = self.turn_now()
        self._items.append((turn, item))
        return turn

    def take(self, turn: int) -> tuple[tuple[str, ...], tuple[ControlEvent, ...]]:
        """Everything that arrived in or before ``turn``: (texts, events)."""
        due = [item for t, item in self._items if t <= turn]
        self._items = [(t, item) for t, item in self._items if t > turn]
        texts = tuple(i for i in due if isinstance(i, str))
        events = tuple(i for i in due if isinstance(i, ControlEvent))
        return texts, events
