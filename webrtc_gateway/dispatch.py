"""The micro-turn clock: decides when each micro-turn of a session is due and hands it to the engine.

Micro-turn ``k`` is due as soon as its 200 ms of audio is on the timeline, or at its deadline — the wall-clock time
its media end maps to, plus a grace for late packets — whichever comes first. The grace adapts to the jitter the
session's packets show (its 95th percentile), never below the configured grace nor above ``max_grace_s``, so a
jittery uplink costs some latency rather than cut-off audio. At the deadline its missing
audio is silence and it is marked late. Once a session's first audio packet has anchored the media clock, the clock
keeps dispatching even if audio stops: silence is an ordinary input.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from microturn.audio import rms_dbfs
from microturn.contracts import MicroTurn
from webrtc_gateway.ingest import AudioIngest, Inbox, VideoIngest
from webrtc_gateway.timeline import turn_end_seconds


class MicroTurnClock:
    """Builds one session's micro-turns and passes each to ``submit`` the moment it is due."""

    def __init__(self, session_id: str, audio: AudioIngest, video: VideoIngest, inbox: Inbox,
                 grace_s: float, max_grace_s: float = 0.3, now: Callable[[], float] = time.monotonic) -> None:
        self.session_id = session_id
        self.audio = audio
        self.video = video
        self.inbox = inbox
        self.grace_s = grace_s
        self.max_grace_s = max_grace_s
        self.base = 0  # index of the first live micro-turn (after a resume, the session's micro-turns go on)
        self.dispatched = 0
        self.late = 0
        self.levels_dbfs: deque[float] = deque(maxlen=300)  # input level of the last 60 s of micro-turns
        self._now = now

    def deadline(self, turn: int) -> float:
        clock = self.audio.clock
        grace = min(self.max_grace_s, max(self.grace_s, clock.jitter + 0.02))
        return clock.wall_of(turn_end_seconds(turn)) + grace

    async def run(self, submit: Callable[[MicroTurn], None]) -> None:
        timeline, changed = self.audio.timeline, self.audio.changed
        while not self.audio.clock.anchored:
            changed.clear()
            await changed.wait()
        while True:
            turn = timeline.next_turn
            while not timeline.complete(turn):
                remaining = self.deadline(turn) - self._now()
                if remaining <= 0:
                    break
                changed.clear()
                try:
                    async with asyncio.timeout(remaining):  # not wait_for: in 3.11 it can swallow a cancel
                        await changed.wait()
                except TimeoutError:
                    break
            late = not timeline.complete(turn)
            texts, events = self.inbox.take(turn)
            micro_turn = MicroTurn(self.session_id, self.base + turn, timeline.take(), self.video.current(), texts,
                                   events, late)
            self.levels_dbfs.append(round(rms_dbfs(micro_turn.audio), 1))
            self.dispatched += 1
            self.late += late
            submit(micro_turn)
