"""Scale-out on loopback: one gateway, two ``microturn worker`` processes, real Redis, browser-like aiortc peers.

Sessions spread over both workers; when a worker is SIGKILLed or drained, its sessions go on on the other one with
the model's context intact (the tally model's captions match a replay of the Redis log), and the browser side sees
no reconnect, only a gap in the captions.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import aiohttp
import pytest
import redis.asyncio as aioredis

from microturn.bench_failover import voice
from microturn.client import ProbeClient
from microturn.local import free_port, serve, worker
from tests.conftest import scrape_metrics
from tests.test_resume import caption_digests, expected_digests
from webrtc_gateway.store import worker_key

pytestmark = pytest.mark.slow


@dataclass
class Cluster:
    url: str
    gateway: subprocess.Popen[bytes]
    workers: dict[str, subprocess.Popen[bytes]]  # worker id → process

    def stop(self) -> None:
        for proc in (self.gateway, *self.workers.values()):
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def cluster(redis_url: str) -> Iterator[Cluster]:
    ports = {"wk-a": free_port(), "wk-b": free_port()}
    workers = {wid: worker(port, "--model", "tally", "--worker-token", "t0k", "--drain-timeout", "10",
                           worker_id=wid) for wid, port in ports.items()}
    urls = ",".join(f"ws://127.0.0.1:{port}/v1/worker" for port in ports.values())
    port = free_port()
    gateway = serve(port, "--redis", redis_url, "--workers", urls, "--worker-token", "t0k")
    c = Cluster(f"http://127.0.0.1:{port}", gateway, workers)
    yield c
    c.stop()


async def run_sessions(cluster: Cluster, redis_url: str, seconds: float, n: int,
                       during: Callable[[dict[str, str]], Awaitable[None]]) -> tuple[list[ProbeClient], dict[str, str]]:
    """Stream ``n`` sessions for ``seconds``; after 2 s, call ``during`` with each session's worker."""
    await wait_ready(cluster.url)
    clients = [ProbeClient(cluster.url, voice(seconds), stall_s=30.0) for _ in range(n)]
    raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        for c in clients:
            await c.connect()
        await asyncio.sleep(2.0)
        placed = {c.session_id: await raw.get(worker_key(c.session_id)) for c in clients}
        await during(placed)
        await asyncio.sleep(max(0.0, seconds - clients[0].now()))
        after = {c.session_id: await raw.get(worker_key(c.session_id)) for c in clients}
    finally:
        for c in clients:
            await c.close(delete=False)
        await raw.aclose()
    return clients, {**{f"before:{k}": v for k, v in placed.items()}, **after}


async def wait_ready(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            async with http.get(f"{url}/readyz") as resp:
                if resp.status == 200:
                    return
            await asyncio.sleep(0.1)
    raise AssertionError("the gateway never saw a worker")


async def check_context_intact(client: ProbeClient, redis_url: str) -> None:
    got = caption_digests(client)
    assert len(got) == len(client.captions())  # no caption twice
    expected = await expected_digests(redis_url, client.session_id)
    assert {t: expected[t] for t in got} == got


async def test_sigkill_a_worker_and_its_sessions_go_on_on_the_other(cluster: Cluster, redis_url: str) -> None:
    victims: list[str] = []

    async def kill(placed: dict[str, str]) -> None:
        assert set(placed.values()) == {"wk-a", "wk-b"}  # sessions spread over both workers
        victims.append(next(iter(placed.values())))
        cluster.workers[victims[0]].send_signal(signal.SIGKILL)

    clients, placed = await run_sessions(cluster, redis_url, 9.0, 4, kill)
    survivor = ({"wk-a", "wk-b"} - set(victims)).pop()
    moved = [c for c in clients if placed[f"before:{c.session_id}"] == victims[0]]
    assert moved
    for c in clients:
        assert c.resumes == 0 and not c.errors, c.errors  # the browser side never reconnected
        assert placed[c.session_id] == survivor
        turns = sorted(caption_digests(c))
        assert turns[-1] >= 35  # captions went on to the end (9 s = 45 micro-turns)
        await check_context_intact(c, redis_url)
    gaps = [c.longest_caption_gap() for c in moved]
    assert all(gap < 2.0 for gap in gaps), gaps  # a gap the browser side can report (seen: about 0.25 s), no more
    m = await scrape_metrics(cluster.url)
    assert m["microturn_worker_reassignments_total"] == len(moved)
    assert m["microturn_workers{state=up}"] == 1


async def test_drain_a_worker_and_no_session_is_lost(cluster: Cluster, redis_url: str) -> None:
    drained: list[str] = []

    async def drain(placed: dict[str, str]) -> None:
        drained.append(next(iter(placed.values())))
        cluster.workers[drained[0]].send_signal(signal.SIGTERM)

    clients, placed = await run_sessions(cluster, redis_url, 8.0, 4, drain)
    assert cluster.workers[drained[0]].wait(10) == 0  # it exited once its sessions had moved
    for c in clients:
        assert c.resumes == 0 and not c.errors, c.errors
        assert placed[c.session_id] != drained[0]
        turns = sorted(caption_digests(c))
        assert turns == list(range(turns[0], turns[-1] + 1))  # a drain loses no micro-turn at all
        assert turns[-1] >= 30
        await check_context_intact(c, redis_url)
    m = await scrape_metrics(cluster.url)
    assert m["microturn_worker_reassignments_total"] >= 1
    assert m["microturn_turns_not_stepped_total"] == 0
