"""One session's background tasks inside the gateway: starting, cancelling, persisting, and weaving them back.

A task starts when the interaction model asks (a ``background_request`` output event) or when an integrator's
backend calls ``POST /v1/sessions/{id}/tasks``. It runs in the gateway's
:class:`~inference.background.runner.BackgroundRunner` (worker processes) with the conversation so far
(:class:`~inference.background.tasks.Transcript`). What it reports becomes *items*
(:meth:`~inference.background.tasks.Task.items`): :meth:`SessionBackground.take` hands the items due to the next
micro-turn (the session puts their text into ``MicroTurn.background`` and, with that micro-turn's output, sends
each as a ``background_*`` event and logs it together with the per-task count of items delivered).

Task state is written to the session store whenever it changes (one writer per session, so writes never overtake
each other). After a resume, :meth:`SessionBackground.resume` picks up the stored tasks: items not yet delivered are
delivered, and a task that was still running on the old gateway runs again here — its first partial results,
already known, are not reported twice (a deterministic reasoner reports the same ones again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import deque

from inference.background.runner import BackgroundRunner, TooManyTasks, Update
from inference.background.tasks import BackgroundItem, Task, Transcript
from webrtc_gateway.store import SessionStore, StoreUnavailable

log = logging.getLogger(__name__)

MAX_REQUEST_CHARS = 2000


class UnknownTask(Exception):
    """No such task in this session."""


class TaskFinished(Exception):
    """The task has already finished; it cannot be cancelled."""


class SessionBackground:
    """The background tasks of one live session."""

    def __init__(self, session_id: str, runner: BackgroundRunner, store: SessionStore) -> None:
        self.session_id = session_id
        self.runner = runner
        self.store = store
        self.transcript = Transcript()
        self.tasks: dict[str, Task] = {}
        self._queue: deque[BackgroundItem] = deque()  # items waiting for a micro-turn
        self._queued: dict[str, int] = {}  # task id → items handed to the queue so far
        self._skip: dict[str, int] = {}  # task id → partials of a rerun already known from before the resume
        self._dirty: dict[str, int] = {}  # task id → its change count when it last changed, until written
        self._changes = 0
        self._wrote = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False

    # -- tasks ------------------------------------------------------------------------------------------------

    def start(self, request: str, source: str, task_id: str | None = None, delivered: int = 0) -> Task:
        """Start a task for ``request`` (a random id unless given; ``delivered``: how many of its items the model
        already had, when it is started again after a move). Raises :class:`TooManyTasks` (and starts nothing) at
        the session's limit."""
        request = request.strip()[:MAX_REQUEST_CHARS]
        task = Task(task_id or secrets.token_hex(8), self.session_id, request, source, state="running")
        if delivered:  # the rerun's first items are the ones the model already had: not again
            self._queued[task.task_id] = delivered
        self.runner.start(self.session_id, task.task_id, self.transcript.text(), request, self._on_update)
        self.tasks[task.task_id] = task
        self._changed(task)
        return task

    def start_or_fail(self, request: str, source: str, task_id: str | None = None, delivered: int = 0) -> Task:
        """Like :meth:`start`, but a refused task is recorded (and reported) as failed."""
        try:
            return self.start(request, source, task_id, delivered)
        except TooManyTasks as exc:
            task = Task(task_id or secrets.token_hex(8), self.session_id, request.strip()[:MAX_REQUEST_CHARS], source,
                        state="failed", error=str(exc))
            self.tasks[task.task_id] = task
            self._changed(task)
            return task

    async def cancel(self, task_id: str) -> Task:
        task = self.tasks.get(task_id)
        if task is None:
            raise UnknownTask(f"no task {task_id} in this session")
        if task.finished or not await self.runner.cancel(task_id):
            raise TaskFinished(f"task {task_id} has already finished ({task.state})")
        return task

    def resume(self, tasks: list[Task], delivered: dict[str, int]) -> None:
        """Pick up the tasks a session had before it moved here (see the module docstring)."""
        for task in tasks:
            self.tasks[task.task_id] = task
            self._queued[task.task_id] = delivered.get(task.task_id, 0)
            if not task.finished:
                self._skip[task.task_id] = len(task.partials)
                try:
                    self.runner.start(self.session_id, task.task_id, self.transcript.text(), task.request,
                                      self._on_update)
                except TooManyTasks as exc:
                    task.state, task.error = "failed", str(exc)
            self._changed(task)

    def _on_update(self, update: Update) -> None:
        task = self.tasks.get(update.task_id)
        if task is None or self._closed:
            return  # the session is closing: a task stopped by the close is not "cancelled" (a resume reruns it)
        if update.kind == "progress":
            if self._skip.get(task.task_id, 0) > 0:
                self._skip[task.task_id] -= 1
                return
            task.partials.append(update.text)
        elif update.kind == "result":
            task.state, task.result = "done", update.text
        elif update.kind == "failed":
            task.state, task.error = "failed", update.text
        else:
            task.state = "cancelled"
        self._changed(task)

    def _changed(self, task: Task) -> None:
        """Queue the task's new items for the next micro-turns and have its state written."""
        items = task.items()
        self._queue.extend(items[self._queued.get(task.task_id, 0):])
        self._queued[task.task_id] = len(items)
        self._changes += 1
        self._dirty[task.task_id] = self._changes
        self._wrote.set()

    # -- weaving into micro-turns -----------------------------------------------------------------------------

    def take(self) -> list[BackgroundItem]:
        """The items for the micro-turn being dispatched now, in order; each is handed out once."""
        items = list(self._queue)
        self._queue.clear()
        return items

    def give_back(self, items: list[BackgroundItem]) -> None:
        """Items whose micro-turn was never stepped: they go out again with the next one."""
        self._queue.extendleft(reversed(items))

    # -- persistence ------------------------------------------------------------------------------------------

    async def run_writer(self) -> None:
        """Write changed tasks to the store, in order, until cancelled (the session's teardown)."""
        while True:
            await self._wrote.wait()
            self._wrote.clear()
            while self._dirty:
                task_id, version = next(iter(self._dirty.items()))
                try:
                    await self.store.put_task(self.tasks[task_id])
                except StoreUnavailable as exc:
                    log.warning("session %s: cannot store background task %s yet: %s", self.session_id, task_id,
                                exc)
                    await asyncio.sleep(0.5)
                    continue
                if self._dirty.get(task_id) == version:  # unless it changed again meanwhile
                    del self._dirty[task_id]

    async def close(self) -> None:
        """Stop this session's tasks here (closing, or moving to another gateway); stored state stays as it is."""
        self._closed = True
        await self.runner.cancel_session(self.session_id)
        with contextlib.suppress(StoreUnavailable):
            for task_id in list(self._dirty):
                await self.store.put_task(self.tasks[task_id])
        self._dirty.clear()
