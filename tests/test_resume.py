"""Resume: a session survives its gateway, with the model's context intact (two gateway processes, real Redis)."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from inference.tally import TallyModel
from microturn.bench_failover import voice
from microturn.client import ProbeClient
from microturn.local import serve, stop
from tests.conftest import free_port
from webrtc_gateway.store import RedisSessionStore, record_key
from webrtc_gateway.tokens import TokenSigner

SECRET = "shared-test-secret"


@dataclass
class Gateway:
    url: str
    gateway_id: str
    proc: subprocess.Popen[bytes]


def start_gateway(redis_url: str, gateway_id: str, *extra: str) -> Gateway:
    port = free_port()
    proc = serve(port, "--model", "tally", "--redis", redis_url, "--token-secret", SECRET, *extra,
                 gateway_id=gateway_id)
    return Gateway(f"http://127.0.0.1:{port}", gateway_id, proc)


@pytest.fixture
def gateways(redis_url: str) -> Iterator[tuple[Gateway, Gateway]]:
    pair = (start_gateway(redis_url, "gw-a"), start_gateway(redis_url, "gw-b"))
    yield pair
    stop(*(g.proc for g in pair))


async def expected_digests(redis_url: str, session_id: str) -> dict[int, str]:
    """Replay the Redis log through a fresh tally model: the caption every micro-turn should have had."""
    store = RedisSessionStore(redis_url)
    try:
        record = await store.get(session_id)
        history, _ = await store.history(session_id)
    finally:
        await store.close()
    assert record is not None
    model = TallyModel()
    digests = {}
    for i, (turn, _) in enumerate(history):
        model.restore(session_id, record.seed, [context for _, context in history[: i + 1]])
        digests[turn] = model.digests[session_id].hex()
    return digests


def caption_digests(client: ProbeClient) -> dict[int, str]:
    return {c["turn"]: c["text"].split()[1] for c in client.captions()}


async def test_sigkill_the_owner_and_the_session_goes_on_elsewhere(
        gateways: tuple[Gateway, Gateway], redis_url: str) -> None:
    first, second = gateways
    client = ProbeClient(first.url, voice(9.0), fallback_urls=(second.url,))
    raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        await client.connect()
        await asyncio.sleep(max(0.0, 3.5 - client.now()))
        first.proc.send_signal(signal.SIGKILL)
        await asyncio.sleep(max(0.0, 9.0 - client.now()))
        owner = await raw.hget(record_key(client.session_id), "owner")
        history_len = await raw.xlen(f"microturn:{{{client.session_id}}}:log")
    finally:
        await client.close(delete=False)
        await raw.aclose()
    assert client.resumes == 1, client.errors
    assert client.resume_gaps[0] < 2.0
    assert owner == "gw-b"
    turns = sorted(caption_digests(client))
    assert len(turns) == len(client.captions())  # no caption twice
    before = [t for t in turns if t <= 17]
    assert before == list(range(len(before)))  # every micro-turn before the crash reached the browser
    after = [t for t in turns if t > before[-1]]
    assert after == list(range(after[0], after[0] + len(after)))  # and every one after the resume
    assert 0 < after[0] - before[-1] <= 12  # the gap: at most the resume time, as silent micro-turns
    assert history_len >= after[-1]  # gap micro-turns are logged too
    # The model's context went on exactly: every caption, before and after, matches a replay of the log.
    expected = await expected_digests(redis_url, client.session_id)
    got = caption_digests(client)
    assert {t: expected[t] for t in got} == got


async def test_resume_tokens_rotate_and_bad_ones_are_refused(gateways: tuple[Gateway, Gateway]) -> None:
    first, second = gateways
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{first.url}/v1/sessions", json={}) as resp:
            grant = await resp.json()
        sid, resume_token = grant["session_id"], grant["resume_token"]
        signer = TokenSigner(SECRET)

        async def resume(url: str, token: str, session: str = sid) -> tuple[int, dict]:
            async with http.post(f"{url}/v1/sessions/{session}/resume", json={"last_turn": -1},
                                 headers={"Authorization": f"Bearer {token}"}) as r:
                return r.status, dict(await r.json())

        assert (await resume(second.url, signer.issue(sid, "resume", -5)))[0] == 401  # expired
        assert (await resume(second.url, resume_token[:-3] + "abc"))[0] == 401  # forged
        assert (await resume(second.url, TokenSigner("other").issue(sid, "resume", 60)))[0] == 401
        assert (await resume(second.url, grant["token"]))[0] == 403  # a connect token is not a resume token
        other_sid = hashlib.sha1(b"x").hexdigest()
        assert (await resume(second.url, signer.issue(other_sid, "resume", 60)))[0] == 403  # another session's
        status, moved = await resume(second.url, resume_token)
        assert status == 200 and moved["resume_token"] != resume_token
        status, body = await resume(first.url, resume_token)  # replayed: it was rotated
        assert status == 401 and "already used" in body["error"]["message"]
        assert (await resume(first.url, moved["resume_token"]))[0] == 200


async def test_drain_moves_a_live_session_to_the_other_gateway(redis_url: str) -> None:
    first = start_gateway(redis_url, "gw-drain", "--drain-timeout", "1")
    second = start_gateway(redis_url, "gw-stay")
    client = ProbeClient(first.url, voice(6.0), fallback_urls=(second.url,), stall_s=2.0)
    try:
        await client.connect()
        await asyncio.sleep(1.5)
        first.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(max(0.0, 6.0 - client.now()))
        state = await client.state()
    finally:
        await client.close(delete=False)
        for g in (first, second):
            if g.proc.poll() is None:
                g.proc.kill()
    assert client.resumes == 1, client.errors
    assert any(m["type"] == "reconnect" for _, m in client.received.messages)
    assert state["state"] == "connected" and client.base_url == second.url
    assert first.proc.wait(10) == 0


@pytest.fixture
async def aof_redis(tmp_path: Path) -> AsyncIterator[tuple[str, Path, int]]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    yield f"redis://127.0.0.1:{port}/0", tmp_path, port
    subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True)


def run_redis(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--appendonly", "yes",
                             "--appendfsync", "always", "--save", "", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    raise TimeoutError("redis did not start")


async def test_redis_restart_and_outage_lose_nothing(aof_redis: tuple[str, Path, int]) -> None:
    url, workdir, port = aof_redis
    redis_proc = run_redis(workdir, port)
    gateway = start_gateway(url, "gw-r")
    client = ProbeClient(gateway.url, voice(10.0))
    try:
        await client.connect()
        await asyncio.sleep(2.0)
        redis_proc.terminate()  # a clean restart: AOF keeps everything
        redis_proc.wait(10)
        async with aiohttp.ClientSession() as http, http.post(f"{gateway.url}/v1/sessions", json={}) as resp:
            assert resp.status == 503  # new sessions are refused while state is unavailable
            assert "unavailable" in (await resp.json())["error"]["message"]
        audio_before = client.audio_seconds()
        await asyncio.sleep(2.0)
        assert client.audio_seconds() - audio_before > 1.6  # media kept flowing without Redis
        redis_proc = run_redis(workdir, port)
        await asyncio.sleep(max(0.0, 10.0 - client.now()))
        store = RedisSessionStore(url)
        try:
            history, _ = await store.history(client.session_id)
        finally:
            await store.close()
        turns = [t for t, _ in history]
        assert turns == list(range(len(turns)))  # nothing lost, nothing twice
        assert len(turns) >= max(caption_digests(client)) - 1  # the log caught up
    finally:
        await client.close(delete=False)
        gateway.proc.terminate()
        gateway.proc.wait(10)
        redis_proc.terminate()
        redis_proc.wait(10)


def test_bench_failover_reports_every_field() -> None:
    from microturn.bench_failover import bench_failover

    result = bench_failover(trials=2, talk_s=1.5, after_s=0.5)
    assert result["trials"] == 2 and result["resumed"] == 2
    assert result["lost_events"] == 0 and result["duplicate_events"] == 0
    assert 0 < result["resume_gap_ms"]["p99"] < 2000
    assert result["errors"] == []
