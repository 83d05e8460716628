"""``microturn bench cluster``: what the gateway → worker hop costs, over loopback.

Starts ``--workers`` ``microturn worker`` processes and, in this process, the gateway's side of them
(:class:`~webrtc_gateway.workers.RemoteEngine`, exactly what ``microturn serve --workers`` runs). ``--sessions``
sessions each submit a micro-turn every 200 ms (3,200 samples of audio and, with video, a 160×120 frame: 70 KB on the
wire), at staggered phases, as a gateway's sessions do, for ``--seconds``.

The hop of one micro-turn is its round trip at the gateway (submitted → output back) less the time it spent inside
the worker (frame received → output frame queued, which the worker reports in the OUTPUT frame): serialisation,
WebSocket and TCP both ways, and both event loops. WebRTC is left out on purpose — it costs the same with or without
remote workers (``bench gateway`` measures it). Prints hop and round-trip percentiles (ms), micro-turns that failed,
and the sessions held (those that got every output).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from typing import Any

import numpy as np

from microturn.contracts import MICRO_TURN_MS, MICRO_TURN_SAMPLES, VIDEO_HEIGHT, VIDEO_WIDTH, MicroTurn
from microturn.local import free_port, worker
from webrtc_gateway.store import MemorySessionStore
from webrtc_gateway.workers import RemoteEngine

WARMUP_S = 1.0
TARGET_HOP_P99_MS = 5.0


def _ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    data = np.asarray(values) * 1000
    return {"p50": round(float(np.quantile(data, 0.5)), 2), "p99": round(float(np.quantile(data, 0.99)), 2),
            "max": round(float(data.max()), 2)}


async def _drive(sessions: int, seconds: float, urls: list[str], video: bool) -> dict[str, Any]:
    engine = RemoteEngine(tuple(urls), "", MemorySessionStore())
    await engine.start()
    try:
        await engine.wait_for_workers(len(urls))
        rng = np.random.default_rng(0)
        audio = rng.uniform(-0.3, 0.3, MICRO_TURN_SAMPLES).astype(np.float32)
        frame = rng.integers(0, 255, (VIDEO_HEIGHT, VIDEO_WIDTH, 3), dtype=np.uint8) if video else None
        sids = [f"bench-{i}" for i in range(sessions)]
        for sid in sids:
            await engine.open_session(sid, seed=1)
        placement = engine.placement()
        failed = 0
        held = dict.fromkeys(sids, True)
        start = time.perf_counter() + 0.2

        async def one(sid: str, phase: float) -> None:
            nonlocal failed
            pending = []
            for k in range(int(seconds * 1000 / MICRO_TURN_MS)):
                due = start + phase + k * MICRO_TURN_MS / 1000
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                pending.append(engine.submit(MicroTurn(sid, k, audio, video=frame)))
            for future in pending:
                try:
                    await future
                except Exception:
                    failed += 1
                    held[sid] = False

        async def forget_warmup() -> None:
            await asyncio.sleep(max(0.0, start + WARMUP_S - time.perf_counter()))
            engine.stats.hop_seconds.clear()
            engine.stats.round_trip_seconds.clear()

        warm = asyncio.ensure_future(forget_warmup())
        await asyncio.gather(*(one(sid, i * MICRO_TURN_MS / 1000 / sessions) for i, sid in enumerate(sids)))
        await warm
        for sid in sids:
            await engine.close_session(sid)
        return {"hops": list(engine.stats.hop_seconds), "round_trips": list(engine.stats.round_trip_seconds),
                "failed": failed, "held": sum(held.values()), "placement": placement}
    finally:
        await engine.stop()


def bench_cluster(workers: int = 2, sessions: int = 16, seconds: float = 20.0, model: str = "echo",
                  video: bool = True) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); returns what ``microturn bench cluster`` prints."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        urls = []
        for i in range(workers):
            port = free_port()
            procs.append(worker(port, "--model", model, "--capacity", str(sessions), worker_id=f"bench-wk-{i}"))
            urls.append(f"ws://127.0.0.1:{port}/v1/worker")
        got = asyncio.run(_drive(sessions, seconds, urls, video))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
    hop = _ms(got["hops"])
    return {
        "workers": workers, "sessions": sessions, "seconds": seconds, "model": model, "video": video,
        "micro_turns": len(got["hops"]), "failed": got["failed"], "sessions_held": got["held"],
        "sessions_per_worker": got["placement"], "hop_ms": hop, "round_trip_ms": _ms(got["round_trips"]),
        "target": f"hop p99 <= {TARGET_HOP_P99_MS} ms at 16 sessions",
        "met": bool(hop["p99"] <= TARGET_HOP_P99_MS and got["failed"] == 0),
    }
