"""Egress pacing: the frame grid never drifts, follows model output, and counts underruns honestly."""

from __future__ import annotations

import asyncio
import random
from collections import deque

import numpy as np
import pytest

from webrtc_gateway.playout import (
    FRAME_S,
    FRAME_SAMPLES,
    MAX_BEHIND,
    QUICK_OUTPUTS,
    RECUR_OUTPUTS,
    TRACK_OUTPUTS,
    FrameSchedule,
    Margin,
    PlayoutTrack,
)

PER_TURN = round(0.2 / FRAME_S)  # frames in one micro-turn of output


def simulate(minutes: float, jitter_s: float, tolerance_s: float = 0.015, track_step_s: float = 0.010,
             quiet_after: int = 5, seed: int = 0, late: dict[int, float] | None = None,
             stall: tuple[float, float] = (0.0, 0.0)) -> tuple[list[float], list[float], list[float], int, list[int]]:
    """Model output (one micro-turn of frames: a sound, then silence) lands every 200 ms plus a random lateness
    (plus ``late[k]`` for output ``k``); a sender loop follows the same rules as PlayoutTrack.recv and push. During
    ``stall`` (start, seconds) the event loop is stuck: nothing is sent, and output that comes is taken after it.
    Returns send times, output arrival times, when each output's sound was sent (in simulated seconds), underrun
    frames, and each sent frame's timestamp (in frames)."""
    rng = random.Random(seed)
    schedule = FrameSchedule(track_step_s)
    margin = Margin()
    arrivals = [0.5 + 0.2 * k + rng.uniform(0, jitter_s) + (late or {}).get(k, 0.0)
                for k in range(int(minutes * 60 / 0.2))]
    arrivals = [stall[0] + stall[1] if stall[0] <= t < stall[0] + stall[1] else t for t in arrivals]
    queue: deque[tuple[int, bool]] = deque()  # (output, silent) per buffered frame
    sounded = [0.0] * len(arrivals)
    landed, now, speaking, missed, underruns = 0, 0.0, False, 0, 0
    sent: list[float] = []
    stamps: list[int] = []
    while landed < len(arrivals) or queue:  # until the last output has drained
        due = schedule.due(now)
        at, restart = due, False
        if not queue:
            limit = max(due, now) + tolerance_s if speaking else due
            if landed < len(arrivals) and arrivals[landed] <= limit:
                arrival = max(now, arrivals[landed])
                if not speaking:
                    at, restart = arrival, True
                else:
                    at = max(arrival, due)
                    schedule.landed(arrival - due)
            elif speaking:
                at = limit
        now = max(now, at)
        if stall[0] <= now < stall[0] + stall[1]:
            now = stall[0] + stall[1]
        while landed < len(arrivals) and arrivals[landed] <= now:
            margin.landed(len(queue))
            queue.extend((landed, i > 0) for i in range(PER_TURN))
            landed, speaking = landed + 1, True
        while margin.excess and len(queue) >= 2 and queue[0][1]:
            queue.popleft()
            margin.won_back()
        if queue:
            output, silent = queue.popleft()
            missed = 0
            if not silent:
                sounded[output] = now
        elif speaking:
            underruns, missed = underruns + 1, missed + 1
            margin.underrun()
            speaking = missed < quiet_after
        skipped = schedule.sent(now, restart)
        stamps.append(stamps[-1] + 1 + skipped if stamps else 0)
        sent.append(now)
    return sent, arrivals, sounded, underruns, stamps


def test_ten_minutes_without_drift() -> None:
    sent, arrivals, sounded, underruns, _ = simulate(minutes=10, jitter_s=0.010)
    after_first = [t for t in sent if t >= arrivals[0]]
    media = len(after_first) * FRAME_S
    elapsed = after_first[-1] - after_first[0] + FRAME_S
    assert abs(media - elapsed) < 0.02  # frames out match wall time over 10 minutes
    assert underruns == 0
    # latency from output arrival to the frame that plays it stays within the jitter: it never creeps up
    lag = np.subtract(sounded, arrivals)
    assert lag.max() <= 0.010 + 1e-9


def test_late_output_beyond_tolerance_counts_underruns_but_never_outpaces_real_time() -> None:
    sent, arrivals, sounded, underruns, stamps = simulate(minutes=2, jitter_s=0.060, seed=3)
    assert underruns > 0
    speaking = np.array([t for t in sent if t >= arrivals[0]])
    # no bursts: a frame late by at most the tolerance, then the next on a grid that moved at most a step earlier
    assert np.all(np.diff(speaking) >= FRAME_S - 0.015 - 0.010 - 1e-9)
    offset = speaking - FRAME_S * np.array(stamps[-len(speaking):])  # against the timestamps' clock
    assert np.ptp(offset) <= 0.060 + 0.015 + 1e-9  # the grid stays within the output's jitter: no drift
    assert np.subtract(sounded, arrivals).max() <= 0.060 + FRAME_S  # latency stays bounded by the jitter


def test_late_output_leaves_the_grid_with_the_output() -> None:
    # output 100 lands 70 ms late (past the tolerance: an underrun), the others within 5 ms of their time
    sent, arrivals, sounded, underruns, _ = simulate(minutes=1, jitter_s=0.005, late={100: 0.070})
    assert underruns >= 1
    lag = np.subtract(sounded, arrivals)
    assert lag[:100].max() <= 0.005 + 1e-9
    # the frames it was late by stay queued as a margin for a few outputs; late output did not recur, so they are
    # won back then
    assert lag[101] > 0.030
    assert lag[101 + QUICK_OUTPUTS + 1:].max() <= 0.005 + 1e-9  # and the grid did not move late with it


def test_late_output_that_recurs_keeps_its_margin_longer() -> None:
    # outputs 100 and 110 land 70 ms late: the second underrun follows the first within RECUR_OUTPUTS, so the margin
    # it leaves is kept for TRACK_OUTPUTS outputs, and absorbs output 115, late as much, without an underrun
    assert RECUR_OUTPUTS > 110 - 100
    _, arrivals, sounded, underruns, _ = simulate(minutes=1, jitter_s=0.005, late={100: 0.070, 110: 0.070})
    _, _, _, underruns_3, _ = simulate(minutes=1, jitter_s=0.005, late={100: 0.070, 110: 0.070, 115: 0.070})
    assert underruns_3 == underruns
    lag = np.subtract(sounded, arrivals)
    assert lag[104:110].max() <= 0.005 + 1e-9  # the first was isolated: won back after QUICK_OUTPUTS
    assert lag[111:111 + TRACK_OUTPUTS - 1].min() > 0.030  # the second: kept
    assert lag[111 + TRACK_OUTPUTS + 1:].max() <= 0.005 + 1e-9  # then won back


def test_margin_hold_depends_on_whether_underruns_recur() -> None:
    margin = Margin()
    margin.underrun()  # the first underrun: isolated
    for _ in range(QUICK_OUTPUTS):
        margin.landed(2)
    assert margin.excess == 2
    margin.won_back(), margin.won_back()
    margin.underrun()  # within RECUR_OUTPUTS outputs of the first
    margin.underrun()  # the same underrun (no output between): does not count again
    for _ in range(TRACK_OUTPUTS - 1):
        margin.landed(1)
    assert margin.excess == 0  # kept: late output recurs
    margin.landed(1)
    assert margin.excess == 1
    margin.won_back()
    for _ in range(RECUR_OUTPUTS):
        margin.landed(0)
    margin.underrun()  # long after the one before: isolated again
    for _ in range(QUICK_OUTPUTS):
        margin.landed(1)
    assert margin.excess == 1


def test_a_talk_spurt_that_started_late_does_not_keep_later_output_waiting() -> None:
    sent, arrivals, sounded, _, _ = simulate(minutes=1, jitter_s=0.005, late={0: 0.030})  # the grid starts 30 ms late
    lag = np.subtract(sounded, arrivals)
    assert lag[1] > 0.020
    assert lag[3 * TRACK_OUTPUTS + 1:].max() <= 0.005 + 1e-9  # three steps later the grid is with the output


def test_a_stalled_sender_catches_up_without_moving_its_timestamps() -> None:
    # the sender cannot send for 70 ms at 20 s (the event loop stalled)
    sent, arrivals, sounded, _, stamps = simulate(minutes=1, jitter_s=0.005, stall=(20.0, 0.070))
    times = np.array(sent)
    assert stamps == list(range(len(stamps)))  # it caught up: no slot skipped
    # a receiver plays frame n at n * 40 ms plus a fixed delay: how late each frame is against that
    offset = times - FRAME_S * np.array(stamps)
    before = np.median(offset[(times > 10) & (times < 19)])
    assert np.median(offset[(times > 25) & (times < 35)]) == pytest.approx(before, abs=0.005)
    assert 0.030 < offset.max() - before <= 0.070 + 1e-9  # only the frames the stall held up were late
    lag = np.subtract(sounded, arrivals)
    assert lag[np.array(arrivals) > 21].max() <= 0.005 + 1e-9


def test_a_long_stall_skips_its_slots_so_timestamps_keep_their_arrival_times() -> None:
    # the event loop stalls for 300 ms at 20 s: more than MAX_BEHIND frames, so the sender cannot catch up
    sent, arrivals, sounded, _, stamps = simulate(minutes=1, jitter_s=0.005, stall=(20.0, 0.300))
    times = np.array(sent)
    steps = np.diff(stamps)
    jump = int(steps.argmax())
    assert steps[jump] - 1 > MAX_BEHIND  # it skipped the slots it missed
    offset = times - FRAME_S * np.array(stamps)
    before = np.median(offset[(times > 10) & (times < 19)])
    # against its timestamps, the frame after the stall is late by less than a frame, and the frames after it are
    # on the grid of before: a receiver's delay estimate does not step by the stall
    assert 0 <= offset[jump + 1] - before < FRAME_S
    assert np.abs(offset[jump + 2:] - before).max() <= 0.005
    # what queued up meanwhile is won back a few outputs later
    lag = np.subtract(sounded, arrivals)
    assert lag[np.array(arrivals) > 20.3 + (QUICK_OUTPUTS + 1) * 0.2].max() <= 0.005 + 1e-9


def test_a_talk_spurt_that_starts_after_a_stall_also_skips_the_missed_slots() -> None:
    schedule = FrameSchedule()
    for k in range(10):
        assert schedule.sent(k * FRAME_S) == 0  # on the grid
    assert schedule.sent(10 * FRAME_S - 0.010, restart=True) == 0  # a talk spurt that starts early: no gap
    assert schedule.sent(schedule.due(0.0) + 0.300, restart=True) == int(0.300 // FRAME_S)


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
    track = PlayoutTrack(max_buffer_s=5.0)
    speech, silence = np.full(3200, 0.3, np.float32), np.zeros(3200, np.float32)
    for _ in range(TRACK_OUTPUTS):
        track.push(speech)
    # lands while whole micro-turns are still queued, as did each of the outputs before it but the first
    track.push(np.concatenate([silence[:2560], speech[:640]]))
    sent = [np.abs((await track.recv()).to_ndarray()).mean() / 32767 for _ in range(TRACK_OUTPUTS * PER_TURN + 2)]
    # frames of excess to win back; of the new output's 4 silent frames the first rings with the end of the speech
    # through the resampling filter, so the other 3 are skipped
    assert track.skipped_frames == 3
    assert sent[:-2] == pytest.approx([0.3] * (len(sent) - 2), abs=0.05)  # speech is never skipped
    assert sent[-2] < 0.05
    assert sent[-1] == pytest.approx(0.3, abs=0.05)
    track.stop()
