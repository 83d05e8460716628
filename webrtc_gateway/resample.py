"""Streaming 48 kHz ↔ 16 kHz resampling for the media path.

WebRTC audio is 48 kHz; the model's timeline is 16 kHz. Both directions use one linear-phase windowed-sinc FIR
(49 taps at 48 kHz, cutoff 7.2 kHz, 0.5 ms group delay) and keep the filter history between calls, so a stream cut
into 20 ms frames resamples exactly as it would in one piece. A discontinuity (a gap in the input) calls
:meth:`reset`, so no history leaks across it.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

RATIO = 3  # 48 kHz / 16 kHz
TAPS = 49


def _lowpass(taps: int = TAPS, cutoff_hz: float = 7_200.0, rate: int = 48_000) -> np.ndarray:
    n = np.arange(taps) - (taps - 1) / 2
    h = 2 * cutoff_hz / rate * np.sinc(2 * cutoff_hz / rate * n) * np.blackman(taps)
    return (h / h.sum()).astype(np.float32)


_FILTER = _lowpass()
_REVERSED = np.ascontiguousarray(_FILTER[::-1])
# Polyphase branches for ×3 interpolation: output phase p uses taps p, p+3, p+6, … (gain 3 for the zero-stuffing).
_PHASES = np.stack([np.pad(_FILTER[p::RATIO], (0, -(-TAPS // RATIO) - len(_FILTER[p::RATIO])))
                    for p in range(RATIO)], axis=1)[::-1] * RATIO  # (17, 3), time-reversed


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
        # Output sample j is the filter evaluated at input sample RATIO*j (delayed by the filter's half-length):
        # only every third window is computed.
        windows = np.ascontiguousarray(sliding_window_view(padded, TAPS)[::RATIO])  # (len(x) / 3, TAPS)
        return (windows @ _REVERSED).astype(np.float32)


class Interpolator:
    """16 kHz → 48 kHz."""

    def __init__(self) -> None:
        self._history = np.zeros(_PHASES.shape[0] - 1, np.float32)

    def reset(self) -> None:
        self._history[:] = 0

    def process(self, x: np.ndarray) -> np.ndarray:
        padded = np.concatenate([self._history, x.astype(np.float32, copy=False)])
        self._history = padded[len(padded) - len(self._history):].copy()
        windows = sliding_window_view(padded, _PHASES.shape[0])  # (len(x), 17)
        return (windows @ _PHASES).astype(np.float32).reshape(-1)  # (len(x), 3) → 3·len(x), phases interleaved
