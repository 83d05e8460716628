"""Streaming 48 kHz ↔ 16 kHz resampling for the media path.

WebRTC audio is 48 kHz; the model's timeline is 16 kHz. Both directions use one linear-phase windowed-sinc FIR
(49 taps at 48 kHz, cutoff 7.2 kHz, 0.5 ms group delay) and keep the filter history between calls, so a stream cut
into 20 ms frames resamples exactly as it would in one piece. A discontinuity (a gap in the input) calls
:meth:`reset`, so no history leaks across it.
"""

from __future__ import annotations

import numpy as np

RATIO = 3  # 48 kHz / 16 kHz
TAPS = 49


def _lowpass(taps: int = TAPS, cutoff_hz: float = 7_200.0, rate: int = 48_000) -> np.ndarray:
    n = np.arange(taps) - (taps - 1) / 2
    h = 2 * cutoff_hz / rate * np.sinc(2 * cutoff_hz / rate * n) * np.blackman(taps)
    return (h / h.sum()).astype(np.float32)


_FILTER = _lowpass()


class Decimator:
    """48 kHz → 16 kHz, for input chunks whose length is a multiple of 3."""

    def __init__(self) -> None:
        self._history = np.zeros(TAPS - 1, np.float32)

    def reset(self) -> None:
        self._history[:] = 0

    def process(self, x: np.ndarray) -> np.ndarray:
        if len(x) % RATIO:
            raise ValueError(f"decimator input length {len(x)} is not a multiple of {RATIO}")
        padded = np.concatenate([self._history, x.astype(np.float32, copy=False)])
        self._history = padded[len(padded) - (TAPS - 1):].copy()
        # Output sample j is the filter evaluated at input sample RATIO*j (delayed by the filter's half-length).
        full = np.convolve(padded, _FILTER, mode="valid")  # (len(x),)
        return full[::RATIO].astype(np.float32)


class Interpolator:
    """16 kHz → 48 kHz."""

    def __init__(self) -> None:
        self._history = np.zeros(TAPS - 1, np.float32)

    def reset(self) -> None:
        self._history[:] = 0

    def process(self, x: np.ndarray) -> np.ndarray:
        stuffed = np.zeros(len(x) * RATIO, np.float32)
        stuffed[::RATIO] = x * RATIO
        padded = np.concatenate([self._history, stuffed])
        self._history = padded[len(padded) - (TAPS - 1):].copy()
        return np.convolve(padded, _FILTER, mode="valid").astype(np.float32)
