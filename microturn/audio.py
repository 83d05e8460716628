"""Small audio measurements shared by the gateway, the models and the tools."""

from __future__ import annotations

import numpy as np


def rms_dbfs(audio: np.ndarray) -> float:
    """RMS level of float audio in dBFS (−100 for digital silence or no samples)."""
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if audio.size else 0.0
    return max(-100.0, 20 * float(np.log10(rms))) if rms > 0 else -100.0
