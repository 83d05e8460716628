"""``microturn bench failover``: kill the gateway that owns a live session, again and again, and count the damage.

A real ``redis-server`` (started here, on loopback) and two gateway processes with the ``tally`` model share the
session state. Each trial connects one browser-like client to the gateway that is up, lets it talk for a while,
SIGKILLs that gateway, and lets the client resume on the other one; the killed gateway is then restarted for the
next trial. Counted per trial, against the conversation log in Redis:

- ``lost_events``: captions the log holds (the model produced them) that never reached the client;
- ``duplicate_events``: captions that reached the client more than once;
- ``resume_gap_ms``: from the last audio frame before the kill to the first one after the resume.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any

import numpy as np

from microturn.client import RATE, ProbeClient
from microturn.local import free_port, serve, stop
from webrtc_gateway.ice import use_host_addresses
from webrtc_gateway.store import RedisSessionStore

SECRET = "bench-failover-secret"


def _gateway(redis_url: str, port: int, name: str) -> subprocess.Popen[bytes]:
    return serve(port, "--model", "tally", "--redis", redis_url, "--token-secret", SECRET, gateway_id=name)


def voice(seconds: float) -> np.ndarray:
    """A tone that switches on and off at an uneven rhythm, so that micro-turn levels differ."""
    t = np.arange(int(seconds * RATE)) / RATE
    gate = (np.sin(2 * np.pi * 0.7 * t) + np.sin(2 * np.pi * 1.9 * t) > 0).astype(np.float32)
    return (0.3 * gate * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


async def _trial(redis_url: str, urls: list[str], victim: subprocess.Popen[bytes], talk_s: float,
                 after_s: float) -> dict[str, Any]:
    client = ProbeClient(urls[0], voice(talk_s + after_s + 1), fallback_urls=(urls[1],))
    try:
        await client.connect()
        await asyncio.sleep(max(0.0, talk_s - client.now()))
        victim.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not client.resume_gaps and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(after_s)
    finally:
        await client.close(delete=False)
    store = RedisSessionStore(redis_url)
    try:
        logged = {turn for turn, _ in (await store.history(client.session_id))[0]}
        produced = {m["turn"] for m in await store.messages_after(client.session_id, -1) if m["type"] == "caption"}
        await store.delete(client.session_id)
    finally:
        await store.close()
    seen = Counter(c["turn"] for c in client.captions())
    return {
        "resumed": client.resumes >= 1,
        "gap_ms": client.resume_gaps[0] * 1000 if client.resume_gaps else None,
        "lost": len(produced - set(seen)),
        "duplicates": sum(n - 1 for n in seen.values() if n > 1),
        "logged": len(logged),
        "errors": client.errors,
    }


def bench_failover(trials: int = 20, talk_s: float = 2.0, after_s: float = 1.0) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-able result."""
    if shutil.which("redis-server") is None:
        raise RuntimeError("bench failover needs redis-server on PATH")
    use_host_addresses(["127.0.0.1"])
    workdir = tempfile.mkdtemp(prefix="microturn-failover-")
    redis_port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", workdir],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    ports = [free_port(), free_port()]
    procs: list[subprocess.Popen[bytes]] = []
    results = []
    try:
        procs = [_gateway(redis_url, ports[i], f"gw-{i}") for i in range(2)]
        for trial in range(trials):
            owner = trial % 2
            urls = [f"http://127.0.0.1:{ports[owner]}", f"http://127.0.0.1:{ports[1 - owner]}"]
            result = asyncio.run(_trial(redis_url, urls, procs[owner], talk_s, after_s))
            results.append(result)
            print(f"failover: trial {trial + 1}/{trials}: resumed={result['resumed']} "
                  f"gap={result['gap_ms']} lost={result['lost']} dup={result['duplicates']}",
                  file=sys.stderr, flush=True)
            procs[owner].wait(10)
            procs[owner] = _gateway(redis_url, ports[owner], f"gw-{owner}")
    finally:
        stop(*procs, redis)
        shutil.rmtree(workdir, ignore_errors=True)
    gaps = np.array([r["gap_ms"] for r in results if r["gap_ms"] is not None])
    return {
        "trials": trials,
        "resumed": sum(r["resumed"] for r in results),
        "lost_events": sum(r["lost"] for r in results),
        "duplicate_events": sum(r["duplicates"] for r in results),
        "resume_gap_ms": {"p50": round(float(np.percentile(gaps, 50)), 1) if gaps.size else None,
                          "p99": round(float(np.percentile(gaps, 99)), 1) if gaps.size else None},
        "errors": [e for r in results for e in r["errors"]],
    }
