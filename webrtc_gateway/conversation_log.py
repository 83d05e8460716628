"""The write-behind conversation log: every micro-turn's context record and messages, on their way to the store.

Sessions hand entries to :meth:`ConversationLog.add`, which never waits. One flusher task writes everything that
is waiting in a single pipelined round trip, as soon as there is something to write, so the log trails the live
conversation by about one micro-turn. If the store is slow or down, media and micro-turns go on; entries wait in a
bounded buffer (``max_entries``, across all sessions) and are written in order once the store is back. Past the
bound the oldest entries are dropped — that loss is counted and logged, and it is the one way the log can lose
anything: with the default 30,000 entries and 20 live sessions, the store may be away for 5 minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable

from webrtc_gateway.store import LogEntry, SessionStore, StoreUnavailable

log = logging.getLogger(__name__)


class ConversationLog:
    """Buffers log entries of all sessions of a gateway and flushes them to the store."""

    def __init__(self, store: SessionStore, owner: str, on_refused: Callable[[str], None],
                 max_entries: int = 30_000, retry_s: float = 0.5) -> None:
        self.store = store
        self.owner = owner
        self.on_refused = on_refused  # called with a session id whose writes the store refused (it moved)
        self.max_entries = max_entries
        self.retry_s = retry_s
        self.written = 0
        self.dropped = 0
        self.store_down = False
        self._pending: deque[LogEntry] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, entry: LogEntry) -> None:
        if len(self._pending) >= self.max_entries:
            self._pending.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("conversation log buffer full: %d entries dropped so far", self.dropped)
        self._pending.append(entry)
        self._idle.clear()
        self._wakeup.set()

    async def flushed(self) -> None:
        """Wait until everything added so far is written."""
        await self._idle.wait()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="conversation-log")

    async def stop(self) -> None:
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self.flushed()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = list(self._pending)
                try:
                    accepted = await self.store.append(self.owner, batch)
                except StoreUnavailable as exc:
                    if not self.store_down:
                        log.warning("session store unavailable, buffering the conversation log: %s", exc)
                    self.store_down = True
                    await asyncio.sleep(self.retry_s)
                    continue
                if self.store_down:
                    log.warning("session store is back; %d buffered entries written", len(batch))
                self.store_down = False
                written = {id(e) for e in batch}  # entries dropped meanwhile must not shift what is removed
                while self._pending and id(self._pending[0]) in written:
                    self._pending.popleft()
                self.written += len(batch)
                for entry, ok in zip(batch, accepted, strict=True):
                    if not ok:
                        self.on_refused(entry.session_id)
            self._idle.set()
