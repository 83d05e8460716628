"""Timeline math: resampling across frame boundaries, placement by timestamp, gaps, the media clock."""

from __future__ import annotations

import numpy as np

from microturn.contracts import MICRO_TURN_SAMPLES
from webrtc_gateway.ingest import AudioIngest, Inbox
from webrtc_gateway.resample import Decimator, Interpolator
from webrtc_gateway.timeline import InputTimeline, MediaClock


def tone(freq: float, seconds: float, rate: int) -> np.ndarray:
    return np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate).astype(np.float32)


def test_decimator_in_frames_equals_one_piece() -> None:
    x = tone(440, 1.0, 48_000)
    chunked = Decimator()
    pieces = np.concatenate([chunked.process(x[i:i + 960]) for i in range(0, len(x), 960)])
    assert np.array_equal(pieces, Decimator().process(x))


def test_decimator_keeps_speech_band_and_removes_alias() -> None:
    y = Decimator().process(tone(1000, 1.0, 48_000))
    expected = np.sin(2 * np.pi * 1000 * (np.arange(16_000) * 3 - 24) / 48_000)
    assert np.max(np.abs(y[50:] - expected[50:])) < 1e-3
    alias = Decimator().process(tone(12_000, 1.0, 48_000))  # would fold to 4 kHz without the filter
    assert np.max(np.abs(alias[50:])) < 1e-3


def test_interpolator_round_trip() -> None:
    x = tone(700, 1.0, 16_000)
    up = Interpolator()
    y = np.concatenate([up.process(x[i:i + 320]) for i in range(0, len(x), 320)])
    expected = np.sin(2 * np.pi * 700 * (np.arange(48_000) - 24) / 48_000)
    assert len(y) == 48_000
    assert np.max(np.abs(y[200:] - expected[200:])) < 2e-3


def test_micro_turn_boundaries_follow_timestamps() -> None:
    timeline, clock = InputTimeline(), MediaClock()
    ingest = AudioIngest(timeline, clock, now=lambda: 0.0)
    ramp = np.arange(48_000 * 2, dtype=np.float32) / 48_000 / 4  # a slow ramp: value tells the position
    for pts in range(0, len(ramp), 960):
        ingest.feed(pts, ramp[pts:pts + 960])
    assert timeline.complete(9) and not timeline.complete(10)
    first = timeline.take()
    second = timeline.take()
    assert first.shape == (MICRO_TURN_SAMPLES,)
    # sample k of the 16 kHz timeline is 48 kHz sample 3k, delayed by the 24-sample filter half-length
    np.testing.assert_allclose(second[100:], ramp[3 * (3200 + 100) - 24:3 * 6400 - 24:3], atol=2e-4)


def test_lost_frames_become_silence_in_place() -> None:
    timeline, clock = InputTimeline(), MediaClock()
    ingest = AudioIngest(timeline, clock, now=lambda: 0.0)
    x = 0.5 * np.ones(48_000, np.float32)
    lost = {960 * 12, 960 * 13}  # 40 ms lost inside micro-turn 1 (which spans 48 kHz samples 9600..19200)
    for pts in range(0, len(x), 960):
        if pts not in lost:
            ingest.feed(pts, x[pts:pts + 960])
    assert ingest.gaps == 1
    timeline.take()
    turn1 = timeline.take()
    gap = slice(12 * 320 - 3200, 14 * 320 - 3200)  # the lost frames' place in micro-turn 1
    assert np.all(np.abs(turn1[gap][30:-30]) < 1e-6)
    assert np.all(np.abs(turn1[:gap.start - 30] - 0.5) < 1e-3)
    assert np.all(np.abs(turn1[gap.stop + 30:] - 0.5) < 1e-3)
    turn2 = timeline.take()
    assert np.all(np.abs(turn2[30:] - 0.5) < 1e-3)  # alignment after the gap is unchanged


def test_late_and_far_ahead_samples_are_dropped_and_counted() -> None:
    timeline = InputTimeline(horizon_turns=2)
    timeline.write(0, np.ones(3200, np.float32))
    timeline.take()
    timeline.write(3000, np.ones(400, np.float32))  # 200 samples belong to the taken micro-turn
    assert timeline.late_samples == 200
    timeline.write(3200 * 3 - 100, np.ones(300, np.float32))  # past the 2-turn horizon
    assert timeline.ahead_samples == 200
    assert timeline.complete(1)


def test_media_clock_uses_least_delayed_arrival_and_follows_drift() -> None:
    clock = MediaClock(window_s=10)
    for i, jitter in enumerate([0.030, 0.005, 0.050, 0.012]):
        clock.observe(i * 0.02, 100 + i * 0.02 + jitter)
    assert abs(clock.wall_of(1.0) - (101.0 + 0.005)) < 1e-9
    # the sender's clock runs 0.1 % slow: after two windows the old minimum is forgotten
    for i in range(4, 2000):
        clock.observe(i * 0.02, 100 + i * 0.02 * 1.001 + 0.005)
    assert abs(clock.offset - (100 + 1999 * 0.02 * 0.001 + 0.005)) < 0.025


def test_inbox_places_text_in_the_micro_turn_it_arrived_in() -> None:
    now = [0.0]
    timeline, clock = InputTimeline(), MediaClock()
    clock.observe(0.02, 10.02)  # media 0 ↔ wall 10.0
    inbox = Inbox(timeline, clock, now=lambda: now[0])
    now[0] = 10.0 + 0.45  # media 0.45 s: micro-turn 2
    assert inbox.put("hello") == 2
    timeline.take()
    timeline.take()
    timeline.take()  # micro-turns 0..2 dispatched
    assert inbox.put("late") == 3  # never into a micro-turn already dispatched
    assert inbox.take(1) == ((), ())
    assert inbox.take(2) == (("hello",), ())
    assert inbox.take(3) == (("late",), ())


def test_media_clock_measures_jitter() -> None:
    clock = MediaClock()
    rng = np.random.default_rng(0)
    for i in range(500):
        clock.observe(i * 0.02, 50 + i * 0.02 + (0.08 if rng.random() < 0.2 else 0.0))  # a fifth arrive 80 ms late
    assert abs(clock.jitter - 0.08) < 1e-6
    steady = MediaClock()
    for i in range(500):
        steady.observe(i * 0.02, 50 + i * 0.02 + 0.003)
    assert steady.jitter < 1e-6


def test_media_clock_refreshes_jitter_every_few_packets() -> None:
    """The quantile is recomputed every ``refresh_packets`` arrivals, not on each one, and never goes stale longer."""
    clock = MediaClock(refresh_packets=10)
    for i in range(100):
        clock.observe(i * 0.02, 50 + i * 0.02)
    assert clock.jitter < 1e-6
    for i in range(100, 109):  # nine late packets: the jitter read after them is still the cached one
        clock.observe(i * 0.02, 50 + i * 0.02 + 0.1)
    assert clock.jitter < 1e-6
    clock.observe(109 * 0.02, 50 + 109 * 0.02 + 0.1)  # the tenth triggers the refresh
    assert abs(clock.jitter - 0.1) < 1e-6
