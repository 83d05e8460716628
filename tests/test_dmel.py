"""dMel: the quantiser matches the spec on known values, the filterbank spans 80–7600 Hz, streaming features
equal offline ones and depend on their own micro-turn only, and mel → Griffin-Lim → mel of espeak-ng speech
stays close."""

from __future__ import annotations

import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from inference import dmel
from inference.vocoder import GriffinLim


def test_quantiser_matches_the_spec() -> None:
    levels = torch.linspace(-7, 2, 16)
    x = torch.tensor([-7.0, -12.0, 2.0, 9.0, -6.6, -6.3, -2.55, -2.45, 1.71, float(levels[5]) + 0.01])
    assert dmel.quantize(x).tolist() == [0, 0, 15, 15, 1, 1, 7, 8, 15, 5]
    torch.testing.assert_close(dmel.dequantize(torch.arange(16)), levels)
    y = torch.empty(1000).uniform_(-7, 2)
    assert float((dmel.dequantize(dmel.quantize(y)) - y).abs().max()) <= 9 / 15 / 2 + 1e-6


def test_filterbank_spans_80_to_7600_hz_and_finds_a_tone() -> None:
    fb = dmel.mel_filterbank()
    assert fb.shape == (80, 513)
    freqs = torch.linspace(0, 8000, 513)
    support = freqs[fb.sum(0) > 0]
    assert 80 <= float(support.min()) < 100 and 7550 < float(support.max()) <= 7600
    assert bool((fb.sum(1) > 0).all())
    t = torch.arange(16000) / 16000
    logmel = dmel.log_mel(0.5 * torch.sin(2 * torch.pi * 1000 * t)[None])[0]  # (40, 80)
    peak = int(logmel[10:].mean(0).argmax())
    centres = freqs[fb.argmax(1)]
    assert abs(float(centres[peak]) - 1000) < 60
    assert dmel.log_mel(torch.zeros(1, 3200)).eq(dmel.LOG_MIN).all()  # silence is the floor: bin 0


def test_streaming_equals_offline_and_depends_on_its_micro_turn_only() -> None:
    torch.manual_seed(0)
    audio = 0.3 * torch.randn(2, 5 * 3200)
    offline = dmel.quantize(dmel.log_mel(dmel.dither(audio.reshape(-1, 3200)).reshape(2, -1)))  # (2, 40, 80)
    stream = dmel.DMelStream()
    for k in range(5):
        bins = stream.step(audio[:, k * 3200:(k + 1) * 3200])
        assert bins.shape == (2, 8, 80)
        assert torch.equal(bins, offline[:, k * 8:(k + 1) * 8])
    later = audio.clone()
    later[:, 2 * 3200:] = 0.9  # everything after micro-turn 1 ...
    assert torch.equal(dmel.log_mel(later)[:, :16], dmel.log_mel(audio)[:, :16])  # ... changes nothing before
    earlier = audio.clone()
    earlier[:, :3200] = 0.0  # micro-turn 0 ...
    assert torch.equal(dmel.log_mel(earlier)[:, 8:], dmel.log_mel(audio)[:, 8:])  # ... changes nothing after it


def _espeak(text: str, path: Path) -> torch.Tensor:
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    with wave.open(str(path)) as w:
        rate = w.getframerate()
        samples = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768
    x = torch.from_numpy(samples)[None, None]
    x = torch.nn.functional.interpolate(x, scale_factor=16000 / rate, mode="linear")[0]
    return x[:, : x.shape[1] // dmel.HOP * dmel.HOP]


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_vocoder_round_trip_of_speech_stays_close(tmp_path: Path) -> None:
    speech = _espeak("The quick brown fox jumps over the lazy dog.", tmp_path / "s.wav")
    logmel = dmel.log_mel(speech)
    again = dmel.log_mel(GriffinLim(iters=32)(logmel))
    assert again.shape == logmel.shape
    voiced = logmel > -4
    assert float((again - logmel).abs().mean()) < 0.3
    assert float((again - logmel).abs()[voiced].mean()) < 0.15
    assert float((dmel.quantize(again) == dmel.quantize(logmel)).float().mean()) > 0.6


def test_dither_gives_digital_silence_a_quiet_noise_floor_and_leaves_sound_alone() -> None:
    silence = torch.zeros(3, 3200)
    bins = dmel.DMelStream().step(silence)
    assert torch.equal(bins[0], bins[2])  # the same floor in every micro-turn: features stay per micro-turn
    assert bins.float().mean() > 0.5  # no longer all bin 0 ...
    rng = torch.Generator().manual_seed(1)
    room = torch.randn(1, 3200, generator=rng) * 10 ** (-60 / 20)  # ... but like a quiet room's hiss (-60 dBFS)
    assert (bins[0].float() - dmel.DMelStream().step(room)[0].float()).abs().mean() < 1.0
    assert float(dmel.dither(silence).pow(2).mean().sqrt()) == pytest.approx(10 ** (dmel.DITHER_DBFS / 20), rel=0.05)
    speech_like = 0.3 * torch.randn(1, 3200, generator=rng)
    plain = dmel.quantize(dmel.micro_turn_log_mel(speech_like))
    assert (dmel.DMelStream().step(speech_like) != plain).float().mean() < 0.01
