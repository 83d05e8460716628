"""Speech rendering: text in one espeak-ng voice → 16 kHz mono float32, peak 1, cut exactly to the speech.

espeak-ng writes 16-bit WAV (22,050 Hz) to its stdout, never to a file; the samples are resampled in numpy (FFT,
band-limited, exact ratio) and trimmed to the first and last sample whose magnitude reaches :data:`TRIM` of the
peak. So a rendering holds speech from its first sample to its last, which is what makes the labelled speech spans
exact: a span is where a rendering was placed, and there is nothing of it outside.

A part of a turn the user goes on from after a pause (the head of a question cut by a pause, a sentence of a long
statement followed by another) is rendered ``continuing``: espeak-ng is given the text with a trailing comma, so
the part ends in its clause-continuation intonation, level or rising, as a speaker who means to go on ends it,
instead of the falling pitch and final lengthening of a finished sentence.
"""

from __future__ import annotations

import functools
import subprocess

import numpy as np

from inference.synth.voices import Voice
from microturn.contracts import SAMPLE_RATE

TRIM = 0.01
"""Samples below this fraction of the peak at either end of a rendering are cut (−40 dB)."""


@functools.lru_cache(maxsize=512)
def speak(voice: Voice, text: str, continuing: bool = False) -> np.ndarray:
    """``text`` spoken in ``voice``: 16 kHz float32, peak 1, trimmed (read-only; cached per process). With
    ``continuing`` it ends as a clause the speaker goes on from (see the module's docstring)."""
    said = text + "," if continuing else text
    wav = subprocess.run(["espeak-ng", "-v", voice.identity, "-s", str(voice.rate), "-p", str(voice.pitch),
                          "--stdout", said], check=True, capture_output=True).stdout
    if wav[:4] != b"RIFF" or wav[36:40] != b"data":
        raise RuntimeError(f"espeak-ng gave no WAV for {voice.identity} {text!r}")
    rate = int.from_bytes(wav[24:28], "little")
    pcm = np.frombuffer(wav[44:44 + (len(wav) - 44) // 2 * 2], "<i2").astype(np.float64)
    audio = resample(pcm, rate, SAMPLE_RATE)
    peak = float(np.abs(audio).max())
    if peak == 0.0:
        raise RuntimeError(f"espeak-ng rendered silence for {voice.identity} {text!r}")
    loud = np.flatnonzero(np.abs(audio) >= TRIM * peak)
    out = (audio[loud[0]:loud[-1] + 1] / peak).astype(np.float32)
    out.flags.writeable = False
    return out


def resample(x: np.ndarray, rate: int, to: int) -> np.ndarray:
    """Band-limited FFT resampling of ``x`` from ``rate`` to ``to`` Hz (zero-padded to a whole period of the
    ratio, so the output length is exact; the padding is silence and is trimmed with the rest)."""
    g = np.gcd(rate, to)
    step_in, step_out = rate // g, to // g
    periods = -(-(len(x) + step_in) // step_in)  # at least one period of silence after the end
    n_in, n_out = periods * step_in, periods * step_out
    spectrum = np.fft.rfft(x, n_in)
    kept = np.zeros(n_out // 2 + 1, complex)
    m = min(len(kept), len(spectrum))
    kept[:m] = spectrum[:m]
    return np.fft.irfft(kept, n_out) * (n_out / n_in)
