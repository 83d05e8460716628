"""The user-audio augmentations of training: a shift against the micro-turn grid that keeps every label true, and a
random low-pass with no delay."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from inference.augment import label_marks, low_pass_filter, low_passed, shift_range, shifted
from inference.conversation import Conversation
from inference.trainer import Trainer, TrainSettings
from microturn.cli import build_parser
from tests.test_trainer import write_data_set

TURNS = 12
SPEECH = [(1234, 9000), (15000, 22001)]  # a question with a pause in it; offsets in their micro-turns: 1234 … 2801
PAUSE = (9000, 15000)


def bursts() -> Conversation:
    """A conversation whose user says two bursts of noise at odd samples (exact silence between them)."""
    audio = np.zeros(TURNS * 3200, np.float32)
    rng = np.random.default_rng(0)
    for first, end in SPEECH:
        audio[first:end] = rng.uniform(0.1, 0.5, end - first) * rng.choice([-1.0, 1.0], end - first)
    meta = {"turns": TURNS, "user_speech": [list(s) for s in SPEECH], "pauses": [list(PAUSE)]}
    return Conversation(meta, audio, np.zeros_like(audio), np.zeros((TURNS, 120, 160, 3), np.uint8),
                        np.zeros(TURNS, bool))


def moved_by(moved: np.ndarray, audio: np.ndarray) -> int:
    """How many samples later ``moved`` plays ``audio`` (the peak of their circular cross-correlation)."""
    lag = int(np.argmax(np.fft.irfft(np.fft.rfft(moved) * np.conj(np.fft.rfft(audio)), len(audio))))
    return lag if lag < len(audio) // 2 else lag - len(audio)


def test_the_shift_range_keeps_each_label_mark_of_the_window_in_its_micro_turn() -> None:
    marks = label_marks(bursts().meta)
    assert sorted(marks) == [1234, 8999, 9000, 14999, 15000, 22000, 22001]
    assert shift_range(marks, 0, TURNS * 3200) == (-1234, 3199 - 2801)
    assert shift_range(marks, 4 * 3200, TURNS * 3200) == (-(14999 % 3200), 3199 - 2801)  # the first burst is before
    assert shift_range(marks, 8 * 3200, TURNS * 3200) == (-3199, 3199)  # nothing to keep: any shift
    assert shift_range([3200, 6399], 0, TURNS * 3200) == (0, 0)  # marks on both edges: none


def test_a_shifted_window_hears_the_same_audio_moved_and_each_utterance_in_the_micro_turns_it_was_in() -> None:
    conv = bursts()
    seen = []
    for seed in range(40):
        moved = shifted(conv, 0, TURNS, 0, torch.Generator().manual_seed(seed))
        shift = moved_by(moved.user_audio, conv.user_audio)
        seen.append(shift)
        assert -1234 <= shift <= 398
        assert np.array_equal(moved.user_audio, np.roll(conv.user_audio, shift))  # silent edges: a plain roll
        heard = np.flatnonzero(moved.user_audio)
        for first, end in SPEECH:
            inside = heard[(heard >= first + shift) & (heard < end + shift)]
            assert inside[0] // 3200 == first // 3200 and inside[-1] // 3200 == (end - 1) // 3200
        assert moved.meta is conv.meta and moved.model_audio is conv.model_audio  # labels and targets as they were
    assert min(seen) < -600 and max(seen) > 200  # both ways, most of the room used
    later = [moved_by(shifted(conv, 8, 4, 0, torch.Generator().manual_seed(seed)).user_audio, conv.user_audio)
             for seed in range(40)]  # a window after both bursts: any shift
    assert min(later) < -1234 and max(later) > 398


def test_the_low_pass_is_unit_gain_below_its_cutoff_no_cut_at_the_band_top_and_delays_nothing() -> None:
    assert np.allclose(low_pass_filter(8000.0), np.eye(31)[15], atol=1e-6)  # a cutoff at 8 kHz: no filter
    h = low_pass_filter(6000.0)
    response = 20 * np.log10(np.abs(np.fft.rfft(h, 1600)) + 1e-12)  # 10 Hz bins
    assert np.all(np.abs(response[:450]) < 0.5)  # flat to 4.5 kHz
    assert -8.0 < response[600] < -4.0  # about half the amplitude at the cutoff
    assert np.all(response[760:] < -40.0)  # gone from 7.6 kHz
    conv = bursts()
    noise = np.random.default_rng(1).standard_normal(TURNS * 3200).astype(np.float32)
    conv = dataclasses.replace(conv, user_audio=noise)
    got = low_passed(conv, 4, 3, 1, torch.Generator().manual_seed(0)).user_audio
    first, end = 2 * 3200, 8 * 3200  # the window, its lead, and a micro-turn to spare each side
    assert np.array_equal(got[:first], noise[:first]) and np.array_equal(got[end:], noise[end:])
    inside = slice(first + 100, end - 100)
    lags = [float(np.dot(got[inside], np.roll(noise, lag)[inside])) for lag in range(-5, 6)]
    assert int(np.argmax(lags)) == 5  # best aligned with no delay
    assert not np.allclose(got[inside], noise[inside], atol=1e-3)


def test_training_windows_hear_the_shifted_and_low_passed_audio_with_the_same_targets(tmp_path: Path) -> None:
    data = write_data_set(tmp_path / "data", 3)
    common: dict[str, Any] = dict(data=data, steps=1, batch=4, window=12, val_windows=1)
    plain = [Trainer(TrainSettings(out=tmp_path / name, **common))._batch() for name in ("a", "b")]
    live = Trainer(TrainSettings(out=tmp_path / "c", audio_shift=1.0, low_pass=1.0, **common))._batch()
    assert torch.equal(plain[0].tokens.dmel, plain[1].tokens.dmel)  # the same windows hear the same
    assert not torch.equal(plain[0].tokens.dmel, live.tokens.dmel)  # … and differ once moved and filtered
    for field in ("text_targets", "mel_targets", "changes", "pauses", "answers", "scored"):
        assert torch.equal(getattr(plain[0], field), getattr(live, field)), field
    args = build_parser().parse_args(["train", "--data", "d", "--audio-shift", "1", "--low-pass", "0.5"])
    assert (args.audio_shift, args.low_pass) == (1.0, 0.5)
    for name in ("audio_shift", "low_pass"):
        with pytest.raises(ValueError, match=f"--{name.replace('_', '-')}"):
            Trainer(TrainSettings(out=tmp_path / "x", **{**common, name: 1.5}))
