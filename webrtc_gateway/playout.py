"""Egress audio: the playout buffer and the outbound track that paces it in 40 ms frames at 48 kHz.

The buffer holds only what the model produced. Frames leave on a 40 ms grid; when the buffer is empty the track
sends silence and never stalls. The grid follows the model's output, which arrives once per micro-turn paced by the
browser's own audio clock:

- output that starts a talk spurt (it lands in an empty buffer while the model was quiet) goes out at once and the
  grid is re-phased to it;
- while the model speaks, a due frame with an empty buffer waits up to ``tolerance`` for late output; output that
  lands in that window goes out at once. If none comes, silence is sent and counted as an underrun; either way the
  grid moves later by the wait. After ``quiet_after`` underruns in a row the model counts as quiet again.

The grid only moves earlier at the start of a talk spurt, so frames never leave faster than real time within one;
it moves later only by observed lateness. Latency added that way is won back in silence: when output lands while
older output is still queued, the queued excess is recorded, and that many near-silent frames are skipped. Send times
are ``anchor + n * 40 ms`` from an integer frame count and RTP timestamps advance exactly 1920 a frame: nothing drifts.

Why 40 ms and not WebRTC's usual 20: each frame becomes one RTP packet, and the gateway's cost is mostly per packet
(encryption, a system call, aiortc's Python around them), so 40 ms halves it. It costs no latency: the model's
output arrives a whole 200 ms micro-turn at a time, five frames of it, and the first leaves at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import time
from collections.abc import Callable

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from webrtc_gateway.resample import Interpolator

RATE = 48_000
FRAME_SAMPLES = 1920  # 40 ms: one Opus packet
FRAME_S = FRAME_SAMPLES / RATE
TIME_BASE = fractions.Fraction(1, RATE)


class FrameSchedule:
    """When each outgoing frame is due. Pure arithmetic, so pacing can be tested over hours of simulated time."""

    def __init__(self) -> None:
        self._anchor: float | None = None
        self._count = 0  # frames sent since the anchor

    def due(self, now: float) -> float:
        """When the next frame is due (the first one is due at once)."""
        if self._anchor is None:
            self._anchor = now
        return self._anchor + self._count * FRAME_S

    def sent(self, at: float, rephase: bool) -> None:
        """A frame left at ``at``; ``rephase`` restarts the grid there (a talk spurt began, or output was late)."""
        if self._anchor is None or rephase or at > self.due(at) + FRAME_S:  # or the loop stalled a whole frame
            self._anchor, self._count = at, 0
        self._count += 1


class PlayoutTrack(MediaStreamTrack):
    """The outbound audio track of one session."""

    kind = "audio"

    def __init__(self, max_buffer_s: float = 2.0, tolerance_s: float = 0.015, quiet_after: int = 5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.schedule = FrameSchedule()
        self.tolerance = tolerance_s
        self.quiet_after = quiet_after
        self.frames_out = 0
        self.underrun_frames = 0  # silence sent while the model was speaking, because its output was late
        self.overrun_samples = 0  # output dropped because the buffer was full
        self.skipped_frames = 0  # silent frames dropped to win back latency
        self.speaking = False  # output is flowing; cleared after quiet_after underruns or by stop_speaking()
        self._missed = 0  # consecutive underrun frames
        self._excess = 0  # frames of latency beyond one frame, seen when the last output landed
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
        self._excess = max(0, len(self._buffer) // FRAME_SAMPLES - 1)
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
        due = self.schedule.due(self._clock())
        rephase = False
        was_speaking = self.speaking
        if len(self._buffer) < FRAME_SAMPLES:
            # Wait for output: until the due time when quiet, a little past it when speaking.
            self._arrived.clear()
            limit = due + (self.tolerance if self.speaking else 0.0)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, limit - self._clock())):
                    await self._arrived.wait()
            arrived = len(self._buffer) >= FRAME_SAMPLES
            # a talk spurt starts now, or we chose to wait past the due time: either way the grid moves here
            rephase = (arrived and not was_speaking) or (was_speaking and self._clock() > due)
        await asyncio.sleep(max(0.0, (due if not rephase else self._clock()) - self._clock()))
        while self._excess and len(self._buffer) >= 2 * FRAME_SAMPLES and _silent(self._buffer[:FRAME_SAMPLES]):
            self._buffer = self._buffer[FRAME_SAMPLES:]
            self._excess -= 1
            self.skipped_frames += 1
        if len(self._buffer) >= FRAME_SAMPLES:
            samples, self._buffer = self._buffer[:FRAME_SAMPLES], self._buffer[FRAME_SAMPLES:]
            self._missed = 0
        else:
            samples = np.zeros(FRAME_SAMPLES, np.float32)
            if self.speaking:
                self.underrun_frames += 1
                self._missed += 1
                self.speaking = self._missed < self.quiet_after
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


def _silent(samples: np.ndarray, threshold: float = 1e-3) -> bool:
    """Below about −60 dBFS peak: safe to skip without a listener noticing."""
    return float(np.max(np.abs(samples))) < threshold
