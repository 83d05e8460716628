"""Runs background tasks in worker processes, off the event loop and the engine's tick thread.

Each running task has a process of its own (``spawn``, so it shares nothing with the gateway's threads and torch
state), at the lowest CPU priority (``nice`` 19, and on Linux the ``SCHED_IDLE`` policy, which runs it only on a
core nothing else wants and lets any waking thread preempt it at once): on a busy machine the tick thread and the
media threads always come first, and background work takes the CPU time they leave. The process builds its
reasoner from a :class:`~inference.background.reasoner.ReasonerSpec` and streams ``("progress", text)`` and
finally ``("result", text)`` or ``("error", message)`` back over a pipe, which the event loop watches with
``add_reader`` (no thread blocks on it).

Limits: at most ``workers`` processes run at once (later tasks wait their turn), at most ``per_session`` tasks of
one session are queued or running (more is refused: :class:`TooManyTasks`), and a task that runs longer than
``timeout_s`` is stopped and fails. :meth:`BackgroundRunner.cancel` stops a task at once (its process is
terminated); :meth:`cancel_session` does that for all of a session's tasks (the session closed);
:meth:`close` for all.

Updates go to the ``on_update`` callback given with each task, on the event loop, in order: ``progress`` (any
number), then exactly one of ``result``, ``failed``, ``cancelled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Literal

from inference.background.reasoner import ReasonerError, ReasonerSpec

log = logging.getLogger(__name__)

UpdateKind = Literal["progress", "result", "failed", "cancelled"]


@dataclass(frozen=True)
class Update:
    """Something a task reported (``text``: the partial or final result, or why it failed)."""

    task_id: str
    kind: UpdateKind
    text: str


class TooManyTasks(Exception):
    """The session already has its maximum of background tasks queued or running."""


def lower_priority(nice: int) -> None:
    """Make this process yield the CPU: ``nice``, and on Linux ``SCHED_IDLE`` (runs only when nothing else wants
    the core; a waking thread of normal priority preempts it at once)."""
    with contextlib.suppress(OSError):
        os.nice(nice)
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def _worker(spec: ReasonerSpec, conversation: str, request: str, conn: Connection, nice: int) -> None:
    """The body of a worker process: run one task, stream what it says, exit."""
    lower_priority(nice)
    try:
        result = asyncio.run(spec.build().run(conversation, request, lambda text: conn.send(("progress", text))))
        conn.send(("result", result))
    except ReasonerError as exc:
        conn.send(("error", str(exc)))
    except Exception as exc:
        conn.send(("error", f"the background model failed: {type(exc).__name__}: {exc}"))
    finally:
        conn.close()


@dataclass
class _Running:
    session_id: str
    task: asyncio.Task[None]
    process: mp.process.BaseProcess | None = None
    cancelled: bool = False


class BackgroundRunner:
    """Worker processes for the background tasks of all sessions of one gateway."""

    def __init__(self, spec: ReasonerSpec, workers: int = 2, per_session: int = 2, timeout_s: float = 60.0,
                 nice: int = 19) -> None:
        self.spec = spec
        self.per_session = per_session
        self.timeout_s = timeout_s
        self.nice = nice
        self.completed = 0
        self._slots = asyncio.Semaphore(workers)
        self._context = mp.get_context("spawn")
        self._running: dict[str, _Running] = {}

    def active(self, session_id: str) -> int:
        return sum(1 for r in self._running.values() if r.session_id == session_id)

    def start(self, session_id: str, task_id: str, conversation: str, request: str,
              on_update: Callable[[Update], None]) -> None:
        """Queue a task; it runs as soon as a worker slot is free. Raises :class:`TooManyTasks`."""
        if task_id in self._running:
            raise ValueError(f"task {task_id} is already running")
        if self.active(session_id) >= self.per_session:
            raise TooManyTasks(f"this session already has {self.per_session} background tasks running")
        task = asyncio.create_task(self._run(task_id, conversation, request, on_update), name=f"bg:{task_id}")
        self._running[task_id] = _Running(session_id, task)

    async def cancel(self, task_id: str) -> bool:
        """Stop a queued or running task; its update is ``cancelled``. False if it is not running here."""
        running = self._running.get(task_id)
        if running is None:
            return False
        running.cancelled = True
        running.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running.task
        return True

    async def cancel_session(self, session_id: str) -> None:
        for task_id in [t for t, r in self._running.items() if r.session_id == session_id]:
            await self.cancel(task_id)

    async def close(self) -> None:
        for task_id in list(self._running):
            await self.cancel(task_id)

    async def _run(self, task_id: str, conversation: str, request: str, on_update: Callable[[Update], None]) -> None:
        final: Update | None = None
        try:
            async with self._slots:
                final = await self._in_process(task_id, conversation, request, on_update)
        except asyncio.CancelledError:
            final = Update(task_id, "cancelled", "")
        except Exception as exc:
            log.exception("background task %s could not run", task_id)
            final = Update(task_id, "failed", f"the background worker could not run: {exc}")
        finally:
            self._running.pop(task_id, None)
            self.completed += 1
            if final is not None:
                on_update(final)

    async def _in_process(self, task_id: str, conversation: str, request: str,
                          on_update: Callable[[Update], None]) -> Update:
        loop = asyncio.get_running_loop()
        receive, send = self._context.Pipe(duplex=False)
        process = self._context.Process(target=_worker, args=(self.spec, conversation, request, send, self.nice),
                                        name=f"microturn-bg-{task_id}", daemon=True)
        self._running[task_id].process = process
        final: asyncio.Future[Update] = loop.create_future()

        def readable() -> None:
            try:
                while receive.poll():
                    kind, text = receive.recv()
                    if kind == "progress":
                        on_update(Update(task_id, "progress", str(text)))
                    elif not final.done():
                        final.set_result(Update(task_id, "result" if kind == "result" else "failed", str(text)))
            except (EOFError, OSError):
                loop.remove_reader(receive.fileno())
                if not final.done():
                    final.set_result(Update(task_id, "failed", f"the background worker exited "
                                                               f"(code {process.exitcode})"))

        try:
            await loop.run_in_executor(None, process.start)
            send.close()  # the child has its own copy; EOF on ours means the child is gone
            loop.add_reader(receive.fileno(), readable)
            try:
                async with asyncio.timeout(self.timeout_s):
                    return await final
            except TimeoutError:
                return Update(task_id, "failed", f"the task took longer than {self.timeout_s:g} s and was stopped")
        finally:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(receive.fileno())
            receive.close()
            if process.is_alive():
                process.terminate()
            await _reap(process)


async def _reap(process: mp.process.BaseProcess) -> None:
    """Wait for a worker to exit without blocking the loop; kill it if it ignores SIGTERM."""
    if process.pid is None:
        return
    for _ in range(50):
        if not process.is_alive():
            process.join(0)
            return
        await asyncio.sleep(0.02)
    process.kill()
    await asyncio.sleep(0.05)
    process.join(0)
