"""Training-time changes to the user's audio that a live call makes and the synthetic data does not: where speech
falls against the 200 ms micro-turn grid, and a top band that the path's resamplers and codecs have thinned.

A synthetic conversation places the user's speech at exact samples, and its labels (when the model answers, stops,
or keeps quiet in a pause) follow from the micro-turns that hold each utterance's first and last samples. Through the
gateway the same speech arrives a few milliseconds later, after resampling to 48 kHz and back; a model trained on the
exact placement alone changes some of its decisions for it (``inference/README.md``, "What the path does to the
audio"). :func:`shifted` moves a window's user audio by a random number of samples that leaves every label true;
:func:`low_passed` passes it through a random low-pass filter whose cutoff lies in the top two kilohertz.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from inference.conversation import Conversation
from microturn.contracts import MICRO_TURN_SAMPLES, SAMPLE_RATE

LOW_PASS_HZ = (6000.0, 8000.0)
"""The range the random cutoff of :func:`low_passed` is drawn from (8 kHz: the band's top, no cut)."""

LOW_PASS_TAPS = 31
"""Taps of :func:`low_passed`'s filter: from flat to 40 dB down over about 3 kHz (a 6 kHz cutoff: 0.5 dB down at
4.5 kHz, 40 dB from 7.6 kHz), a gentle slope like the path's old resampler's."""


def label_marks(meta: dict[str, Any]) -> list[int]:
    """The samples whose micro-turn the labels depend on: each user utterance's first and last samples and the
    sample after it (a pause's first), and each pause's last sample."""
    marks: list[int] = []
    for first, end in meta["user_speech"]:
        marks += [int(first), int(end) - 1, int(end)]
    for _, end in meta.get("pauses", []):
        marks.append(int(end) - 1)
    return marks


def shift_range(marks: Iterable[int], low: int, high: int) -> tuple[int, int]:
    """The smallest and largest shift (samples; negative: earlier) that keeps each of the ``marks`` in
    ``[low, high)`` in its micro-turn. Always holds 0."""
    earliest, latest = -(MICRO_TURN_SAMPLES - 1), MICRO_TURN_SAMPLES - 1
    for mark in marks:
        if low <= mark < high:
            offset = mark % MICRO_TURN_SAMPLES
            earliest, latest = max(earliest, -offset), min(latest, MICRO_TURN_SAMPLES - 1 - offset)
    return earliest, latest


def _heard(start: int, length: int, lead: int) -> tuple[int, int]:
    """The samples a window of micro-turns ``[start, start + length)`` hears, with the ``lead`` micro-turns before
    it that its audio encoder hears, and a micro-turn to spare at each end."""
    return (start - lead - 1) * MICRO_TURN_SAMPLES, (start + length + 1) * MICRO_TURN_SAMPLES


def shifted(conv: Conversation, start: int, length: int, lead: int, generator: torch.Generator) -> Conversation:
    """``conv`` with its user audio moved by a random shift that keeps the labels of the window of micro-turns
    ``[start, start + length)`` true (see :func:`_heard`). The samples moved in at an edge repeat the edge's."""
    earliest, latest = shift_range(label_marks(conv.meta), *_heard(start, length, lead))
    shift = earliest + int(torch.randint(0, latest - earliest + 1, (), generator=generator))
    audio = conv.user_audio
    moved = np.empty_like(audio)
    if shift >= 0:
        moved[shift:] = audio[:len(audio) - shift]
        moved[:shift] = audio[:shift]
    else:
        moved[:shift] = audio[-shift:]
        moved[shift:] = audio[shift:]
    return dataclasses.replace(conv, user_audio=moved)


def low_pass_filter(cutoff_hz: float, taps: int = LOW_PASS_TAPS) -> np.ndarray:
    """A linear-phase (Hann-windowed sinc) low-pass at ``cutoff_hz`` for 16 kHz audio, unit gain at 0 Hz; its
    delay is ``taps // 2`` samples, taken off by :func:`low_passed`."""
    n = np.arange(taps) - taps // 2
    h = 2 * cutoff_hz / SAMPLE_RATE * np.sinc(2 * cutoff_hz / SAMPLE_RATE * n) * np.hanning(taps + 2)[1:-1]
    return (h / h.sum()).astype(np.float32)


def low_passed(conv: Conversation, start: int, length: int, lead: int, generator: torch.Generator) -> Conversation:
    """``conv`` with the user audio that the window of micro-turns ``[start, start + length)`` hears (see
    :func:`_heard`) through a low-pass whose cutoff is drawn from :data:`LOW_PASS_HZ`, with no delay."""
    low, high = LOW_PASS_HZ
    cutoff = low + (high - low) * float(torch.rand((), generator=generator))
    first, end = (max(0, sample) for sample in _heard(start, length, lead))
    audio = conv.user_audio.copy()
    audio[first:end] = np.convolve(conv.user_audio[first:end], low_pass_filter(cutoff), mode="same")
    return dataclasses.replace(conv, user_audio=audio)
