"""Drain on SIGTERM, and API keys for creating sessions."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import numpy as np

from microturn.client import RATE, ProbeClient
from microturn.local import serve
from tests.conftest import free_port, loopback_settings, start_gateway


async def test_sigterm_drains_then_tells_live_sessions_to_move() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = await asyncio.to_thread(serve, port, "--drain-timeout", "2")
    client = ProbeClient(url, np.zeros(10 * RATE, np.float32))
    try:
        await client.connect()
        await asyncio.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/readyz") as resp:
                assert resp.status == 503
            async with http.post(f"{url}/v1/sessions", json={}) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"]
                assert (await resp.json())["error"]["code"] == "draining"
            async with http.get(f"{url}/livez") as resp:
                assert resp.status == 200
        assert (await client.state())["state"] == "connected"  # the live session goes on while draining
        await asyncio.sleep(2.5)
        moves = [m for _, m in client.received.messages if m["type"] == "reconnect"]
        assert len(moves) == 1 and "another" in moves[0]["reason"]
        assert await asyncio.to_thread(proc.wait, 15) == 0
    finally:
        await client.close(delete=False)
        if proc.poll() is None:
            proc.kill()


async def test_api_keys_guard_session_creation() -> None:
    server = await start_gateway(loopback_settings(api_keys=("k-live-1", "k-live-2")))
    base = str(server.make_url("")).rstrip("/")
    try:
        async with aiohttp.ClientSession() as http:
            for headers, status in [({}, 401), ({"Authorization": "Bearer wrong"}, 401),
                                    ({"Authorization": "Bearer k-live-2"}, 201)]:
                async with http.post(f"{base}/v1/sessions", json={}, headers=headers) as resp:
                    assert resp.status == status, headers
                    if status == 401:
                        assert "backend" in (await resp.json())["error"]["message"]
    finally:
        await server.close()
