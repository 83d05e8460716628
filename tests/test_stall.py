"""A gateway process that stalls mid-session (stopped by the host for 300 ms) recovers without keeping the stall as
latency, on the wire and in what a receiver plays."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from microturn.bench_gateway import MICRO_TURN_S, clicks, gateway_metrics, returned_at
from microturn.client import RATE, ProbeClient
from microturn.local import serve, stop
from tests.conftest import free_port
from webrtc_gateway.playout import FRAME_S, MAX_BEHIND

SECONDS = 14.0
STALL_AT, STALL_S = 5.0, 0.3


@pytest.fixture
def gateway() -> Iterator[tuple[str, int]]:
    port = free_port()
    proc = serve(port, "--model", "echo")
    yield f"http://127.0.0.1:{port}", proc.pid
    stop(proc)


def stall(pid: int, seconds: float) -> None:
    """Stop process ``pid`` for ``seconds``, as a host that takes its CPU away would (from a thread: the client
    goes on)."""
    os.kill(pid, signal.SIGSTOP)
    time.sleep(seconds)
    os.kill(pid, signal.SIGCONT)


@pytest.mark.slow
async def test_a_stalled_gateway_keeps_its_timestamps_and_wins_the_latency_back(gateway: tuple[str, int]) -> None:
    url, pid = gateway
    times = [0.8 + 0.45 * i for i in range(int((SECONDS - 1.5) / 0.45))]
    client = ProbeClient(url, clicks(SECONDS, times))
    try:
        await client.connect()
        while client.now() < STALL_AT:  # the microphone's clock (it starts with the first frame sent)
            await asyncio.sleep(0.05)
        stalled_at = client.now()
        stopper = threading.Thread(target=stall, args=(pid, STALL_S))
        stopper.start()
        await asyncio.sleep(max(0.0, SECONDS - client.now()))
        stopper.join()
        missed = gateway_metrics(url)["microturn_missed_slots_total"]
    finally:
        await client.close()
    # the gateway counted the slots its track missed (the stall less the two frames it may catch up)
    assert missed >= round(STALL_S / FRAME_S) - MAX_BEHIND - 1
    # how late each packet arrived against its RTP timestamp: the same before and after the stall, within what the
    # grid's phase tracking may move meanwhile (a sender that kept counting timestamps through the stall would have
    # stepped by all of it, and a receiver would keep that delay)
    start0 = client.mic.start or 0.0
    late = np.array([(arrival - start0, arrival - start0 - pts / RATE) for arrival, pts, _, _ in client.audio()])
    before = np.median(late[(late[:, 0] > 2) & (late[:, 0] < stalled_at - 0.5), 1])
    after = np.median(late[late[:, 0] > stalled_at + 3, 1])
    assert abs(after - before) < STALL_S / 3, f"arrival against timestamps moved by {after - before:.3f} s"
    # the echo: every click before the stall, and from when the latency it queued has been won back (2 s at most,
    # if late output recurred), comes back on time
    out = client.output(SECONDS)
    for t in times:
        if not stalled_at - 0.3 < t < stalled_at + STALL_S + 2.5:
            back = returned_at(out, t)
            assert back is not None, f"the click at {t:.2f} s did not come back"
            assert back - t - MICRO_TURN_S < 0.08, f"the click at {t:.2f} s came back {back - t:.3f} s later"
