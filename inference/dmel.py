"""dMel audio features (arXiv 2407.15835): log-mel frames, each channel quantised into a few evenly spaced
bins.

Spec: 16 kHz audio, STFT with n_fft 1024 and a Hann window, 80 mel channels from 80 to 7600 Hz (Slaney mel
scale and area-normalised filters, on the magnitude spectrum), log10, clipped to [−7, 2], then each channel
rounded to the nearest of 16 evenly spaced levels ``linspace(−7, 2, 16)``: bin ``b`` stands for ``−7 + 9 b /
15``.

Framing is causal, so it streams: the hop is 400 samples (25 ms, 40 frames per second) and frame ``i`` covers
the 1024 samples that end at sample ``(i + 1) · 400`` (zeros before the start of the stream). A micro-turn of
3200 samples is exactly 8 frames, and none of them looks at a sample after the micro-turn: :class:`DMelStream`
keeps the last 624 samples of the previous micro-turn as the left context of the first windows, which makes
streaming features equal to offline ones. """

from __future__ import annotations

import math

import torch

from microturn.contracts import SAMPLE_RATE

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
    """Windowed frames of audio that already carries its ``n_fft - hop`` samples of left context.

    (B, CONTEXT + F·hop) → (B, F, n_fft)
    """
    return audio.unfold(-1, n_fft, hop) * hann(n_fft).to(audio.device)


def magnitude(audio_with_context: torch.Tensor) -> torch.Tensor:
    """|STFT| of causal frames: (B, CONTEXT + F·hop) → (B, F, n_fft // 2 + 1)."""
    return torch.fft.rfft(causal_frames(audio_with_context), dim=-1).abs()


def log_mel(audio: torch.Tensor, fb: torch.Tensor | None = None) -> torch.Tensor:
    """Offline clipped log10 mel of whole signals: (B, S) with S a multiple of 400 → (B, S // 400, 80)."""
    padded = torch.nn.functional.pad(audio, (CONTEXT, 0))
    return log_mel_with_context(padded, fb)


def log_mel_with_context(audio_with_context: torch.Tensor, fb: torch.Tensor | None = None) -> torch.Tensor:
    fb = mel_filterbank().to(audio_with_context.device) if fb is None else fb
    mel = magnitude(audio_with_context) @ fb.T  # (B, F, 80)
    return torch.log10(mel.clamp_min(10.0 ** LOG_MIN)).clamp(LOG_MIN, LOG_MAX)


def quantize(logmel: torch.Tensor) -> torch.Tensor:
    """Clipped log10 mel → bin ids in [0, 16) (long), nearest level."""
    scaled = (logmel.clamp(LOG_MIN, LOG_MAX) - LOG_MIN) * ((BINS - 1) / (LOG_MAX - LOG_MIN))
    return torch.round(scaled).long()


def dequantize(bins: torch.Tensor) -> torch.Tensor:
    """Bin ids → the log10 mel level each stands for."""
    return LOG_MIN + bins.float() * ((LOG_MAX - LOG_MIN) / (BINS - 1))


class DMelStream:
    """Causal dMel for a batch of streams, one micro-turn at a time; holds no per-stream state itself.

    Each stream's state is its last :data:`CONTEXT` samples (a (624,) tensor, zeros at the start), which
    :meth:`step` takes and returns, so the caller (the session) owns it.
    """

    def __init__(self) -> None:
        self.fb = mel_filterbank()

    @staticmethod
    def initial_state() -> torch.Tensor:
        return torch.zeros(CONTEXT)

    def step(self, audio: torch.Tensor, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3200) audio and (B, 624) states → (B, 8, 80) bins and (B, 624) next states."""
        joined = torch.cat([states, audio], dim=1)  # (B, 624 + 3200)
        bins = quantize(log_mel_with_context(joined, self.fb))
        return bins, joined[:, -CONTEXT:].clone()
