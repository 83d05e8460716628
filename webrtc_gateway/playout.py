"""Egress audio: the playout buffer and the outbound track that paces it in 20 ms frames at 48 kHz.

The buffer holds only what the model produced. Frames leave on a 20 ms grid; when the buffer is empty the track
sends silence and never stalls. Model output arrives once per micro-turn, paced by the browser's own audio clock, so
the grid follows it: output that lands in an empty buffer goes out at once and the grid is re-phased to it, and
while the model is speaking a due frame waits up to ``tolerance`` for late output before silence is sent (and
counted as an underrun). Latency therefore never creeps up with jitter, and the grid never drifts: send times are
``anchor + n * 20 ms`` from an integer frame count, and RTP timestamps advance exactly 960 per frame.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from collections.abc import Callable

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from webrtc_gateway.resample import Interpolator

RATE = 48_000
FRAME_SAMPLES = 960  # 20 ms
FRAME_S = FRAME_SAMPLES / RATE
TIME_BASE = fractions.Fraction(1, RATE)


class FrameSchedule:
    """When each outgoing frame is due. Pure arithmetic, so pacing can be tested over hours of simulated time."""

    def __init__(self, tolerance_s: float = 0.015) -> None:
        self.tolerance = tolerance_s
        self._anchor: float | None = None
        self._count = 0  # frames sent since the anchor

    @property
    def next_due(self) -> float | None:
        return None if self._anchor is None else self._anchor + self._count * FRAME_S

    def wait_until(self, now: float, buffered: bool, speaking: bool) -> float:
        """Until when to wait before sending: the due time, or a little later for output that is late."""
        if self._anchor is None:
            self._anchor = now
        due = self._anchor + self._count * FRAME_S
        return due if buffered or not speaking else due + self.tolerance

    def sent(self, at: float, rephase: bool) -> None:
        """A frame left at ``at``; ``rephase`` restarts the grid there (output landed in an empty buffer)."""
        assert self._anchor is not None
        due = self._anchor + self._count * FRAME_S
        if rephase or at > due + FRAME_S:  # new output, or the loop stalled a whole frame: restart the grid here
            self._anchor, self._count = at, 0
        self._count += 1


class PlayoutTrack(MediaStreamTrack):
    """The outbound audio track of one session."""

    kind = "audio"

    def __init__(self, max_buffer_s: float = 2.0, tolerance_s: float = 0.015,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.schedule = FrameSchedule(tolerance_s)
        self.frames_out = 0
        self.underrun_frames = 0  # silence sent while the model was speaking, because its output was late
        self.overrun_samples = 0  # output dropped because the buffer was full
        self.speaking = False  # set once output flows; cleared when the session stops producing
        self._clock = clock
        self._max = int(max_buffer_s * RATE)
        self._buffer = np.zeros(0, np.float32)
        self._interp = Interpolator()
        self._arrived = asyncio.Event()
        self._pts = 0

    @property
    def buffered_samples(self) -> int:
        return len(self._buffer)

    def push(self, audio_16k: np.ndarray) -> None:
        """Queue one micro-turn of model audio (16 kHz float)."""
        self._buffer = np.concatenate([self._buffer, self._interp.process(audio_16k)])
        if len(self._buffer) > self._max:
            self.overrun_samples += len(self._buffer) - self._max
            self._buffer = self._buffer[-self._max:]
        self.speaking = True
        self._arrived.set()

    def stop_speaking(self) -> None:
        """No more output is coming (the session is closing): silence from here is not an underrun."""
        self.speaking = False

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        buffered = len(self._buffer) >= FRAME_SAMPLES
        until = self.schedule.wait_until(self._clock(), buffered, self.speaking)
        rephase = False
        if buffered:
            await asyncio.sleep(max(0.0, until - self._clock()))
        else:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), max(0.0, until - self._clock()))
                rephase = True
            except TimeoutError:
                pass
        if len(self._buffer) >= FRAME_SAMPLES:
            samples, self._buffer = self._buffer[:FRAME_SAMPLES], self._buffer[FRAME_SAMPLES:]
        else:
            samples = np.zeros(FRAME_SAMPLES, np.float32)
            if self.speaking:
                self.underrun_frames += 1
        self.schedule.sent(self._clock(), rephase)
        return self._frame(samples)

    def _frame(self, samples: np.ndarray) -> av.AudioFrame:
        pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(pcm.tobytes())
        frame.sample_rate = RATE
        frame.pts = self._pts
        frame.time_base = TIME_BASE
        self._pts += FRAME_SAMPLES
        self.frames_out += 1
        return frame
