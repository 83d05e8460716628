"""A pass-through jitter buffer for inbound audio.

aiortc holds inbound audio in a jitter buffer that releases a frame only after four later ones arrived (80 ms).
The gateway needs no such buffer: the input timeline places every frame by its RTP timestamp and the micro-turn
clock has its own deadline. This buffer hands each Opus packet to the decoder as soon as it arrives, dropping
duplicates and packets older than the newest one released (the decoder's timestamp mapper needs them in order).
"""

from __future__ import annotations

from typing import Protocol

from aiortc import RTCRtpReceiver
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtp import RtpPacket
from aiortc.utils import uint16_gt


class PassThroughJitterBuffer:
    """Releases every in-order audio packet at once as one frame."""

    def __init__(self) -> None:
        self.last_sequence: int | None = None
        self.dropped = 0  # duplicates and out-of-order packets

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        if self.last_sequence is not None and not uint16_gt(packet.sequence_number, self.last_sequence):
            self.dropped += 1
            return False, None
        self.last_sequence = packet.sequence_number
        return False, JitterFrame(data=packet._data, timestamp=packet.timestamp)  # type: ignore[attr-defined]


class JitterBuffer(Protocol):
    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]: ...


def replace_jitter_buffer(receiver: RTCRtpReceiver, buffer: JitterBuffer) -> None:
    """Give an audio receiver another jitter buffer (aiortc has no public setting for it)."""
    receiver._RTCRtpReceiver__jitter_buffer = buffer  # type: ignore[attr-defined]


def use_pass_through(receiver: RTCRtpReceiver) -> PassThroughJitterBuffer:
    """Replace an audio receiver's jitter buffer with a :class:`PassThroughJitterBuffer`."""
    buffer = PassThroughJitterBuffer()
    replace_jitter_buffer(receiver, buffer)
    return buffer
