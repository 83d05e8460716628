"""Session records in memory and in a real redis-server."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import redis.asyncio as aioredis

from microturn.client import RATE, ProbeClient
from microturn.contracts import SessionRecord
from tests.conftest import free_port, loopback_settings, start_gateway
from webrtc_gateway.store import MemorySessionStore, RedisSessionStore, StoreUnavailable, record_key


def record(sid: str = "abc") -> SessionRecord:
    return SessionRecord(session_id=sid, owner="gw-1", model="echo", created=1.0, last_seen=2.0, micro_turn=7,
                         state="connected", config={"voice": "x", "n": 3}, resume_hash="h1",
                         owner_url="http://10.0.0.1:8080")


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_put_get_delete(kind: str, redis_url: str) -> None:
    store = MemorySessionStore() if kind == "memory" else RedisSessionStore(redis_url, ttl_s=30)
    try:
        await store.put(record())
        assert await store.get("abc") == record()
        assert await store.get("missing") is None
        assert not await store.claim("abc", "wrong", "h2", "gw-2", "http://10.0.0.2:8080")
        assert await store.claim("abc", "h1", "h2", "gw-2", "http://10.0.0.2:8080")  # a resume moves it
        moved = await store.get("abc")
        assert moved is not None and (moved.owner, moved.owner_url, moved.resume_hash) == (
            "gw-2", "http://10.0.0.2:8080", "h2")
        await store.delete("abc")
        assert await store.get("abc") is None
    finally:
        await store.close()


async def test_redis_keys_share_a_hash_tag_and_expire(redis_url: str) -> None:
    store = RedisSessionStore(redis_url, ttl_s=30)
    raw = aioredis.Redis.from_url(redis_url)
    try:
        await store.put(record("s-42"))
        assert record_key("s-42") == "microturn:{s-42}:record"
        assert 0 < await raw.ttl(record_key("s-42")) <= 30
    finally:
        await store.close()
        await raw.aclose()


async def test_unreachable_redis_is_reported() -> None:
    store = RedisSessionStore("redis://127.0.0.1:1/0")
    with pytest.raises(StoreUnavailable):
        await store.put(record())
    await store.close()


async def test_gateway_keeps_its_session_records_in_redis(redis_url: str) -> None:
    server = await start_gateway(loopback_settings(redis=redis_url, gateway_id="gw-test"))
    raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
    base = str(server.make_url("")).rstrip("/")
    client = ProbeClient(base, np.zeros(2 * RATE, np.float32))
    try:
        await client.connect()
        await asyncio.sleep(0.3)
        stored = await raw.hgetall(record_key(client.session_id))
        assert stored["owner"] == "gw-test" and stored["state"] == "connected" and stored["model"] == "echo"
        await client.close()
        await asyncio.sleep(0.2)
        assert await raw.exists(record_key(client.session_id)) == 0  # a closed session is deleted
    finally:
        await raw.aclose()
        await server.close()


async def test_new_sessions_get_503_when_redis_is_down() -> None:
    server = await start_gateway(loopback_settings(redis="redis://127.0.0.1:1/0"))
    try:
        url = f"{str(server.make_url('')).rstrip('/')}/v1/sessions"
        async with aiohttp.ClientSession() as http, http.post(url, json={}) as resp:
            body = await resp.json()
            assert resp.status == 503
            assert body["error"]["code"] == "store_unavailable"
            assert resp.headers["Retry-After"]
    finally:
        await server.close()


async def test_redis_with_sentinel_finds_the_master(tmp_path: Path) -> None:
    """``redis+sentinel://`` asks a real sentinel which server is the master, and the store works through it."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    workdir = tmp_path
    master, sentinel = free_port(), free_port()
    conf = workdir / "sentinel.conf"
    conf.write_text(f"port {sentinel}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {master} 1\n")
    procs = [subprocess.Popen([binary, "--port", str(master), "--bind", "127.0.0.1", "--save", "", "--dir",
                               str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
             subprocess.Popen([binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for port in (master, sentinel):
            deadline = time.time() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    assert time.time() < deadline, f"redis on {port} did not start"
                    await asyncio.sleep(0.05)
        store = RedisSessionStore(f"redis+sentinel://127.0.0.1:{sentinel}/mymaster/0", ttl_s=30)
        try:
            await store.put(record("via-sentinel"))
            await store.set_worker("via-sentinel", "wk-9")
            assert await store.get("via-sentinel") == record("via-sentinel")
            assert await store.worker_of("via-sentinel") == "wk-9"
        finally:
            await store.close()
        direct = aioredis.Redis.from_url(f"redis://127.0.0.1:{master}/0")
        assert await direct.exists(record_key("via-sentinel")) == 1  # it really went to the master
        await direct.aclose()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(5)


def test_a_sentinel_url_without_a_master_name_is_refused() -> None:
    with pytest.raises(ValueError, match="name the master"):
        RedisSessionStore("redis+sentinel://127.0.0.1:26379")
