"""The engine scheduler: batching across sessions, order within a session, close, late ticks."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from inference.echo import EchoModel
from inference.engine import Engine, SessionClosed, TurnNotStepped
from microturn.contracts import MicroTurn, MicroTurnOutput


def turn(sid: str, k: int, level: float = 0.1) -> MicroTurn:
    return MicroTurn(sid, k, np.full(3200, level, np.float32))


class SlowEcho(EchoModel):
    """Echo that takes ``delay`` seconds a step and records batch compositions and the thread it ran on."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.batches: list[list[tuple[str, int]]] = []
        self.threads: set[str] = set()

    def step(self, turns: list[MicroTurn]) -> list[MicroTurnOutput]:
        self.threads.add(threading.current_thread().name)
        self.batches.append([(t.session_id, t.index) for t in turns])
        time.sleep(self.delay)
        return super().step(turns)


async def test_batches_sessions_and_keeps_per_session_order() -> None:
    backend = SlowEcho(delay=0.05)
    engine = Engine(backend)
    await engine.start()
    for sid in "abc":
        await engine.open_session(sid)
    futures = [engine.submit(turn(sid, k)) for k in range(3) for sid in "abc"]
    outputs = await asyncio.gather(*futures)
    assert [(o.session_id, o.index) for o in outputs] == [(s, k) for k in range(3) for s in "abc"]
    assert all(len(set(sid for sid, _ in b)) == len(b) for b in backend.batches)  # ≤ 1 per session per batch
    assert max(len(b) for b in backend.batches) == 3  # sessions stepped together
    assert backend.threads and all(name.startswith("engine-tick") for name in backend.threads)
    assert engine.stats.micro_turns == 9
    await engine.stop()


async def test_event_loop_stays_free_while_backend_steps() -> None:
    engine = Engine(SlowEcho(delay=0.3))
    await engine.start()
    await engine.open_session("a")
    future = engine.submit(turn("a", 0))
    ticks = 0
    while not future.done():
        await asyncio.sleep(0.01)
        ticks += 1
    assert ticks >= 10  # the loop kept running during the 300 ms step
    await engine.stop()


async def test_close_fails_waiting_micro_turns_and_late_ticks_are_counted() -> None:
    engine = Engine(SlowEcho(delay=0.2), tick_budget_ms=50)
    await engine.start()
    await engine.open_session("a")
    first = engine.submit(turn("a", 0))
    second = engine.submit(turn("a", 1))
    await asyncio.sleep(0.05)
    await engine.close_session("a")
    with pytest.raises(SessionClosed):
        await second
    await first
    assert engine.stats.late_ticks >= 1
    with pytest.raises(SessionClosed):
        engine.submit(turn("a", 2))
    await engine.stop()


async def test_backend_failure_fails_the_batch_not_the_engine() -> None:
    class Flaky(EchoModel):
        calls = 0

        def step(self, turns: list[MicroTurn]) -> list[MicroTurnOutput]:
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("boom")
            return super().step(turns)

    engine = Engine(Flaky())
    await engine.start()
    await engine.open_session("a")
    with pytest.raises(TurnNotStepped, match="boom"):
        await engine.submit(turn("a", 0))
    out = await engine.submit(turn("a", 1))
    assert out.index == 1
    await engine.stop()
