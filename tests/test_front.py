"""``microturn serve --processes N``: a front on one port, N real gateway processes behind it, real WebRTC peers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import aiohttp
import numpy as np
import pytest

from microturn.bench_gateway import clicks, returned_at
from microturn.client import ProbeClient
from microturn.config import Settings
from microturn.local import serve
from tests.conftest import drains_on_sigterm, free_port, scrape_metrics
from webrtc_gateway.front import BACKOFF_MAX_S, STABLE_S, GatewayProcess, merge_metrics
from webrtc_gateway.routing import new_session_id, process_of

MICRO_TURN_S = 0.2


def test_a_session_id_names_the_process_that_made_it() -> None:
    for processes in (1, 2, 3, 8):
        for index in range(processes):
            for _ in range(20):
                sid = new_session_id(index, processes)
                assert len(sid) == 32 and int(sid, 16) >= 0
                assert process_of(sid, processes) == index
    with pytest.raises(ValueError):
        new_session_id(2, 2)


def test_ids_spread_evenly_over_the_processes() -> None:
    counts = np.bincount([process_of(os.urandom(16).hex(), 4) for _ in range(8000)], minlength=4)
    assert counts.min() > 1700 and counts.max() < 2300, counts
    assert process_of("not-a-hex-id", 3) in range(3)  # any string goes somewhere, and gets that process's answer


def test_metrics_of_the_processes_merge_with_a_process_label() -> None:
    def text(late: int, bucket: int) -> str:
        return ("# HELP microturn_late_micro_turns_total Late\n# TYPE microturn_late_micro_turns_total counter\n"
                f"microturn_late_micro_turns_total {late}\n"
                "# HELP microturn_micro_turn_seconds Turn\n# TYPE microturn_micro_turn_seconds histogram\n"
                f'microturn_micro_turn_seconds_bucket{{le="0.1"}} {bucket}\n'
                f'microturn_micro_turn_seconds_bucket{{le="+Inf"}} {bucket}\n'
                f"microturn_micro_turn_seconds_count {bucket}\nmicroturn_micro_turn_seconds_sum 0.5\n")

    families = {f.name: f for f in merge_metrics({0: text(3, 10), 1: text(4, 20)})}
    late = families["microturn_late_micro_turns"]
    assert late.type == "counter"
    assert {(s.labels["process"], s.value) for s in late.samples} == {("0", 3.0), ("1", 4.0)}
    buckets = [s for s in families["microturn_micro_turn_seconds"].samples if s.name.endswith("_bucket")]
    assert {(s.labels["process"], s.labels["le"], s.value) for s in buckets} == {
        ("0", "0.1", 10.0), ("0", "+Inf", 10.0), ("1", "0.1", 20.0), ("1", "+Inf", 20.0)}


@pytest.fixture
async def front() -> AsyncIterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    proc = await asyncio.to_thread(serve, port, "--model", "echo", "--processes", "2", "--drain-timeout", "2")
    yield f"http://127.0.0.1:{port}", proc
    if proc.poll() is None:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 15)


def gateway_processes(front_pid: int) -> list[int]:
    """The pids of a front's gateway processes (multiprocessing's resource tracker left out)."""
    children = Path(f"/proc/{front_pid}/task/{front_pid}/children").read_text().split()
    return [int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


async def test_sessions_spread_over_the_processes_and_each_call_reaches_its_own(
        front: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, _ = front
    async with aiohttp.ClientSession() as http:
        grants = []
        for _ in range(4):
            async with http.post(f"{url}/v1/sessions", json={}) as resp:
                assert resp.status == 201
                grants.append(await resp.json())
        assert sorted(process_of(g["session_id"], 2) for g in grants) == [0, 0, 1, 1]  # the least loaded takes it
        seen = await scrape_metrics(url)
        for index in ("0", "1"):
            assert seen[f"microturn_sessions{{process={index},state=new}}"] == 2
        for g in grants:  # the process that made a session answers for it (the other one does not know it)
            auth = {"Authorization": f"Bearer {g['token']}"}
            async with http.get(f"{url}/v1/sessions/{g['session_id']}", headers=auth) as resp:
                assert resp.status == 200 and (await resp.json())["state"] == "new"
        first = grants[0]
        async with http.post(f"{url}/v1/sessions/{first['session_id']}/resume", json={"last_turn": -1},
                             headers={"Authorization": f"Bearer {first['resume_token']}"}) as resp:
            assert resp.status == 200, await resp.text()  # in-memory state: only its own process can resume it
        async with http.delete(f"{url}/v1/sessions/{grants[1]['session_id']}",
                               headers={"Authorization": f"Bearer {grants[1]['token']}"}) as resp:
            assert resp.status == 200 and (await resp.json())["state"] == "closed"
        # bad input gets the same clear errors as from one process
        async with http.get(f"{url}/v1/sessions/{'0' * 32}", headers={"Authorization": "Bearer forged"}) as resp:
            assert resp.status == 401 and (await resp.json())["error"]["code"] == "token_invalid"
        for size in (40_000, 70_000):  # larger than the process reads, and than the front reads
            async with http.post(f"{url}/v1/sessions/{grants[2]['session_id']}/offer", data=b"x" * size,
                                 headers={"Authorization": f"Bearer {grants[2]['token']}"}) as resp:
                assert resp.status == 413 and (await resp.json())["error"]["code"] == "too_large"
        async with http.get(f"{url}/readyz") as resp:
            assert resp.status == 200 and (await resp.json())["processes"] == ["ready", "ready"]
        async with http.get(f"{url}/") as resp:
            assert resp.status == 200 and "microturn" in await resp.text()


async def test_echo_round_trips_on_both_processes_and_their_counters_add_up(
        front: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, _ = front
    times = [0.5 + 0.43 * i for i in range(6)]
    clients = [ProbeClient(url, clicks(3.5, times)) for _ in range(2)]
    try:
        for client in clients:  # one after the other: the second goes to the process the first did not
            await client.connect()
        await asyncio.sleep(max(0.0, 3.5 - min(c.now() for c in clients)))
        outs = [client.output(3.5) for client in clients]
        states = [await client.state() for client in clients]
    finally:
        for client in clients:
            await client.close()
    assert {process_of(c.session_id, 2) for c in clients} == {0, 1}
    for out in outs:
        delays = [returned_at(out, t) for t in times]
        overhead = np.array([d - t - MICRO_TURN_S for d, t in zip(delays, times, strict=True) if d is not None])
        assert overhead.size == len(times) and np.all((overhead >= 0) & (overhead < 0.08)), overhead
    seen = await scrape_metrics(url)
    per_process = [seen[f"microturn_micro_turns_total{{process={i}}}"] for i in ("0", "1")]
    assert all(n >= 15 for n in per_process), per_process  # each process counted its own session's micro-turns
    assert sum(per_process) >= sum(s["micro_turns"] for s in states)


async def test_a_process_that_dies_is_started_again(front: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, proc = front
    pids = gateway_processes(proc.pid)
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    async with aiohttp.ClientSession() as http:
        for _ in range(150):
            await asyncio.sleep(0.2)
            async with http.get(f"{url}/readyz") as resp:
                ready = (await resp.json())["processes"] == ["ready", "ready"]
            if ready and len(gateway_processes(proc.pid)) == 2:
                break
        else:
            raise AssertionError("the killed gateway process was not started again")
        assert (await scrape_metrics(url))["microturn_gateway_process_restarts_total"] == 1
        made = set()
        for _ in range(6):  # sessions on both processes, the new one included, work
            async with http.post(f"{url}/v1/sessions", json={}) as resp:
                grant = await resp.json()
            async with http.get(f"{url}/v1/sessions/{grant['session_id']}",
                                headers={"Authorization": f"Bearer {grant['token']}"}) as resp:
                assert resp.status == 200
            made.add(process_of(grant["session_id"], 2))
        assert made == {0, 1}
    assert set(gateway_processes(proc.pid)) != set(pids)


def test_a_process_that_keeps_exiting_soon_after_its_start_waits_longer_each_time() -> None:
    p = GatewayProcess(0, Settings(), "unused.sock", cast(aiohttp.ClientSession, None))  # never started: exited
    waits, now = [], 1000.0
    for _ in range(7):
        p.started_at, p.restart_at = now, None  # what start() records
        now += 5.0  # it exits 5 s after its start
        assert not p.due_restart(now)  # not at once
        waited = 0.0
        while not p.due_restart(now + waited):
            waited += 0.5
        waits.append(waited)
        now += waited
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, BACKOFF_MAX_S, BACKOFF_MAX_S]
    p.started_at, p.restart_at = now, None
    assert p.due_restart(now + STABLE_S) and p.quick_exits == 0  # after a long run: at once, and the count starts over


async def test_sigterm_drains_every_process_then_the_front_exits(
        front: tuple[str, subprocess.Popen[bytes]]) -> None:
    await drains_on_sigterm(*front)  # the live session's calls go on through the front while its process drains
