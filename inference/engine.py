"""The engine: steps every session's due micro-turns in batches, off the event loop.

The gateway calls :meth:`Engine.submit` for each micro-turn as soon as it is due and awaits the returned future.
Scheduling is continuous: whenever micro-turns are waiting and no batch is running, all waiting micro-turns (at most
one per session; a session's later micro-turn waits for its earlier one) are stepped together in one call to the
backend, in the engine's own tick thread. A due micro-turn therefore waits at most for the batch already running,
never for a fixed tick grid, whatever phase its session started at.

Ownership: the backend's per-session state (e.g. a KV cache) is created by :meth:`Engine.open_session`, touched only
by the tick thread, and freed by :meth:`Engine.close_session`, which also fails any micro-turn of that session still
waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from microturn.contracts import (
    MICRO_TURN_MS,
    MicroTurn,
    MicroTurnOutput,
    ModelBackend,
    SessionClosed,
    TurnNotStepped,
)
from microturn.histogram import BATCH_BUCKETS, SECONDS_BUCKETS, Histogram

__all__ = ["Engine", "EngineStats", "SessionClosed", "TurnNotStepped"]

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """Counters the engine keeps; read by ``/metrics`` (the histograms) and the benchmarks (the recent values)."""

    ticks: int = 0
    micro_turns: int = 0
    late_ticks: int = 0  # ticks that ended after the tick budget of their oldest micro-turn
    tick_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=4096))
    wait_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=4096))  # submit → batch start
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=4096))
    tick_hist: Histogram = field(default_factory=lambda: Histogram(SECONDS_BUCKETS))
    wait_hist: Histogram = field(default_factory=lambda: Histogram(SECONDS_BUCKETS))
    batch_hist: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))


@dataclass
class _Pending:
    turn: MicroTurn
    future: asyncio.Future[MicroTurnOutput]
    submitted: float


class Engine:
    """Batches micro-turns of many sessions onto one :class:`ModelBackend`.

    ``tick_budget_ms`` is how long a micro-turn may take from submit to output before its tick is reported late.
    """

    def __init__(self, backend: ModelBackend, tick_budget_ms: float = 0.75 * MICRO_TURN_MS) -> None:
        self.backend = backend
        self.tick_budget = tick_budget_ms / 1000
        self.stats = EngineStats()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-tick")
        self._waiting: dict[str, deque[_Pending]] = {}
        self._wakeup = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None

    @property
    def sessions(self) -> int:
        return len(self._waiting)

    async def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="engine-scheduler")

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        for sid in list(self._waiting):
            await self.close_session(sid)
        self._executor.shutdown(wait=True)

    async def open_session(self, session_id: str, seed: int = 0, history: list[bytes] | None = None) -> None:
        """Open a session; with ``history`` (its micro-turns' context records) rebuild it where it left off."""
        if session_id in self._waiting:
            raise ValueError(f"session {session_id} is already open")
        self._waiting[session_id] = deque()
        loop = asyncio.get_running_loop()
        try:
            if history is None:
                await loop.run_in_executor(self._executor, self.backend.open, session_id, seed)
            else:
                await loop.run_in_executor(self._executor, self.backend.restore, session_id, seed, history)
        except BaseException:
            self._waiting.pop(session_id, None)
            raise

    async def close_session(self, session_id: str) -> None:
        waiting = self._waiting.pop(session_id, None)
        if waiting is None:
            return
        for pending in waiting:
            if not pending.future.done():
                pending.future.set_exception(SessionClosed(session_id))
        await asyncio.get_running_loop().run_in_executor(self._executor, self.backend.close, session_id)

    def submit(self, turn: MicroTurn) -> asyncio.Future[MicroTurnOutput]:
        """Queue a micro-turn; the future resolves with its output. Never blocks."""
        waiting = self._waiting.get(turn.session_id)
        if waiting is None:
            raise SessionClosed(turn.session_id)
        future: asyncio.Future[MicroTurnOutput] = asyncio.get_running_loop().create_future()
        waiting.append(_Pending(turn, future, time.perf_counter()))
        self._wakeup.set()
        return future

    def _take_batch(self) -> list[_Pending]:
        return [queue.popleft() for queue in self._waiting.values() if queue]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch = self._take_batch()
            while batch:
                start = time.perf_counter()
                turns = [p.turn for p in batch]
                try:
                    outputs = await loop.run_in_executor(self._executor, self.backend.step, turns)
                except Exception as exc:  # a backend failure fails this batch, not the engine
                    log.exception("engine tick failed for %d micro-turns", len(batch))
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(TurnNotStepped(f"model error: {type(exc).__name__}: {exc}"))
                else:
                    for p, out in zip(batch, outputs, strict=True):
                        if not p.future.done():
                            p.future.set_result(out)
                end = time.perf_counter()
                self._account(batch, start, end)
                batch = self._take_batch()

    def _account(self, batch: list[_Pending], start: float, end: float) -> None:
        s = self.stats
        s.ticks += 1
        s.micro_turns += len(batch)
        s.tick_seconds.append(end - start)
        s.tick_hist.observe(end - start)
        s.batch_sizes.append(len(batch))
        s.batch_hist.observe(len(batch))
        oldest = min(p.submitted for p in batch)
        for p in batch:
            s.wait_seconds.append(start - p.submitted)
            s.wait_hist.observe(start - p.submitted)
        if end - oldest > self.tick_budget:
            s.late_ticks += 1
            log.warning("late tick: %d micro-turns took %.0f ms from submit (budget %.0f ms)",
                        len(batch), (end - oldest) * 1000, self.tick_budget * 1000)
