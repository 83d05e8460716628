"""Vocoders: log-mel frames → 16 kHz waveform, behind one small interface so a learned vocoder can replace
Griffin-Lim without touching the model or the engine.

:class:`GriffinLim` needs no weights: the mel filterbank's pseudo-inverse gives a magnitude spectrogram, and
fast Griffin-Lim (momentum 0.99) finds a phase for it, in the same causal framing as :mod:`inference.dmel`
(frame ``i`` ends at sample ``(i + 1) · 400``), so ``F`` frames give exactly ``F · 400`` samples. Phase starts
at zero, so the output is a function of the mel alone. """

from __future__ import annotations

from typing import Protocol

import torch

from inference.dmel import CONTEXT, HOP, N_FFT, hann, mel_filterbank


class Vocoder(Protocol):
    """Turns log10 mel frames (B, F, 80) into audio (B, F · 400) float32 in [-1, 1]."""

    def __call__(self, logmel: torch.Tensor) -> torch.Tensor: ...


class GriffinLim:
    """Weight-free vocoder: mel pseudo-inverse, then ``iters`` rounds of fast Griffin-Lim."""

    def __init__(self, iters: int = 32, momentum: float = 0.99) -> None:
        self.iters, self.momentum = iters, momentum
        self.window = hann(N_FFT)
        self.inverse = torch.linalg.pinv(mel_filterbank())  # (513, 80)
        self._envelopes: dict[int, torch.Tensor] = {}

    def _istft(self, spec: torch.Tensor) -> torch.Tensor:
        """(B, F, 513) complex → (B, F · hop) by windowed overlap-add in the causal framing."""
        b, n_frames, _ = spec.shape
        frames = torch.fft.irfft(spec, n=N_FFT, dim=-1) * self.window  # (B, F, n_fft)
        return self._overlap_add(frames)[:, CONTEXT:CONTEXT + n_frames * HOP] / self._envelope(n_frames)

    @staticmethod
    def _overlap_add(frames: torch.Tensor) -> torch.Tensor:
        """(B, F, n_fft) → (B, (F + spans - 1) · hop): frame i added at sample i · hop."""
        b, n_frames, _ = frames.shape
        spans = -(-N_FFT // HOP)  # hops one frame covers (3)
        parts = torch.nn.functional.pad(frames, (0, spans * HOP - N_FFT)).view(b, n_frames, spans, HOP)
        out = frames.new_zeros(b, n_frames + spans - 1, HOP)
        for j in range(spans):
            out[:, j:j + n_frames] += parts[:, :, j]
        return out.view(b, -1)

    def _envelope(self, n_frames: int) -> torch.Tensor:
        env = self._envelopes.get(n_frames)
        if env is None:
            squared = (self.window**2).expand(1, n_frames, N_FFT)
            env = self._overlap_add(squared)[:, CONTEXT:CONTEXT + n_frames * HOP].clamp_min(0.1)
            self._envelopes[n_frames] = env
        return env

    def _stft(self, signal: torch.Tensor) -> torch.Tensor:
        padded = torch.nn.functional.pad(signal, (CONTEXT, 0))
        return torch.fft.rfft(padded.unfold(-1, N_FFT, HOP) * self.window, dim=-1)

    def __call__(self, logmel: torch.Tensor) -> torch.Tensor:
        mag = (torch.pow(10.0, logmel) @ self.inverse.T).clamp_min(0.0)  # (B, F, 513)
        angles = torch.ones_like(mag, dtype=torch.complex64)
        previous = torch.zeros_like(angles)
        for _ in range(self.iters):
            rebuilt = self._stft(self._istft(mag * angles))
            angles = rebuilt - (self.momentum / (1 + self.momentum)) * previous
            angles = torch.sgn(angles)  # unit phasors
            previous = rebuilt
        return self._istft(mag * angles).clamp(-1.0, 1.0)
