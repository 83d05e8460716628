"""Drain on SIGTERM, and API keys for creating sessions."""

from __future__ import annotations

import asyncio

import aiohttp

from microturn.local import serve
from tests.conftest import drains_on_sigterm, free_port, loopback_settings, start_gateway


async def test_sigterm_drains_then_tells_live_sessions_to_move() -> None:
    port = free_port()
    await drains_on_sigterm(f"http://127.0.0.1:{port}", await asyncio.to_thread(serve, port, "--drain-timeout", "2"))


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
