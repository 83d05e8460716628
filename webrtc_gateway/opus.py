"""Opus encoding of an outbound audio track, on the event loop.

aiortc encodes each outgoing frame in a thread-pool thread (a hand-off there and a wake-up back per frame) with
libopus's defaults: stereo, 96 kbit/s, its speech mode at full complexity. :class:`OpusTrack` wraps a track of
40 ms mono 48 kHz frames and hands aiortc's sender ready Opus packets instead (the sender sends pre-encoded packets
as they are), encoded in place by an :class:`OpusEncoder`, one packet per frame:

- mono at :data:`BIT_RATE`, in libopus's low-delay (CELT-only) mode at :data:`COMPLEXITY`: at 48 kbit/s speech
  sounds the same, and it costs about a quarter of the default per frame;
- an all-zero frame is coded as a fixed frame of ±1 LSB noise (−90 dBFS): CELT takes about three times as long on
  digital silence as on sound, and an idle model's playout is mostly digital silence.

The packets keep the frames' timestamps, so RTP time is the source's. The negotiation must then settle on Opus,
which :func:`prefer_opus` makes sure of; :func:`with_packet_time` asks the browser to send 40 ms packets as well.
(aiortc puts the RFC 6465 audio-level header extension only on packets it encoded itself, so these go without it;
nothing here reads it.)
"""

from __future__ import annotations

import av
import numpy as np
from aiortc import RTCRtpSender, RTCRtpTransceiver
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from webrtc_gateway.playout import FRAME_SAMPLES, RATE, TIME_BASE

BIT_RATE = 48_000  # mono speech: transparent at 48 kbit/s
COMPLEXITY = 1  # of libopus's 0–10
FRAME_MS = FRAME_SAMPLES * 1000 // RATE


class OpusEncoder:
    """libopus as the gateway sends it: each mono 48 kHz s16 frame of :data:`FRAME_SAMPLES` → one Opus packet with
    the frame's timestamp."""

    def __init__(self) -> None:
        self._codec = av.CodecContext.create("libopus", "w")
        self._codec.bit_rate = BIT_RATE
        self._codec.format = "s16"
        self._codec.layout = "mono"
        self._codec.sample_rate = RATE
        self._codec.time_base = TIME_BASE
        self._codec.options = {"application": "lowdelay", "compression_level": str(COMPLEXITY),
                               "frame_duration": str(FRAME_MS)}
        hush = np.random.default_rng(0).integers(-1, 2, FRAME_SAMPLES).astype(np.int16)
        self._hush = av.AudioFrame.from_ndarray(hush[None], format="s16", layout="mono")
        self._hush.sample_rate = RATE

    def encode(self, frame: av.AudioFrame) -> av.Packet:
        if not (frame.format.name == "s16" and frame.layout.name == "mono" and frame.sample_rate == RATE
                and frame.samples == FRAME_SAMPLES):
            raise ValueError(f"Opus packets here are {FRAME_MS} ms of s16 mono {RATE} Hz audio, got {frame!r}")
        pts = frame.pts
        if not np.frombuffer(memoryview(frame.planes[0]), np.int16, count=FRAME_SAMPLES).any():
            frame = self._hush
        (packet,) = self._codec.encode(frame)  # libopus codes each whole frame at once, no look-ahead queue
        packet.pts = pts
        packet.time_base = TIME_BASE
        return packet


class OpusTrack(MediaStreamTrack):
    """Opus packets of ``source``'s audio, one per frame of :data:`FRAME_SAMPLES`."""

    kind = "audio"

    def __init__(self, source: MediaStreamTrack) -> None:
        super().__init__()
        self.source = source
        self._encoder = OpusEncoder()

    async def recv(self) -> av.Packet:  # aiortc's senders take packets as well as frames
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self.source.recv()
        if not isinstance(frame, av.AudioFrame):
            raise ValueError(f"OpusTrack needs audio frames, got {frame!r}")
        return self._encoder.encode(frame)


def prefer_opus(transceiver: RTCRtpTransceiver) -> None:
    """Negotiate only Opus on ``transceiver``: the packets :class:`OpusTrack` sends are Opus."""
    codecs = RTCRtpSender.getCapabilities("audio").codecs
    transceiver.setCodecPreferences([c for c in codecs if c.mimeType.lower() == "audio/opus"])


def with_packet_time(sdp: str) -> str:
    """``sdp`` with ``a=ptime`` (RFC 4566) set to the gateway's frame length in each audio section: Chrome then sends
    40 ms packets too (aiortc does not read it). An answer may carry it; an offerer need not follow it."""
    lines: list[str] = []
    in_audio = False  # inside an audio section that has no a=ptime yet
    for line in [*sdp.rstrip("\r\n").split("\r\n"), "m="]:  # a last "m=" closes the last section
        if line.startswith("m="):
            if in_audio:
                lines.append(f"a=ptime:{FRAME_MS}")
            in_audio = line.startswith("m=audio ")
        elif line.startswith("a=ptime:"):
            in_audio = False
        lines.append(line)
    return "\r\n".join(lines[:-1]) + "\r\n"
