"""``microturn bench gateway``: many concurrent browser-like sessions against a real echo gateway.

The gateway runs as its own process (``microturn serve --model echo``, media on loopback); the load clients run in
``processes`` processes of their own, so client and server never share a GIL. Each session streams an impulse train
(1 ms clicks at random offsets within micro-turns, about two a second, each session starting at a random phase) and
records the echo. The added latency of one impulse is its measured round trip at the client minus the 200 ms that
micro-turn alignment costs by design (see :mod:`microturn.client` for how received audio is placed in time). Each
client's microphone is Opus-coded before the run, what comes back is decoded after it, and the load processes do not
collect garbage while media flows: the clients' time goes to the network, and the measurement is the gateway's.
Server counters come from its ``/metrics``; its CPU time (with ``--gateway-processes``, that of the front and
of all its processes) from ``/proc``. To tell a slow run's causes apart, the JSON also says where the impulses slower
than the 20-session bound were (at their session's start, the connect storm, or later, and in which seconds), how
many frame slots the gateway's tracks missed because a process stalled, and how much CPU time the host took from
this virtual machine meanwhile (steal).
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import random
import subprocess
import sys
import urllib.request
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from microturn.client import RATE, ProbeClient
from microturn.local import free_port, serve
from webrtc_gateway.ice import use_host_addresses

MICRO_TURN_S = 0.2
SLOW_MS = 100.0
"""An impulse later than this (the 20-session p99 bound) is slow; the JSON says when and where the slow ones were."""
START_S = 2.0
"""A slow impulse within this many seconds of its session's first sample counts as one of the connect storm."""


def clicks(seconds: float, times: list[float]) -> np.ndarray:
    """Silence with a 1 ms click at each of ``times`` (s), 48 kHz."""
    signal = np.zeros(int(seconds * RATE), np.float32)
    for t in times:
        i = int(t * RATE)
        signal[i:i + 48] = 0.8
    return signal


def impulse_train(seconds: float, rng: random.Random) -> tuple[np.ndarray, list[float]]:
    """Clicks about two a second at random offsets within micro-turns, and their times."""
    times, t = [], 0.6 + rng.uniform(0, 0.2)
    while t < seconds - 0.6:
        times.append(t)
        t += 0.5 + rng.uniform(0, 0.2)
    return clicks(seconds, times), times


def returned_at(out: np.ndarray, sent: float) -> float | None:
    """When the click sent at ``sent`` came back in ``out`` (searched 0.1–0.5 s later), or None if it did not."""
    lo, hi = int((sent + 0.1) * RATE), int((sent + 0.5) * RATE)
    window = np.abs(out[lo:hi])
    if window.size == 0 or window.max() < 0.2:
        return None
    return (lo + int(np.argmax(window))) / RATE


def measure(out: np.ndarray, times: list[float]) -> tuple[list[tuple[float, float]], int]:
    """(send time, added latency) in s of each returned impulse, and how many never came back."""
    back = [(t, returned_at(out, t)) for t in times]
    added = [(t, r - t - MICRO_TURN_S) for t, r in back if r is not None]
    return added, len(times) - len(added)


def slow_impulses(sessions: list[list[tuple[float, float]]]) -> dict[str, Any]:
    """Where the impulses slower than :data:`SLOW_MS` were: how many, how many in the first :data:`START_S` of
    their session (the connect storm) and after, in how many sessions, and in which seconds of the run."""
    slow = [(i, t) for i, added in enumerate(sessions) for t, a in added if a * 1000 > SLOW_MS]
    return {"count": len(slow), "at_start": sum(t < START_S for _, t in slow),
            "sessions": len({i for i, _ in slow}), "seconds": sorted({int(t) for _, t in slow})}


def steal_seconds() -> float:
    """CPU time this (virtual) machine's cores have waited for the host so far, all cores together (s)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


def _prepare(url: str, seconds: float, video: bool, seed: int) -> tuple[ProbeClient, list[float]]:
    signal, times = impulse_train(seconds, random.Random(seed))
    picture = np.full((120, 160, 3), 128, np.uint8) if video else None
    return ProbeClient(url, signal, picture=picture, encoded_mic=True), times


async def _one_session(client: ProbeClient, seconds: float, seed: int) -> str | None:
    """Stream for ``seconds``, then hang up; the error that ended it early, if any."""
    await asyncio.sleep(random.Random(seed + 1).uniform(0, 0.5))  # sessions start at arbitrary phases
    try:
        await client.connect()
        await asyncio.sleep(max(0.0, seconds - client.now()))
        return None
    except Exception as exc:  # reported in the JSON, not raised: one failed session must not hide the rest
        return f"{type(exc).__name__}: {exc}"
    finally:
        await client.close()


def _client_process(url: str, sessions: int, seconds: float, video: bool, seed: int) -> list[dict[str, Any]]:
    use_host_addresses(["127.0.0.1"])

    async def main() -> list[dict[str, Any]]:
        # every microphone is encoded before the first session connects, and what came back is decoded after the
        # last one hung up: none of it happens while media flows
        seeds = [seed * 1000 + i for i in range(sessions)]
        prepared = [_prepare(url, seconds, video, s) for s in seeds]
        # nor does garbage get collected while media flows: a full collection of a load process's recorded packets
        # took 75-115 ms, and held up the microphones of all its sessions that long
        gc.disable()
        try:
            errors = await asyncio.gather(*(_one_session(client, seconds, s)
                                            for (client, _), s in zip(prepared, seeds, strict=True)))
        finally:
            gc.enable()
        results = []
        for (client, times), error in zip(prepared, errors, strict=True):
            added, lost = measure(client.output(seconds), times) if error is None else ([], len(times))
            results.append({"added": added, "lost": lost, "error": error})
        return results

    return asyncio.run(main())


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of process ``pid`` and of every process it started that still runs."""
    ppids, tick = {}, os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # it ended
            ppids[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    tree = {pid}
    while grown := {p for p, (parent, _) in ppids.items() if parent in tree and p not in tree}:
        tree |= grown
    return sum(ppids[p][1] for p in tree if p in ppids)


def gateway_metrics(url: str) -> dict[str, float]:
    """The gateway's unlabelled counters and quantiles. Behind a front every sample also has a ``process`` label:
    counters are summed over the processes, quantiles are the largest of them."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k != "process"}
            if not labels:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
            elif set(labels) == {"quantile"}:
                key = f"{sample.name}:{labels['quantile']}"
                values[key] = max(values.get(key, sample.value), sample.value)
    return values


def bench_gateway(sessions: int = 1, seconds: float = 20.0, video: bool = False, processes: int = 2,
                  model: str = "echo", checkpoint: str | None = None, gateway_processes: int = 1) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-able result. With a model other than echo there is no echo to time,
    so ``added_latency_ms`` is empty and the engine's own step and wait times tell the story. ``processes`` load
    clients run against a gateway of ``gateway_processes`` processes (``microturn serve --processes``)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = serve(port, "--model", model, "--processes", str(gateway_processes),
                   *(["--checkpoint", checkpoint] if checkpoint else []))
    try:
        print(f"bench: {sessions} sessions × {seconds:.0f} s against {url} ({gateway_processes} gateway "
              f"process{'es' if gateway_processes > 1 else ''})", file=sys.stderr, flush=True)
        before = gateway_metrics(url)
        cpu0, steal0 = _cpu_seconds(server.pid), steal_seconds()
        processes = max(1, min(processes, sessions))
        shares = [sessions // processes + (i < sessions % processes) for i in range(processes)]
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(processes) as pool:
            jobs = [pool.apply_async(_client_process, (url, n, seconds, video, i)) for i, n in enumerate(shares)]
            results = [r for job in jobs for r in job.get(timeout=seconds + 120)]
        cpu, steal = _cpu_seconds(server.pid) - cpu0, steal_seconds() - steal0
        after = gateway_metrics(url)
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
    added = np.array([a for r in results for _, a in r["added"]]) * 1000

    def delta(name: str) -> int:
        return int(after.get(name, 0) - before.get(name, 0))

    def ms(name: str) -> dict[str, float]:
        names = {"0.5": "p50", "0.99": "p99"}
        return {names[q]: round(after[f"{name}:{q}"] * 1000, 1) for q in names if f"{name}:{q}" in after}

    def pct(q: float) -> float | None:
        return round(float(np.percentile(added, q)), 1) if added.size else None

    return {
        "sessions": sessions,
        "seconds": seconds,
        "video": video,
        "micro_turns": delta("microturn_micro_turns_total"),
        "late_micro_turns": delta("microturn_late_micro_turns_total"),
        "underrun_frames": delta("microturn_underrun_frames_total"),
        "missed_slots": delta("microturn_missed_slots_total"),
        "frames_out": delta("microturn_frames_out_total"),
        "added_latency_ms": {"p50": pct(50), "p99": pct(99), "max": round(float(added.max()), 1)
                             if added.size else None},
        "impulses": int(added.size),
        "impulses_lost": sum(r["lost"] for r in results),
        "slow_impulses": slow_impulses([r["added"] for r in results]),
        "steal_seconds": round(steal, 1),
        "cpu_seconds_per_session_second": round(cpu / (sessions * seconds), 4),
        "gateway_processes": gateway_processes,
        "model": model,
        "engine_tick_ms": ms("microturn_engine_tick_seconds"),
        "engine_wait_ms": ms("microturn_engine_wait_seconds"),
        "errors": [r["error"] for r in results if r["error"]],
    }
