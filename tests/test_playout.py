"""Egress pacing: the frame grid never drifts, follows model output, and counts underruns honestly."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from webrtc_gateway.playout import FRAME_S, FRAME_SAMPLES, FrameSchedule, PlayoutTrack

PER_TURN = round(0.2 / FRAME_S)  # frames in one micro-turn of output


def simulate(minutes: float, jitter_s: float, tolerance_s: float = 0.015, quiet_after: int = 5,
             seed: int = 0) -> tuple[list[float], list[float], int]:
    """Model output (one micro-turn of frames) lands every 200 ms plus a random lateness; a sender loop follows the
    same rules as PlayoutTrack.recv. Returns send times, output arrival times and underrun frames, in simulated
    seconds."""
    rng = random.Random(seed)
    schedule = FrameSchedule()
    arrivals = [0.5 + 0.2 * k + rng.uniform(0, jitter_s) for k in range(int(minutes * 60 / 0.2))]
    buffered, landed, now, speaking, missed = 0, 0, 0.0, False, 0
    sent: list[float] = []
    underruns = 0
    while landed < len(arrivals) or buffered:  # until the last output has drained
        due = schedule.due(now)
        rephase = False
        if buffered == 0:
            limit = due + (tolerance_s if speaking else 0.0)
            if landed < len(arrivals) and arrivals[landed] <= limit:
                arrival = max(now, arrivals[landed])
                rephase = not speaking or arrival > due
                now = arrival if rephase else due
            else:
                rephase = speaking
                now = max(now, limit)
        else:
            now = max(now, due)
        while landed < len(arrivals) and arrivals[landed] <= now:
            buffered, landed, speaking = buffered + PER_TURN, landed + 1, True
        if buffered:
            buffered, missed = buffered - 1, 0
        elif speaking:
            underruns, missed = underruns + 1, missed + 1
            speaking = missed < quiet_after
        schedule.sent(now, rephase)
        sent.append(now)
    return sent, arrivals, underruns


def test_ten_minutes_without_drift() -> None:
    sent, arrivals, underruns = simulate(minutes=10, jitter_s=0.010)
    after_first = [t for t in sent if t >= arrivals[0]]
    media = len(after_first) * FRAME_S
    elapsed = after_first[-1] - after_first[0] + FRAME_S
    assert abs(media - elapsed) < 0.02  # frames out match wall time over 10 minutes
    assert underruns == 0
    # latency from output arrival to the frame that starts playing it settles at the jitter, never creeps up
    lag = [min(t for t in after_first if t >= a) - a for a in arrivals]
    assert max(lag) <= 0.010 + 1e-9  # bounded by the jitter over all 3000 outputs: no creep


def test_late_output_beyond_tolerance_counts_underruns_but_never_outpaces_real_time() -> None:
    sent, arrivals, underruns = simulate(minutes=2, jitter_s=0.060, seed=3)
    assert underruns > 0
    speaking = np.array([t for t in sent if t >= arrivals[0]])
    assert np.all(np.diff(speaking) >= FRAME_S - 1e-9)  # once talking, never two frames closer than one frame
    lag = [min(t for t in sent if t >= a) - a for a in arrivals]
    assert max(lag) <= 0.060 + FRAME_S  # latency stays bounded by the jitter


async def test_track_sends_buffered_audio_then_silence() -> None:
    track = PlayoutTrack(tolerance_s=0.005)
    first = await track.recv()
    assert not np.any(first.to_ndarray())  # nothing produced yet: silence, not an underrun
    assert track.underrun_frames == 0
    track.push(np.full(3200, 0.5, np.float32))
    frames = [await track.recv() for _ in range(PER_TURN)]
    levels = [np.abs(f.to_ndarray()).mean() / 32767 for f in frames]
    assert all(level > 0.4 for level in levels[1:])
    assert [f.pts for f in frames] == [FRAME_SAMPLES * (i + 1) for i in range(PER_TURN)]
    await track.recv()  # buffer empty while speaking: an underrun
    assert track.underrun_frames == 1
    track.stop_speaking()
    await track.recv()
    assert track.underrun_frames == 1
    track.stop()


async def test_track_bounds_its_buffer() -> None:
    track = PlayoutTrack(max_buffer_s=0.5)
    for _ in range(10):
        track.push(np.zeros(3200, np.float32))
    assert track.buffered_samples == 24_000
    assert track.overrun_samples == 10 * 9600 - 24_000
    await asyncio.sleep(0)
    track.stop()


async def test_latency_added_by_late_output_is_won_back_in_silence() -> None:
    track = PlayoutTrack()
    speech, silence = np.full(3200, 0.3, np.float32), np.zeros(3200, np.float32)
    track.push(speech)
    track.push(np.concatenate([silence[:2560], speech[:640]]))  # lands while a whole micro-turn is still queued
    sent = [np.abs((await track.recv()).to_ndarray()).mean() / 32767 for _ in range(7)]
    # 4 frames of excess; of the new output's 4 silent frames the first rings with the end of the speech through
    # the resampling filter, so the other 3 are skipped
    assert track.skipped_frames == 3
    assert sent[:5] == pytest.approx([0.3] * 5, abs=0.05)  # speech is never skipped
    assert sent[5] < 0.05
    assert sent[6] == pytest.approx(0.3, abs=0.05)
    track.stop()
