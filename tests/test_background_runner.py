"""The background runner: tasks in worker processes, streamed back in order; limits, timeout and cancel."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import time
from multiprocessing.connection import Connection

import pytest

from inference.background.reasoner import ReasonerSpec
from inference.background.runner import BackgroundRunner, TooManyTasks, Update, lower_priority


class Collector:
    def __init__(self) -> None:
        self.updates: list[Update] = []
        self.finished: dict[str, asyncio.Event] = {}

    def __call__(self, update: Update) -> None:
        self.updates.append(update)
        if update.kind != "progress":
            self.finished.setdefault(update.task_id, asyncio.Event()).set()

    async def wait(self, task_id: str, timeout: float = 20) -> list[Update]:
        async with asyncio.timeout(timeout):
            await self.finished.setdefault(task_id, asyncio.Event()).wait()
        return [u for u in self.updates if u.task_id == task_id]


async def test_tasks_run_in_workers_and_stream_back_in_order() -> None:
    runner = BackgroundRunner(ReasonerSpec(), workers=2, per_session=3)
    got = Collector()
    try:
        runner.start("s1", "a", "", "what is 6 * 7", got)
        runner.start("s1", "b", "", "/spin 0.4", got)
        runner.start("s2", "c", "", "what is 1/0", got)
        a, b, c = await got.wait("a"), await got.wait("b"), await got.wait("c")
    finally:
        await runner.close()
    assert [(u.kind, u.text) for u in a] == [("progress", "calculator(expression='6 * 7')"), ("result", "42")]
    assert [u.text for u in b] == ["spinning: 25%", "spinning: 50%", "spinning: 75%", "spun for 0.4 s"]
    assert [(u.kind, u.text) for u in c][-1] == ("failed", "division by zero")
    assert runner.active("s1") == 0 and runner.completed == 3


async def test_limits_timeout_and_cancel() -> None:
    runner = BackgroundRunner(ReasonerSpec(), workers=2, per_session=2, timeout_s=1.0)
    got = Collector()
    try:
        runner.start("s", "long", "", "/spin 30", got)
        runner.start("s", "slow", "", "/spin 30", got)
        with pytest.raises(TooManyTasks):
            runner.start("s", "third", "", "what is 1+1", got)
        runner.start("other", "waits", "", "what is 1+1", got)  # another session: queued behind the workers
        await asyncio.sleep(0.5)
        start = time.monotonic()
        assert await runner.cancel("long")
        assert time.monotonic() - start < 1.5
        timed_out = await got.wait("slow")
        waited = await got.wait("waits")
        assert not await runner.cancel("long")  # already gone
    finally:
        await runner.close()
    assert [u.kind for u in got.updates if u.task_id == "long"] == ["cancelled"]
    assert timed_out[-1].kind == "failed" and "longer than 1 s" in timed_out[-1].text
    assert waited[-1] == Update("waits", "result", "2")


async def test_cancel_session_stops_all_of_its_tasks() -> None:
    runner = BackgroundRunner(ReasonerSpec(), workers=4, per_session=2)
    got = Collector()
    runner.start("s", "x", "", "/spin 30", got)
    runner.start("s", "y", "", "/spin 30", got)
    runner.start("t", "z", "", "what is 2*3", got)
    await got.wait("z")
    await runner.cancel_session("s")
    assert {u.task_id: u.kind for u in got.updates if u.kind != "progress"} == {"x": "cancelled", "y": "cancelled",
                                                                                "z": "result"}
    assert runner.active("s") == 0
    await runner.close()


def test_bench_background_reports_every_field() -> None:
    from microturn.bench_background import bench_background

    result = bench_background(sessions=2, seconds=1.0, model="echo", spin_s=0.3, workers=1)
    assert result["micro_turns"]["loaded"] >= 8 and result["late_micro_turns"] >= 0
    assert set(result["tick_ms"]) == {"unloaded", "loaded"} and result["tick_ms"]["loaded"]["p99"] > 0
    assert result["tasks_per_s"] > 0


def _report_priority(conn: Connection) -> None:
    lower_priority(19)
    conn.send((os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0)))


def test_worker_processes_run_at_idle_priority() -> None:
    """A task's process is niced and, on Linux, SCHED_IDLE: it only gets CPU the tick and media threads leave."""
    parent, child = mp.Pipe()
    process = mp.get_context("spawn").Process(target=_report_priority, args=(child,))
    process.start()
    nice, policy = parent.recv()
    process.join(10)
    assert nice == 19
    if hasattr(os, "SCHED_IDLE"):
        assert policy == os.SCHED_IDLE
