"""Inbound audio quality of one aiortc peer connection (packets, loss, jitter, round-trip time), for Prometheus.

What aiortc 1.16 reports, read from its ``rtcrtpreceiver.py``, ``rtcrtpsender.py`` and ``stats.py``:

- ``inbound-rtp`` (one per receiver, kept by the receiver from the RTP packets it got): ``packetsReceived``;
  ``packetsLost`` = packets expected from the sequence numbers − packets received, RFC 3550's cumulative loss, which
  goes negative when duplicates arrive and shrinks when a late packet does; ``jitter``, RFC 3550's interarrival
  jitter as an integer in RTP timestamp units, i.e. 1/clock-rate seconds of the codec (48 000 /s for Opus).
- ``remote-inbound-rtp`` (one per sender, from the receiver reports the other end sends about our outbound stream):
  ``roundTripTime`` in seconds, smoothed (``0.85·old + 0.15·new``) and None until a receiver report echoes this
  end's latest sender report (reports go every 0.5–1.5 s each way, so it takes a few seconds); also the other end's
  ``packetsLost``/``jitter``/``fractionLost`` about what we send.
- ``remote-outbound-rtp`` (per receiver, from the other end's sender reports): ``packetsSent``, ``bytesSent``,
  ``remoteTimestamp`` only. It has no ``roundTripTime``: aiortc does not implement the RTCP XR DLRR block a receiver
  would need to measure one.
- Not provided at all: codec stats, jitter-buffer or concealment stats, candidate-pair ``currentRoundTripTime``
  (transport stats are packet/byte counts, ICE role and DTLS state).

So the round-trip time is known only while this end sends audio and the other end sends receiver reports — the
gateway always sends its playout track, and browsers send receiver reports.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiortc import RTCPeerConnection
from aiortc.stats import RTCInboundRtpStreamStats, RTCRemoteInboundRtpStreamStats


@dataclass
class PeerStats:
    """Inbound audio of one peer connection, summed over its inbound audio streams, since it started.

    ``packets_received``/``packets_lost``: from ``inbound-rtp`` (each stream's loss counted as at least 0);
    ``jitter_s``: the largest ``inbound-rtp`` jitter, in seconds, None before any audio arrived;
    ``rtt_s``: the largest ``remote-inbound-rtp`` round-trip time of the outbound audio, None until measured.
    """

    packets_received: int
    packets_lost: int
    jitter_s: float | None
    rtt_s: float | None

    @property
    def loss_ratio(self) -> float:
        """Lost packets as a fraction of the packets sent (received + lost); 0 when there were none."""
        expected = self.packets_received + self.packets_lost
        return self.packets_lost / expected if expected else 0.0


async def sample(pc: RTCPeerConnection) -> PeerStats:
    """The inbound audio quality of ``pc`` now, from the same reports ``pc.getStats()`` merges.

    The reports are read per audio transceiver (``pc.getStats()`` is the union of every sender's and receiver's
    ``getStats()``) because converting jitter to seconds needs the clock rate of the codec negotiated on that
    transceiver, which no stats report carries.
    """
    received = lost = 0
    jitters: list[float] = []
    rtts: list[float] = []
    for transceiver in pc.getTransceivers():
        if transceiver.kind != "audio":
            continue
        codecs = transceiver._codecs  # negotiated, first = the one sent; aiortc exposes no public accessor
        for stats in (await transceiver.receiver.getStats()).values():
            if isinstance(stats, RTCInboundRtpStreamStats) and codecs:
                received += stats.packetsReceived
                lost += max(stats.packetsLost, 0)
                jitters.append(stats.jitter / codecs[0].clockRate)
        for stats in (await transceiver.sender.getStats()).values():
            if isinstance(stats, RTCRemoteInboundRtpStreamStats) and stats.roundTripTime is not None:
                rtts.append(stats.roundTripTime)
    return PeerStats(received, lost, max(jitters, default=None), max(rtts, default=None))
