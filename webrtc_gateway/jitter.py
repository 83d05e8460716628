"""Inbound audio without aiortc's jitter buffer and decoder thread.

aiortc holds inbound audio in a jitter buffer that releases a frame only after four later ones arrived (80 ms), then
decodes it in a thread of its own and hands the frame back to the event loop. The gateway needs neither the wait nor
the hand-offs: the input timeline places every sample by its RTP timestamp, and the micro-turn clock has its own
deadline. :class:`DecodingJitterBuffer` takes the jitter buffer's place: it decodes each Opus packet the moment it
arrives, on the event loop (libopus takes about 0.1 ms for 40 ms of audio), straight to mono, and hands the samples
on with their timestamp. aiortc's decoder is never given anything. Duplicates and packets older than the newest one
are dropped (the timeline would take them, but the decoder's state would not). The decoding itself,
:class:`InboundOpus`, also serves the probe client, which records packets and decodes them after the call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol, cast

import av
import numpy as np
from aiortc import RTCRtpReceiver
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtp import RtpPacket
from aiortc.utils import uint16_gt

from webrtc_gateway.ingest import INPUT_RATE

log = logging.getLogger(__name__)


class JitterBuffer(Protocol):
    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]: ...


def replace_jitter_buffer(receiver: RTCRtpReceiver, buffer: JitterBuffer) -> None:
    """Give an audio receiver another jitter buffer (aiortc has no public setting for it)."""
    receiver._RTCRtpReceiver__jitter_buffer = buffer  # type: ignore[attr-defined]


class InboundOpus:
    """One inbound Opus stream, decoded packet by packet to mono: duplicates and packets older than the newest one
    are dropped, and each decoded piece carries its ``pts`` in 48 kHz samples from the stream's first packet."""

    def __init__(self) -> None:
        self.dropped = 0  # duplicates, out-of-order and undecodable packets
        self._decoder = cast(av.AudioCodecContext, av.CodecContext.create("libopus", "r"))
        self._decoder.format, self._decoder.layout, self._decoder.sample_rate = "s16", "mono", INPUT_RATE
        self._last_sequence: int | None = None
        self._first_timestamp: int | None = None

    def decode(self, packet: RtpPacket) -> list[tuple[int, np.ndarray]]:
        """``packet``'s audio as (pts, float32 mono in [-1, 1]) pieces; none if it is dropped."""
        if self._last_sequence is not None and not uint16_gt(packet.sequence_number, self._last_sequence):
            self.dropped += 1
            return []
        self._last_sequence = packet.sequence_number
        if self._first_timestamp is None:
            self._first_timestamp = packet.timestamp
        pts = (packet.timestamp - self._first_timestamp) % 2**32
        try:
            frames = self._decoder.decode(av.Packet(packet._data))  # type: ignore[attr-defined]
        except av.FFmpegError as exc:  # a corrupt packet: its place stays silent, like a lost one
            self.dropped += 1
            log.debug("undecodable audio packet: %s", exc)
            return []
        pieces = []
        for frame in frames:
            pcm = np.frombuffer(memoryview(frame.planes[0]), np.int16, count=frame.samples)
            pieces.append((pts, pcm * np.float32(1 / 32768)))
            pts += frame.samples
        return pieces


class DecodingJitterBuffer:
    """Decodes each packet as it arrives (see :class:`InboundOpus`) and calls ``feed(pts, mono)`` with its audio."""

    def __init__(self, feed: Callable[[int, np.ndarray], None]) -> None:
        self.feed = feed
        self.stream = InboundOpus()

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        for pts, mono in self.stream.decode(packet):
            self.feed(pts, mono)
        return False, None
