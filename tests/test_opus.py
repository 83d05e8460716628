"""OpusTrack: the outbound audio, encoded on the event loop, decodes back to what the playout produced."""

from __future__ import annotations

import fractions

import av
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamTrack

from webrtc_gateway.opus import OpusTrack
from webrtc_gateway.playout import FRAME_SAMPLES, RATE


class Frames(MediaStreamTrack):
    kind = "audio"

    def __init__(self, signal: np.ndarray, layout: str = "mono", start_pts: int = 0) -> None:
        super().__init__()
        self.signal, self.layout, self.pts = signal, layout, start_pts

    async def recv(self) -> av.AudioFrame:
        channels = 2 if self.layout == "stereo" else 1
        chunk, self.signal = self.signal[:FRAME_SAMPLES], self.signal[FRAME_SAMPLES:]
        frame = av.AudioFrame(format="s16", layout=self.layout, samples=FRAME_SAMPLES)
        frame.planes[0].update(np.repeat((chunk * 32767).astype(np.int16), channels).tobytes())
        frame.sample_rate, frame.pts, frame.time_base = RATE, self.pts, fractions.Fraction(1, RATE)
        self.pts += FRAME_SAMPLES
        return frame


async def test_packets_keep_the_frames_timestamps_and_decode_to_the_source() -> None:
    t = np.arange(50 * FRAME_SAMPLES) / RATE
    signal = (0.3 * np.sin(2 * np.pi * (200 * t + 300 * t**2)) * (1 + np.sin(2 * np.pi * 3 * t)) / 2).astype(np.float32)
    track = OpusTrack(Frames(signal, start_pts=96_000))
    decoder = av.CodecContext.create("libopus", "r")
    decoded, size = [], 0
    for n in range(50):
        packet = await track.recv()
        assert packet.pts == 96_000 + n * FRAME_SAMPLES and packet.time_base == fractions.Fraction(1, RATE)
        size += packet.size
        for frame in decoder.decode(packet):
            decoded.append(frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0] / 32768)
    assert 0.5 * 6000 < size < 1.5 * 6000  # one second at about 48 kbit/s (aiortc's own encoder: 96 kbit/s)
    out = np.concatenate(decoded)
    b = signal[4800:40_000]  # a chirp: no lag but the right one lines it up
    fit = [np.corrcoef(out[lag + 4800:lag + 40_000], b)[0, 1] for lag in range(FRAME_SAMPLES)]
    assert max(fit) > 0.98  # Opus's look-ahead is the lag


async def test_frames_it_cannot_code_as_one_mono_packet_are_refused() -> None:
    with pytest.raises(ValueError, match="mono"):
        await OpusTrack(Frames(np.zeros(FRAME_SAMPLES, np.float32), layout="stereo")).recv()
