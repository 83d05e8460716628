"""webrtc_gateway.peer_stats: two real aiortc peer connections on loopback, one of them impaired on purpose."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import aioice.ice
import av
import numpy as np
import pytest
from aiortc import RTCPeerConnection
from aiortc.mediastreams import AudioStreamTrack, MediaStreamTrack

from webrtc_gateway.ice import use_host_addresses
from webrtc_gateway.peer_stats import PeerStats, sample

SendRtp = Callable[[bytes], Awaitable[None]]


class Tone(AudioStreamTrack):
    """A 440 Hz tone in real-time 20 ms frames (aiortc's silent track, paced the same way, with a tone in it)."""

    async def recv(self) -> av.AudioFrame:
        frame = await super().recv()
        assert isinstance(frame, av.AudioFrame) and frame.pts is not None
        t = (frame.pts + np.arange(frame.samples)) / frame.sample_rate
        frame.planes[0].update((np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16).tobytes())
        return frame


@dataclass
class Call:
    """A "browser" that sends a tone to a "gateway" that answers and sends a tone back (as its playout does)."""

    browser: RTCPeerConnection
    gateway: RTCPeerConnection

    def impair_browser_uplink(self, send: Callable[[SendRtp, bytes], Awaitable[None]]) -> None:
        """Pass every RTP (not RTCP) packet the browser sends through ``send(original_send, packet)``."""
        transport = self.browser.getSenders()[0].transport
        original: SendRtp = transport._send_rtp

        async def impaired(data: bytes) -> None:
            if 192 <= data[1] <= 223:  # RTCP (RFC 5761 demultiplexing)
                await original(data)
            else:
                await send(original, data)

        transport._send_rtp = impaired  # type: ignore[method-assign]


@pytest.fixture
def loopback_ice() -> Iterator[None]:
    before = aioice.ice.get_host_addresses
    use_host_addresses(["127.0.0.1"])
    yield
    aioice.ice.get_host_addresses = before


async def drain(track: MediaStreamTrack) -> None:
    with contextlib.suppress(Exception):
        while True:
            await track.recv()


@pytest.fixture
async def call(loopback_ice: None) -> AsyncIterator[Call]:
    browser, gateway = RTCPeerConnection(), RTCPeerConnection()
    drains: list[asyncio.Task[None]] = []
    gateway.on("track", lambda track: drains.append(asyncio.ensure_future(drain(track))))
    browser.on("track", lambda track: drains.append(asyncio.ensure_future(drain(track))))
    browser.addTrack(Tone())
    await browser.setLocalDescription(await browser.createOffer())
    await gateway.setRemoteDescription(browser.localDescription)
    gateway.addTrack(Tone())
    await gateway.setLocalDescription(await gateway.createAnswer())
    await browser.setRemoteDescription(gateway.localDescription)
    async with asyncio.timeout(10):
        while gateway.connectionState != "connected" or browser.connectionState != "connected":
            await asyncio.sleep(0.05)
    yield Call(browser, gateway)
    await browser.close()
    await gateway.close()
    for task in drains:
        task.cancel()


async def settle(pc: RTCPeerConnection) -> PeerStats:
    """Wait until audio flows, then sample."""
    async with asyncio.timeout(5):
        while (stats := await sample(pc)).packets_received < 5:
            await asyncio.sleep(0.05)
    return stats


def test_loss_ratio() -> None:
    assert PeerStats(0, 0, None, None).loss_ratio == 0.0
    assert PeerStats(100, 0, 0.0, None).loss_ratio == 0.0
    assert PeerStats(90, 10, 0.001, 0.02).loss_ratio == pytest.approx(0.1)
    assert PeerStats(0, 3, None, None).loss_ratio == 1.0


async def test_a_fresh_connection_has_nothing_to_report() -> None:
    pc = RTCPeerConnection()
    pc.addTrack(Tone())
    assert await sample(pc) == PeerStats(0, 0, None, None)
    await pc.close()


@pytest.mark.slow
async def test_clean_loopback_call(call: Call) -> None:
    sent = 0

    async def counted(send: SendRtp, data: bytes) -> None:
        nonlocal sent
        sent += 1
        await send(data)

    call.impair_browser_uplink(counted)
    first = await settle(call.gateway)
    sent_first, start = sent, time.monotonic()
    async with asyncio.timeout(10):  # the RTT needs a receiver report that echoes the latest sender report
        while (last := await sample(call.gateway)).rtt_s is None or time.monotonic() - start < 2:
            await asyncio.sleep(0.1)
    # every packet the browser sent in the window was counted, give or take those in flight at its ends (up to
    # 100 ms of them on a busy machine). A rate in packets per second would measure how busy the machine is.
    assert sent - sent_first >= 50
    assert abs((last.packets_received - first.packets_received) - (sent - sent_first)) <= 5
    assert last.packets_lost == 0 and last.loss_ratio == 0.0
    assert last.jitter_s is not None and 0 <= last.jitter_s < 0.02
    assert last.rtt_s is not None and 0 < last.rtt_s < 0.2


@pytest.mark.slow
async def test_loss_matches_the_dropped_fraction(call: Call) -> None:
    rng = random.Random(7)
    counts = {"sent": 0, "dropped": 0}

    async def lossy(send: SendRtp, data: bytes) -> None:
        counts["sent"] += 1
        if rng.random() < 0.2:
            counts["dropped"] += 1
            return
        await send(data)

    before = await settle(call.gateway)
    call.impair_browser_uplink(lossy)
    await asyncio.sleep(2.5)
    after = await sample(call.gateway)
    lossy_part = PeerStats(after.packets_received - before.packets_received, after.packets_lost - before.packets_lost,
                           after.jitter_s, after.rtt_s)
    assert counts["sent"] > 100 and before.packets_lost == 0
    assert lossy_part.loss_ratio == pytest.approx(counts["dropped"] / counts["sent"], abs=0.02)
    assert after.loss_ratio == pytest.approx(0.2, abs=0.1)


@pytest.mark.slow
async def test_jitter_is_in_seconds(call: Call) -> None:
    """Every other packet 10 ms late makes each transit time differ from the last by 10 ms: jitter → 10 ms."""
    loop = asyncio.get_running_loop()
    delayed: list[asyncio.Future[None]] = []
    odd = False

    async def late(send: SendRtp, data: bytes) -> None:
        nonlocal odd
        odd = not odd
        if odd:
            loop.call_later(0.01, lambda: delayed.append(asyncio.ensure_future(send(data))))
        else:
            await send(data)

    await settle(call.gateway)
    call.impair_browser_uplink(late)
    await asyncio.sleep(2.0)  # RFC 3550's estimate moves 1/16 of the way per packet: ~100 packets converge
    stats = await sample(call.gateway)
    assert stats.jitter_s is not None and 0.007 < stats.jitter_s < 0.02
