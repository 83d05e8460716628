"""A fleet of gateways behind one load balancer: a session call that lands on a gateway other than the one holding
the session is passed on to it (two real gateway processes, real Redis, a real aiortc peer)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import numpy as np
import pytest

from microturn.bench_gateway import clicks, returned_at
from microturn.client import ProbeClient
from microturn.local import serve, stop
from tests.conftest import free_port
from webrtc_gateway.forward import FORWARDED_BY

SECRET = "fleet-test-secret"
MICRO_TURN_S = 0.2


@dataclass
class Gateway:
    url: str
    proc: subprocess.Popen[bytes]


def start(redis_url: str, gateway_id: str, advertise: bool = True) -> Gateway:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serve(port, "--model", "echo", "--redis", redis_url, "--token-secret", SECRET,
                 *(["--advertise-url", url] if advertise else []), gateway_id=gateway_id)
    return Gateway(url, proc)


@pytest.fixture
def fleet(redis_url: str) -> Iterator[tuple[Gateway, Gateway]]:
    pair = (start(redis_url, "gw-a"), start(redis_url, "gw-b"))
    yield pair
    stop(*(g.proc for g in pair))


class OfferElsewhere(ProbeClient):
    """Creates its session on one gateway and sends the offer (and every later call) to another, as a load
    balancer may."""

    def __init__(self, create_url: str, other_url: str, signal: np.ndarray) -> None:
        super().__init__(create_url, signal)
        self.other_url = other_url

    async def _negotiate(self) -> None:
        self.base_url = self.other_url
        await super()._negotiate()


async def test_a_call_that_lands_elsewhere_reaches_the_gateway_holding_the_session(
        fleet: tuple[Gateway, Gateway], redis_url: str) -> None:
    a, b = fleet
    times = [0.5 + 0.43 * i for i in range(6)]
    client = OfferElsewhere(a.url, b.url, clicks(3.5, times))
    try:
        await client.connect()  # created on A, offered to B: B passes the offer on to A
        await asyncio.sleep(max(0.0, 3.5 - client.now()))
        out = client.output(3.5)
        state = await client.state()  # asked of B
    finally:
        await client.close()  # DELETE, sent to B
    assert state["state"] == "connected" and state["micro_turns"] >= 15
    delays = [returned_at(out, t) for t in times]
    overhead = np.array([d - t - MICRO_TURN_S for d, t in zip(delays, times, strict=True) if d is not None])
    assert overhead.size == len(times) and np.all((overhead >= 0) & (overhead < 0.08)), overhead
    auth = {"Authorization": f"Bearer {client.token}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{a.url}/metrics") as resp:
            assert "microturn_sessions{state=\"live\"} 0.0" in await resp.text()  # B's DELETE ended it on A
        async with http.post(f"{a.url}/v1/sessions", json={}) as resp:
            grant = await resp.json()
        sid, auth = grant["session_id"], {"Authorization": f"Bearer {grant['token']}"}
        async with http.get(f"{b.url}/v1/sessions/{sid}", headers=auth) as resp:
            assert resp.status == 200 and (await resp.json())["state"] == "new"
        # a call passed on once is answered where it lands: B does not hold it
        async with http.get(f"{b.url}/v1/sessions/{sid}", headers={**auth, FORWARDED_BY: "gw-x"}) as resp:
            assert resp.status == 404
        c = start(redis_url, "gw-c", advertise=False)  # a gateway that does not take part answers for itself
        try:
            async with http.get(f"{c.url}/v1/sessions/{sid}", headers=auth) as resp:
                assert resp.status == 404
        finally:
            c.proc.terminate()
            c.proc.wait(10)
        a.proc.kill()  # A crashes (a shut-down gateway ends its sessions that never connected: those are gone)
        await asyncio.to_thread(a.proc.wait, 15)
        async with http.get(f"{b.url}/v1/sessions/{sid}", headers=auth) as resp:
            assert resp.status == 503 and (await resp.json())["error"]["code"] == "owner_unavailable"
