"""Egress audio: the playout buffer and the outbound track that paces it in 40 ms frames at 48 kHz.

The buffer holds only what the model produced. Frames leave on a 40 ms grid, send times ``anchor + n * 40 ms``
from an integer frame count, and RTP timestamps advance 1920 a frame (and 1920 for each slot a stalled sender
missed). A receiver plays each packet at its
timestamp plus a playout delay that has to cover how late packets arrive against their timestamps, so within a
talk spurt the grid stays put: a late frame is sent late, not the whole stream. Model output arrives once per
micro-turn, paced by the browser's own audio clock, and the grid follows its phase:

- output that starts a talk spurt (it lands in an empty buffer while the model was quiet) goes out at once and the
  grid starts there;
- while the model speaks, a due frame with an empty buffer waits up to ``tolerance`` for late output; output that
  lands in that window goes out at once, the frames after it on the grid. If none comes, silence is sent and counted
  as an underrun; after ``quiet_after`` underruns in a row the model counts as quiet again;
- every :data:`TRACK_OUTPUTS` outputs the grid moves, by at most ``track_step``, to where all but the latest of them
  would have landed by their frames' due times: it follows a phase that was set by one unlucky output, or that drifts
  with the browser's clock, without chasing jitter;
- a sender that fell behind its grid (the event loop stalled) sends the overdue frames back to back instead of
  dropping their slots, up to :data:`MAX_BEHIND` frames; further behind, it misses those slots, and the RTP
  timestamps jump over them: time went on while it sent nothing, so a receiver's delay estimate does not step by
  the stall (a browser's jitter buffer would take such a step for a burst of lateness and hold more delay).

Latency that late output added to the model's audio (its frames queued behind an underrun) is kept while it is of
use: it is the margin that absorbs the next late output. Like a jitter buffer's peak detector, how long it is kept
depends on whether late output recurs. After an isolated underrun, :data:`QUICK_OUTPUTS` outputs in a row that land
with a whole frame still queued win it back; after one that follows another within :data:`RECUR_OUTPUTS` outputs,
:data:`TRACK_OUTPUTS` do. Frames are won back by skipping near-silent ones.

Why 40 ms and not WebRTC's usual 20: each frame becomes one RTP packet, and the gateway's cost is mostly per packet
(encryption, a system call, aiortc's Python around them), so 40 ms halves it. It costs no latency: the model's
output arrives a whole 200 ms micro-turn at a time, five frames of it, and the first leaves at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import time
from collections import deque
from collections.abc import Callable

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from webrtc_gateway.resample import Interpolator

RATE = 48_000
FRAME_SAMPLES = 1920  # 40 ms: one Opus packet
FRAME_S = FRAME_SAMPLES / RATE
TIME_BASE = fractions.Fraction(1, RATE)
MAX_BEHIND = 2  # frames a stalled sender sends back to back to get back on its grid; further behind, it misses slots
TRACK_OUTPUTS = 10  # outputs (2 s) the grid's phase is measured over before it moves; margin kept if late output recurs
QUICK_OUTPUTS = 3  # outputs (0.6 s) the margin an isolated underrun left is kept
RECUR_OUTPUTS = 50  # an underrun within this many outputs (10 s) of the one before: late output recurs


class FrameSchedule:
    """When each outgoing frame is due. Pure arithmetic, so pacing can be tested over hours of simulated time."""

    def __init__(self, track_step: float = 0.010) -> None:
        self.track_step = track_step
        self._anchor: float | None = None
        self._count = 0  # frames sent since the anchor
        self._lateness: list[float] = []  # of the outputs since the grid last moved, against their frames' due times

    def due(self, now: float) -> float:
        """When the next frame is due (the first one is due at once)."""
        if self._anchor is None:
            self._anchor = now
        return self._anchor + self._count * FRAME_S

    def landed(self, lateness: float) -> None:
        """The output for the next frame landed ``lateness`` seconds after the frame was due (negative: before).
        Every :data:`TRACK_OUTPUTS` outputs the grid moves, by at most ``track_step``, to where all but the latest of
        them would have landed by their frames' due times."""
        self._lateness.append(lateness)
        if len(self._lateness) == TRACK_OUTPUTS and self._anchor is not None:
            self._anchor += max(-self.track_step, min(self.track_step, sorted(self._lateness)[-2]))
            self._lateness.clear()

    def sent(self, at: float, restart: bool = False) -> int:
        """A frame left at ``at``; ``restart`` starts the grid there (a talk spurt began). A sender behind its grid
        catches up frame by frame, unless it is more than :data:`MAX_BEHIND` frames behind: then it misses the slots
        it could not send in, and this frame takes the last of them (it is late by less than a frame). Returns how
        many slots were missed: the RTP timestamps jump over them, as over any gap in a live source, so the grid and
        a receiver's mapping of timestamps to arrival times stay where they were instead of stepping by the stall."""
        missed = 0
        if self._anchor is not None:
            behind = at - self.due(at)
            missed = int(behind // FRAME_S) if behind > MAX_BEHIND * FRAME_S else 0
        if self._anchor is None or restart:
            self._anchor, self._count = at, 0
            self._lateness.clear()
        else:
            self._count += missed
        self._count += 1
        return missed


class Margin:
    """Whole frames that late output left queued behind an underrun: latency that absorbs the next late output, won
    back once enough outputs in a row (:data:`QUICK_OUTPUTS`, or :data:`TRACK_OUTPUTS` while underruns recur) landed
    with at least that much still queued."""

    def __init__(self) -> None:
        self.excess = 0  # frames to win back
        self._queued: deque[int] = deque(maxlen=TRACK_OUTPUTS)  # whole frames still queued as each output landed
        self._hold = QUICK_OUTPUTS  # how many of them must have had it
        self._since_underrun: int | None = None  # outputs since the last underrun (None: none yet)

    def landed(self, queued_frames: int) -> None:
        self._queued.append(queued_frames)
        if self._since_underrun is not None:
            self._since_underrun += 1
        if len(self._queued) >= self._hold:
            self.excess = min(list(self._queued)[-self._hold:])

    def underrun(self) -> None:
        """A frame went out as silence while output was expected. The frames after it with no output landing in
        between belong to the same underrun."""
        if self._since_underrun == 0:
            return
        recurs = self._since_underrun is not None and self._since_underrun < RECUR_OUTPUTS
        self._hold = TRACK_OUTPUTS if recurs else QUICK_OUTPUTS
        self._since_underrun = 0

    def won_back(self) -> None:
        """One frame of the excess was skipped."""
        self.excess -= 1
        self._queued.clear()


class PlayoutTrack(MediaStreamTrack):
    """The outbound audio track of one session."""

    kind = "audio"

    def __init__(self, max_buffer_s: float = 2.0, tolerance_s: float = 0.025, track_step_s: float = 0.010,
                 quiet_after: int = 5, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.schedule = FrameSchedule(track_step_s)
        self.tolerance = tolerance_s
        self.quiet_after = quiet_after
        self.frames_out = 0
        self.underrun_frames = 0  # silence sent while the model was speaking, because its output was late
        self.overrun_samples = 0  # output dropped because the buffer was full
        self.skipped_frames = 0  # silent frames dropped to win back latency
        self.missed_slots = 0  # frame slots missed because the sender stalled (the timestamps jump over them)
        self.speaking = False  # output is flowing; cleared after quiet_after underruns or by stop_speaking()
        self._missed = 0  # consecutive underrun frames
        self._margin = Margin()
        self._clock = clock
        self._max = int(max_buffer_s * RATE)
        self._buffer = np.zeros(0, np.float32)
        self._interp = Interpolator()
        self._arrived = asyncio.Event()
        self._landed = 0.0  # when the last output landed
        self._pts = 0

    @property
    def buffered_samples(self) -> int:
        return len(self._buffer)

    def push(self, audio_16k: np.ndarray) -> None:
        """Queue one micro-turn of model audio (16 kHz float)."""
        self._margin.landed(len(self._buffer) // FRAME_SAMPLES)
        self._buffer = np.concatenate([self._buffer, self._interp.process(audio_16k)])
        if len(self._buffer) > self._max:
            self.overrun_samples += len(self._buffer) - self._max
            self._buffer = self._buffer[-self._max:]
        self.speaking = True
        self._landed = self._clock()
        self._arrived.set()

    def stop_speaking(self) -> None:
        """No more output is coming (the session is closing): silence from here is not an underrun."""
        self.speaking = False

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        due = self.schedule.due(self._clock())
        at, restart = due, False  # when this frame leaves, and whether a talk spurt starts the grid there
        was_speaking = self.speaking
        if len(self._buffer) < FRAME_SAMPLES:
            # Wait for output: until the due time when quiet, a little past it (or past now, if the sender is
            # behind) when speaking.
            self._arrived.clear()
            limit = max(due, self._clock()) + self.tolerance if self.speaking else due
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, limit - self._clock())):
                    await self._arrived.wait()
            if len(self._buffer) >= FRAME_SAMPLES and not was_speaking:  # a talk spurt starts with this output
                at, restart = self._landed, True
            elif len(self._buffer) >= FRAME_SAMPLES:  # the next output: on the grid, or at once if it is late
                at = max(self._landed, due)
                self.schedule.landed(self._landed - due)
            elif was_speaking:  # none came in time: silence goes out (an underrun), and the grid stays
                at = limit
        await asyncio.sleep(max(0.0, at - self._clock()))
        while self._margin.excess and len(self._buffer) >= 2 * FRAME_SAMPLES and _silent(self._buffer[:FRAME_SAMPLES]):
            self._buffer = self._buffer[FRAME_SAMPLES:]
            self._margin.won_back()
            self.skipped_frames += 1
        if len(self._buffer) >= FRAME_SAMPLES:
            samples, self._buffer = self._buffer[:FRAME_SAMPLES], self._buffer[FRAME_SAMPLES:]
            self._missed = 0
        else:
            samples = np.zeros(FRAME_SAMPLES, np.float32)
            if self.speaking:
                self.underrun_frames += 1
                self._margin.underrun()
                self._missed += 1
                self.speaking = self._missed < self.quiet_after
        missed = self.schedule.sent(self._clock(), restart)
        self.missed_slots += missed
        self._pts += missed * FRAME_SAMPLES
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
