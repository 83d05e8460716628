"""OpusTrack: the outbound audio, encoded on the event loop, decodes back to what the playout produced."""

from __future__ import annotations

import fractions

import av
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamTrack
from aiortc.rtp import RtpPacket

from webrtc_gateway.jitter import DecodingJitterBuffer
from webrtc_gateway.opus import OpusEncoder, OpusTrack, with_packet_time
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
    count = 2 * RATE // FRAME_SAMPLES  # two seconds
    t = np.arange(count * FRAME_SAMPLES) / RATE
    signal = (0.3 * np.sin(2 * np.pi * (200 * t + 300 * t**2)) * (1 + np.sin(2 * np.pi * 3 * t)) / 2).astype(np.float32)
    track = OpusTrack(Frames(signal, start_pts=96_000))
    decoder = av.CodecContext.create("libopus", "r")
    decoded, size = [], 0
    for n in range(count):
        packet = await track.recv()
        assert packet.pts == 96_000 + n * FRAME_SAMPLES and packet.time_base == fractions.Fraction(1, RATE)
        size += packet.size
        for frame in decoder.decode(packet):
            decoded.append(frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0] / 32768)
    assert 0.5 * 12_000 < size < 1.5 * 12_000  # at about 48 kbit/s (aiortc's own encoder: 96 kbit/s)
    out = np.concatenate(decoded)
    b = signal[4800:40_000]  # a chirp: no lag but the right one lines it up
    fit = [np.corrcoef(out[lag + 4800:lag + 40_000], b)[0, 1] for lag in range(960)]
    assert max(fit) > 0.98  # Opus's look-ahead is the lag


async def test_digital_silence_stays_inaudible() -> None:
    t = np.arange(FRAME_SAMPLES) / RATE
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    track = OpusTrack(Frames(np.concatenate([np.zeros(4 * FRAME_SAMPLES, np.float32), tone])))
    decoder = av.CodecContext.create("libopus", "r")
    levels = []
    for n in range(5):
        packet = await track.recv()
        assert packet.pts == n * FRAME_SAMPLES
        (frame,) = decoder.decode(packet)
        levels.append(np.sqrt(np.mean((frame.to_ndarray() / 32768.0) ** 2)))
    assert max(levels[:4]) < 10 ** (-80 / 20)  # the silent frames (coded as ±1 LSB noise): below −80 dBFS
    assert levels[4] > 0.05  # and the sound after them comes through


async def test_frames_it_cannot_code_as_one_mono_packet_are_refused() -> None:
    with pytest.raises(ValueError, match="mono"):
        await OpusTrack(Frames(np.zeros(FRAME_SAMPLES, np.float32), layout="stereo")).recv()


def test_the_answer_asks_for_the_gateways_packet_time_on_audio_only() -> None:
    sdp = ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
           "m=audio 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=rtpmap:96 opus/48000/2\r\n"
           "m=video 9 UDP/TLS/RTP/SAVPF 97\r\na=rtpmap:97 VP8/90000\r\n")
    lines = with_packet_time(sdp).split("\r\n")
    assert lines == [*sdp.split("\r\n")[:7], f"a=ptime:{FRAME_SAMPLES * 1000 // RATE}", *sdp.split("\r\n")[7:]]
    assert with_packet_time(with_packet_time(sdp)) == with_packet_time(sdp)


def rtp(sequence: int, timestamp: int, payload: bytes) -> RtpPacket:
    packet = RtpPacket(payload_type=96, sequence_number=sequence, timestamp=timestamp, payload=payload)
    packet._data = payload  # what aiortc's receiver sets before the jitter buffer sees the packet
    return packet


def test_inbound_packets_are_decoded_on_arrival_in_place_and_in_order() -> None:
    t = np.arange(10 * FRAME_SAMPLES) / RATE
    signal = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    encoder = OpusEncoder()
    payloads = []
    for n in range(10):
        frame = av.AudioFrame.from_ndarray((signal[n * FRAME_SAMPLES:(n + 1) * FRAME_SAMPLES] * 32767)
                                           .astype(np.int16)[None], format="s16", layout="mono")
        frame.sample_rate, frame.pts = RATE, n * FRAME_SAMPLES
        payloads.append(bytes(encoder.encode(frame)))
    fed: list[tuple[int, np.ndarray]] = []
    buffer = DecodingJitterBuffer(lambda pts, mono: fed.append((pts, mono)))
    first = 2**32 - 3 * FRAME_SAMPLES  # the RTP timestamp wraps around on the way
    order = [0, 1, 2, 2, 4, 3, 5, 6, 7, 8, 9]  # a duplicate, and 3 arrives after 4
    for n in order:
        assert buffer.add(rtp((65_530 + n) % 2**16, (first + n * FRAME_SAMPLES) % 2**32, payloads[n])) == (False, None)
    buffer.add(rtp((65_530 + 10) % 2**16, 0, b"\xff\xff\xff"))  # garbage (the sequence number wrapped too)
    assert buffer.stream.dropped == 3  # the duplicate, the late packet and the garbage; nothing raised
    assert [pts for pts, _ in fed] == [n * FRAME_SAMPLES for n in (0, 1, 2, 4, 5, 6, 7, 8, 9)]
    assert all(mono.dtype == np.float32 and len(mono) == FRAME_SAMPLES for _, mono in fed)
    out = np.concatenate([mono for pts, mono in fed if pts >= 5 * FRAME_SAMPLES])
    b = signal[5 * FRAME_SAMPLES + 960:]
    assert max(np.corrcoef(out[lag + 960:lag + 960 + len(b) - 960], b[:len(b) - 960])[0, 1]
               for lag in range(480)) > 0.95
