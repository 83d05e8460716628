"""Opus encoding of an outbound audio track, on the event loop.

aiortc encodes each outgoing 20 ms frame in a thread-pool thread: a hand-off there and a wake-up back per frame,
and it up-mixes to stereo at 96 kbit/s. :class:`OpusTrack` wraps a track of 20 ms mono 48 kHz frames and hands
aiortc's sender ready Opus packets instead (the sender sends pre-encoded packets as they are), encoded in place:
mono, for speech, at :data:`BIT_RATE`. The packets keep the frames' timestamps, so RTP time is the source's.
The negotiation must then settle on Opus, which :func:`prefer_opus` makes sure of. (aiortc puts the RFC 6465
audio-level header extension only on packets it encoded itself, so these go without it; nothing here reads it.)
"""

from __future__ import annotations

import av
from aiortc import RTCRtpSender, RTCRtpTransceiver
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from webrtc_gateway.playout import FRAME_SAMPLES, RATE, TIME_BASE

BIT_RATE = 48_000  # mono speech: transparent at 48 kbit/s


class OpusTrack(MediaStreamTrack):
    """Opus packets of ``source``'s audio, one per 20 ms frame."""

    kind = "audio"

    def __init__(self, source: MediaStreamTrack) -> None:
        super().__init__()
        self.source = source
        self._codec = av.CodecContext.create("libopus", "w")
        self._codec.bit_rate = BIT_RATE
        self._codec.format = "s16"
        self._codec.layout = "mono"
        self._codec.sample_rate = RATE
        self._codec.time_base = TIME_BASE
        self._codec.options = {"application": "voip"}

    async def recv(self) -> av.Packet:  # aiortc's senders take packets as well as frames
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self.source.recv()
        if not (isinstance(frame, av.AudioFrame) and frame.format.name == "s16" and frame.layout.name == "mono"
                and frame.sample_rate == RATE and frame.samples == FRAME_SAMPLES):
            raise ValueError(f"OpusTrack needs 20 ms s16 mono {RATE} Hz audio frames, got {frame!r}")
        (packet,) = self._codec.encode(frame)  # libopus codes each whole 20 ms frame at once, no look-ahead queue
        packet.pts = frame.pts
        packet.time_base = TIME_BASE
        return packet


def prefer_opus(transceiver: RTCRtpTransceiver) -> None:
    """Negotiate only Opus on ``transceiver``: the packets :class:`OpusTrack` sends are Opus."""
    codecs = RTCRtpSender.getCapabilities("audio").codecs
    transceiver.setCodecPreferences([c for c in codecs if c.mimeType.lower() == "audio/opus"])
