"""``microturn bench background``: do background tasks leave the micro-turn path alone?

N sessions of the reference model (random ``tiny`` weights, or ``echo``) step micro-turns in real time through the
engine — each session submits one every 200 ms, the sessions' phases spread over the 200 ms — first with nothing else
running, then while every session keeps a CPU-heavy background task running (``/spin SECONDS`` through the
gateway's :class:`~inference.background.runner.BackgroundRunner`: worker processes at ``nice`` 19, at most
``workers`` at once). For each phase it reports ``late_micro_turns`` (output later than the tick budget after
submit), ``tick_ms`` (p50, p99 of the engine's batched steps) and ``turn_ms`` (p50, p99 submit → output); for the
loaded phase also the background task throughput. Target: zero late micro-turns and tick p99 within 1.2× of the
unloaded run.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import numpy as np

from inference.background.reasoner import ReasonerSpec
from inference.background.runner import BackgroundRunner, Update
from inference.engine import Engine, EngineStats
from microturn.config import Settings
from microturn.contracts import MICRO_TURN_MS, MICRO_TURN_SAMPLES, MicroTurn, ModelBackend


def _backend(model: str, preset_name: str) -> ModelBackend:
    if model == "echo":
        from inference.echo import EchoModel

        return EchoModel()
    import torch

    from inference.config import preset
    from inference.model import ReferenceNet
    from inference.reference import ReferenceModel

    torch.manual_seed(0)
    return ReferenceModel(ReferenceNet(preset(preset_name)))


def _ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p99": 0.0}
    arr = np.asarray(values) * 1000
    return {"p50": round(float(np.percentile(arr, 50)), 2), "p99": round(float(np.percentile(arr, 99)), 2)}


class _Phase:
    def __init__(self, engine: Engine, session_ids: list[str], budget_s: float) -> None:
        self.engine = engine
        self.session_ids = session_ids
        self.budget_s = budget_s
        self.next_index = dict.fromkeys(session_ids, 0)
        rng = np.random.default_rng(0)
        self.audio = (0.05 * rng.standard_normal(MICRO_TURN_SAMPLES)).astype(np.float32)

    async def run(self, seconds: float) -> dict[str, Any]:
        self.engine.stats = EngineStats()
        latencies: list[float] = []
        start = time.monotonic() + 0.1
        period = MICRO_TURN_MS / 1000

        async def drive(n: int, sid: str) -> None:
            offset = n * period / len(self.session_ids)
            k = 0
            while (due := start + offset + k * period) < start + seconds:
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                index = self.next_index[sid]
                self.next_index[sid] += 1
                submitted = time.monotonic()
                await self.engine.submit(MicroTurn(sid, index, self.audio))
                latencies.append(time.monotonic() - submitted)
                k += 1

        await asyncio.gather(*(drive(n, sid) for n, sid in enumerate(self.session_ids)))
        ticks = list(self.engine.stats.tick_seconds)
        return {"micro_turns": len(latencies), "late_micro_turns": sum(t > self.budget_s for t in latencies),
                "tick_ms": _ms(ticks), "turn_ms": _ms(latencies)}


async def _bench(sessions: int, seconds: float, model: str, preset_name: str, spin_s: float, workers: int,
                 tick_budget_ms: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    backend = await loop.run_in_executor(None, _backend, model, preset_name)
    engine = Engine(backend, tick_budget_ms=tick_budget_ms)
    await engine.start()
    ids = [f"bench-{i}" for i in range(sessions)]
    for sid in ids:
        await engine.open_session(sid, seed=1)
    phase = _Phase(engine, ids, tick_budget_ms / 1000)
    try:
        await phase.run(min(2.0, seconds))  # warm-up: allocator, torch kernels
        unloaded = await phase.run(seconds)
        runner = BackgroundRunner(ReasonerSpec(), workers=workers, per_session=1, timeout_s=spin_s * 100)
        done: list[Update] = []
        stop = False

        def keep_busy(sid: str, n: int) -> None:
            def on_update(update: Update) -> None:
                if update.kind == "result":
                    done.append(update)
                if update.kind != "progress" and not stop:
                    keep_busy(sid, n + 1)
            runner.start(sid, f"{sid}-{n}", "", f"/spin {spin_s:g}", on_update)

        for sid in ids:
            keep_busy(sid, 0)
        await asyncio.sleep(1.0)  # the workers are up and spinning
        counted = len(done)
        began = time.monotonic()
        loaded = await phase.run(seconds)
        elapsed = time.monotonic() - began
        throughput = (len(done) - counted) / elapsed
        stop = True
        await runner.close()
    finally:
        await engine.stop()
    return {
        "sessions": sessions, "seconds": seconds, "model": model if model == "echo" else f"reference/{preset_name}",
        "cores": os.cpu_count(), "background_workers": workers, "spin_s": spin_s,
        "late_micro_turns": loaded["late_micro_turns"],
        "tick_ms": {"unloaded": unloaded["tick_ms"], "loaded": loaded["tick_ms"]},
        "turn_ms": {"unloaded": unloaded["turn_ms"], "loaded": loaded["turn_ms"]},
        "late_micro_turns_unloaded": unloaded["late_micro_turns"],
        "micro_turns": {"unloaded": unloaded["micro_turns"], "loaded": loaded["micro_turns"]},
        "tick_p99_ratio": round(loaded["tick_ms"]["p99"] / max(unloaded["tick_ms"]["p99"], 1e-9), 3),
        "tasks_per_s": round(throughput, 3),
        "task_cpu_s_per_s": round(throughput * spin_s, 3),
    }


def bench_background(sessions: int = 16, seconds: float = 10.0, model: str = "reference", preset: str = "tiny",
                     spin_s: float = 1.0, workers: int | None = None, tick_budget_ms: float = 150.0
                     ) -> dict[str, Any]:
    """Run the benchmark (about 2 × ``seconds`` plus start-up) and return its figures; ``workers`` defaults to the
    gateway's setting."""
    if workers is None:
        workers = Settings().background_workers
    return asyncio.run(_bench(sessions, seconds, model, preset, spin_s, workers, tick_budget_ms))
