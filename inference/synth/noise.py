"""The user's microphone: a conversation's background noise (white, pink or brown, at a fixed RMS, or none at all)
and speech level.

Noise is drawn from the conversation's generator, so it is as deterministic as everything else. Its level stays far
below speech (RMS −75 to −55 dBFS against speech peaks of −16 to −2 dBFS), so the labelled speech spans can be checked
against the stored audio: outside them there is only this noise. A share of conversations (:data:`DIGITAL_SILENCE`)
has no noise at all: between utterances the samples are exactly zero, as a browser's fake or noise-suppressed
microphone sends them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from microturn.contracts import SAMPLE_RATE

COLOURS = {"white": 0.0, "pink": 1.0, "brown": 2.0}
"""Noise colour → exponent of its power spectrum's 1/f fall (flat below 50 Hz)."""

NOISE_DBFS = (-75.0, -55.0)
DIGITAL_SILENCE = 0.2  # the share of conversations with no noise floor
LEVEL_DBFS = (-12.0, -3.0)  # a conversation's speech peak level
UTTERANCE_DB = (-4.0, 1.0)  # each utterance's change of level around it


@dataclass(frozen=True)
class Noise:
    """Stationary background noise of one conversation."""

    colour: str  # one of COLOURS, or "none" (digital silence)
    rms: float  # linear, of the whole noise track; 0 for "none"

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Noise:
        if rng.random() < DIGITAL_SILENCE:
            return cls("none", 0.0)
        colour = str(rng.choice(sorted(COLOURS)))
        return cls(colour, float(10 ** (rng.uniform(*NOISE_DBFS) / 20)))

    def render(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` samples of this noise, float64, RMS exactly :attr:`rms`."""
        if self.colour == "none":
            return np.zeros(n)
        spectrum = np.fft.rfft(rng.standard_normal(n))
        freqs = np.maximum(np.fft.rfftfreq(n, 1 / SAMPLE_RATE), 50.0)
        noise = np.fft.irfft(spectrum * freqs ** (-COLOURS[self.colour] / 2), n)
        return noise * (self.rms / float(np.sqrt(np.mean(noise ** 2))))


def utterance_gain(rng: np.random.Generator, level_db: float) -> float:
    """Linear gain of one user utterance (peak 1 in) at the conversation's level, changed a little per utterance."""
    return float(10 ** ((level_db + rng.uniform(*UTTERANCE_DB)) / 20))
