"""A session's input timeline: 16 kHz samples placed by media time, cut into 200 ms micro-turns.

Sample ``n`` of the timeline is media time ``n / 16000`` s after the session's first audio packet; micro-turn ``k``
is samples ``[k * 3200, (k + 1) * 3200)``. Audio is written at the position its RTP timestamp names, so lost or late
packets leave silence at their place and the timeline never drifts from media time. Only micro-turns not yet taken
are kept, in a bounded buffer; samples for a micro-turn already taken are dropped and counted.

:class:`MediaClock` maps media time to this machine's clock, so a micro-turn whose audio never completes can still
be dispatched at its wall-clock deadline.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from microturn.contracts import MICRO_TURN_SAMPLES, SAMPLE_RATE


class InputTimeline:
    """Pending input audio of one session, from the first micro-turn not yet taken onward."""

    def __init__(self, horizon_turns: int = 10) -> None:
        self.next_turn = 0  # the first micro-turn not yet taken
        self.high_water = 0  # one past the last sample written, in timeline samples
        self.late_samples = 0  # samples that arrived after their micro-turn was taken
        self.ahead_samples = 0  # samples beyond the horizon, dropped
        self._buffer = np.zeros(horizon_turns * MICRO_TURN_SAMPLES, np.float32)

    @property
    def base(self) -> int:
        """Timeline position of the first sample held."""
        return self.next_turn * MICRO_TURN_SAMPLES

    def write(self, position: int, samples: np.ndarray) -> None:
        """Place ``samples`` at timeline sample ``position``."""
        start, end = position, position + len(samples)
        if start < self.base:
            cut = min(self.base - start, len(samples))
            self.late_samples += cut
            samples, start = samples[cut:], start + cut
        limit = self.base + len(self._buffer)
        if end > limit:
            keep = max(0, limit - start)
            self.ahead_samples += len(samples) - keep
            samples, end = samples[:keep], start + keep
        if len(samples):
            self._buffer[start - self.base:end - self.base] = samples
            self.high_water = max(self.high_water, end)

    def complete(self, turn: int) -> bool:
        """Whether every sample up to the end of ``turn`` has had its chance to arrive."""
        return self.high_water >= (turn + 1) * MICRO_TURN_SAMPLES

    def take(self) -> np.ndarray:
        """Remove and return the next micro-turn's 3200 samples (silence where nothing arrived)."""
        turn = self._buffer[:MICRO_TURN_SAMPLES].copy()
        self._buffer[:-MICRO_TURN_SAMPLES] = self._buffer[MICRO_TURN_SAMPLES:]
        self._buffer[-MICRO_TURN_SAMPLES:] = 0
        self.next_turn += 1
        return turn


class MediaClock:
    """Maps the session's media time to wall-clock time.

    Each arrival gives an offset ``wall - media``; the clock uses the smallest offset seen in the current and the
    previous window (the least-delayed packet), so jitter does not move deadlines and slow clock drift is followed.
    How much later than that packets usually arrive is the jitter: :attr:`jitter` is the 95th percentile of the last
    ``jitter_packets`` arrivals' lateness, which the micro-turn clock adds to its deadlines. It is recomputed at most
    every ``refresh_packets`` arrivals (400 ms of 40 ms packets), not on every one: a quantile per packet was once the
    largest single cost of a session's event loop.
    """

    def __init__(self, window_s: float = 10.0, jitter_packets: int = 250, refresh_packets: int = 10) -> None:
        self.window_s = window_s
        self.refresh_packets = refresh_packets
        self._since_refresh = 0
        self._current = math.inf
        self._previous = math.inf
        self._window_start: float | None = None
        self._offsets: deque[float] = deque(maxlen=jitter_packets)
        self._jitter: float | None = None

    @property
    def anchored(self) -> bool:
        return self._window_start is not None

    def observe(self, media_s: float, wall_s: float) -> None:
        if self._window_start is None:
            self._window_start = wall_s
        elif wall_s - self._window_start >= self.window_s:
            self._previous, self._current = self._current, math.inf
            self._window_start = wall_s
        self._current = min(self._current, wall_s - media_s)
        self._offsets.append(wall_s - media_s)
        self._since_refresh += 1
        if self._since_refresh >= self.refresh_packets:
            self._jitter = None

    @property
    def jitter(self) -> float:
        """Lateness (s) that 95 % of recent packets stay within, relative to the least-delayed one."""
        if self._jitter is None:
            lateness = np.fromiter(self._offsets, float) - self.offset
            self._jitter = float(np.quantile(lateness, 0.95)) if lateness.size else 0.0
            self._since_refresh = 0
        return self._jitter

    @property
    def offset(self) -> float:
        return min(self._current, self._previous)

    def wall_of(self, media_s: float) -> float:
        return media_s + self.offset

    def media_of(self, wall_s: float) -> float:
        return wall_s - self.offset


def turn_end_seconds(turn: int) -> float:
    """Media time at which micro-turn ``turn`` ends."""
    return (turn + 1) * MICRO_TURN_SAMPLES / SAMPLE_RATE
