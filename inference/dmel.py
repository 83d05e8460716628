"""dMel audio features (arXiv 2407.15835): log-mel frames, each channel quantised into a few evenly spaced
bins.

Spec: 16 kHz audio, STFT with n_fft 1024 and a Hann window, 80 mel channels from 80 to 7600 Hz (Slaney mel
scale and area-normalised filters, on the magnitude spectrum), log10, clipped to [−7, 2], then each channel
rounded to the nearest of 16 evenly spaced levels ``linspace(−7, 2, 16)``: bin ``b`` stands for ``−7 + 9 b /
15``.

Framing is per micro-turn, so it streams and keeps no state: the hop is 400 samples (25 ms, 40 frames per
second), a micro-turn of 3200 samples is exactly 8 frames, and frame ``i`` of a micro-turn covers the 1024
samples that end at its sample ``(i + 1) · 400``. The first two windows reach back before the micro-turn; that
part is the micro-turn's own start, reflected, never the previous micro-turn's audio. So the features of
micro-turn ``k`` depend on micro-turn ``k`` alone: nothing after it, and nothing a session has to keep (or a
restored session to recover) from before it. Offline features are the same computation over every micro-turn.

The microphone's side is dithered first (:func:`dither`): a faint fixed noise floor, so that exact digital silence
looks like the quiet room the model learned from rather than an input it never saw.
"""

from __future__ import annotations

import math

import torch

from microturn.contracts import MICRO_TURN_SAMPLES, SAMPLE_RATE

N_FFT = 1024
HOP = 400
N_MELS = 80
F_MIN = 80.0
F_MAX = 7600.0
LOG_MIN = -7.0
LOG_MAX = 2.0
BINS = 16
CONTEXT = N_FFT - HOP
"""Samples before a frame's hop that its window also covers (624)."""
DITHER_DBFS = -65.0
"""RMS level of the noise floor :func:`dither` adds: the middle of the training microphones' floors (−75 to −55)."""


def _hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    # Slaney scale: linear below 1 kHz, logarithmic above
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    linear = f / f_sp
    return torch.where(f >= min_log_hz, min_log_hz / f_sp + torch.log(f / min_log_hz) / logstep, linear)


def _mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return torch.where(m >= min_log_mel, min_log_hz * torch.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, sr: int = SAMPLE_RATE,
                   f_min: float = F_MIN, f_max: float = F_MAX) -> torch.Tensor:
    """Triangular, area-normalised mel filters: (n_mels, n_fft // 2 + 1) float32."""
    freqs = torch.linspace(0, sr / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = _mel_to_hz(torch.linspace(float(_hz_to_mel(torch.tensor(f_min, dtype=torch.float64))),
                                      float(_hz_to_mel(torch.tensor(f_max, dtype=torch.float64))),
                                      n_mels + 2, dtype=torch.float64))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None] - lower) / (centre - lower)
    falling = (upper - freqs[None]) / (upper - centre)
    fb = torch.clamp(torch.minimum(rising, falling), min=0.0)
    fb = fb * (2.0 / (upper - lower))
    return fb.float()


def hann(n_fft: int = N_FFT) -> torch.Tensor:
    return torch.hann_window(n_fft, periodic=True, dtype=torch.float32)


def causal_frames(audio: torch.Tensor, n_fft: int = N_FFT, hop: int = HOP) -> torch.Tensor:
    """Windowed frames of audio that already carries ``n_fft - hop`` samples of left context; frame ``i`` ends
    where hop ``i`` ends.

    (B, CONTEXT + F·hop) → (B, F, n_fft)
    """
    return audio.unfold(-1, n_fft, hop) * hann(n_fft).to(audio.device)


def magnitude(audio_with_context: torch.Tensor) -> torch.Tensor:
    """|STFT| of causal frames: (B, CONTEXT + F·hop) → (B, F, n_fft // 2 + 1)."""
    return torch.fft.rfft(causal_frames(audio_with_context), dim=-1).abs()


def log_mel(audio: torch.Tensor, fb: torch.Tensor | None = None) -> torch.Tensor:
    """Clipped log10 mel of whole signals, micro-turn by micro-turn: (B, S), S a multiple of 400 → (B, S/400, 80)."""
    b, n = audio.shape
    turns = -(-n // MICRO_TURN_SAMPLES)
    padded = torch.nn.functional.pad(audio, (0, turns * MICRO_TURN_SAMPLES - n))
    frames = micro_turn_log_mel(padded.reshape(b * turns, MICRO_TURN_SAMPLES), fb)  # (B·K, 8, 80)
    return frames.reshape(b, -1, frames.shape[-1])[:, : n // HOP]


def micro_turn_log_mel(audio: torch.Tensor, fb: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3200) micro-turns → (B, 8, 80) clipped log10 mel; the first windows see the start reflected."""
    fb = mel_filterbank().to(audio.device) if fb is None else fb
    padded = torch.nn.functional.pad(audio[:, None], (CONTEXT, 0), mode="reflect")[:, 0]
    mel = magnitude(padded) @ fb.T  # (B, 8, 80)
    return torch.log10(mel.clamp_min(10.0 ** LOG_MIN)).clamp(LOG_MIN, LOG_MAX)


def quantize(logmel: torch.Tensor) -> torch.Tensor:
    """Clipped log10 mel → bin ids in [0, 16) (long), nearest level."""
    scaled = (logmel.clamp(LOG_MIN, LOG_MAX) - LOG_MIN) * ((BINS - 1) / (LOG_MAX - LOG_MIN))
    return torch.round(scaled).long()


def dequantize(bins: torch.Tensor) -> torch.Tensor:
    """Bin ids → the log10 mel level each stands for."""
    return LOG_MIN + bins.float() * ((LOG_MAX - LOG_MIN) / (BINS - 1))


_DITHER = torch.randn(MICRO_TURN_SAMPLES, generator=torch.Generator().manual_seed(0)) * 10 ** (DITHER_DBFS / 20)


def dither(audio: torch.Tensor) -> torch.Tensor:
    """(B, 3200) microphone micro-turns → the same plus a faint white noise floor (RMS :data:`DITHER_DBFS`).

    Real microphones always hiss, but a browser's fake or noise-suppressed microphone, or a muted track, sends exact
    zeros, whose features sit at the floor in every channel: an input the model never heard. (Measured with the
    checkpoint trained before this existed, on 26 held-out conversations whose silences are digital zero: it took
    0.24 of the turns, and 0.91 with this dither.) The floor is one fixed pattern, the same in every micro-turn, so
    the features stay a function of the micro-turn alone; against the speech and noise of a real microphone it is
    negligible."""
    return audio + _DITHER.to(audio.device, audio.dtype)


class DMelStream:
    """dMel bins of a batch of microphone micro-turns, dithered (stateless; holds the mel filterbank)."""

    def __init__(self) -> None:
        self.fb = mel_filterbank()

    def step(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, 3200) audio → (B, 8, 80) bins."""
        return quantize(micro_turn_log_mel(dither(audio), self.fb))
