"""The gateway's registry of sessions: creating, looking up and ending them, and the totals they leave behind.

HTTP handlers (:mod:`webrtc_gateway.api`) stay thin and call this; it owns every
:class:`~webrtc_gateway.session.GatewaySession` of the process and the session records in the store.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass

from inference.engine import Engine
from microturn.config import Settings
from microturn.contracts import SessionRecord
from webrtc_gateway.session import GatewaySession
from webrtc_gateway.store import SessionStore
from webrtc_gateway.tokens import TokenSigner

log = logging.getLogger(__name__)


class GatewayFull(Exception):
    """No room for another session on this gateway."""


class UnknownSession(Exception):
    """No such session on this gateway."""


class AlreadyConnected(Exception):
    """The session already has a peer connection."""


class Draining(Exception):
    """The gateway is draining: it takes no new sessions or connections."""


@dataclass
class Totals:
    """Counters of sessions that have ended, so that metrics never go backwards."""

    sessions_closed: int = 0
    micro_turns: int = 0
    late_micro_turns: int = 0
    frames_out: int = 0
    underrun_frames: int = 0


class Gateway:
    """All sessions of this gateway process."""

    def __init__(self, settings: Settings, engine: Engine, store: SessionStore) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.signer = TokenSigner(settings.token_secret)
        self.pending: dict[str, float] = {}  # created, no offer yet: session id → creation time
        self.live: dict[str, GatewaySession] = {}
        self.totals = Totals()
        self.draining = False

    @property
    def session_count(self) -> int:
        return len(self.pending) + len(self.live)

    async def create(self) -> tuple[SessionRecord, str]:
        """Make a new session; returns its record and a connect token."""
        if self.draining:
            raise Draining("this gateway is draining; create the session on another one")
        if self.session_count >= self.settings.max_sessions:
            raise GatewayFull(f"this gateway holds its maximum of {self.settings.max_sessions} sessions")
        now = time.time()
        record = SessionRecord(session_id=secrets.token_hex(16), owner=self.settings.gateway_id,
                               model=self.settings.model, created=now, last_seen=now, micro_turn=-1)
        await self.store.put(record)
        self.pending[record.session_id] = time.monotonic()
        token = self.signer.issue(record.session_id, "connect", self.settings.token_ttl_s)
        return record, token

    async def connect(self, session_id: str, offer_sdp: str) -> str:
        """Accept the browser's offer for a created session; returns the answer SDP."""
        if self.draining:
            raise Draining("this gateway is draining; start the session on another one")
        if session_id in self.live:
            raise AlreadyConnected("this session already has a connection")
        if session_id not in self.pending:
            raise UnknownSession("no such session on this gateway")
        del self.pending[session_id]
        session = GatewaySession(session_id, self.settings, self.engine, self._closed)
        self.live[session_id] = session
        try:
            answer = await session.accept(offer_sdp)
        except BaseException:
            await session.close("offer refused")
            raise
        record = await self.store.get(session_id)
        if record is not None:
            record.state, record.last_seen = "connected", time.time()
            await self.store.put(record)
        return answer

    async def end(self, session_id: str, reason: str) -> None:
        if self.pending.pop(session_id, None) is not None:
            await self.store.delete(session_id)
            return
        session = self.live.get(session_id)
        if session is None:
            raise UnknownSession("no such session on this gateway")
        await session.close(reason)

    async def _closed(self, session: GatewaySession) -> None:
        self.live.pop(session.session_id, None)
        t = self.totals
        t.sessions_closed += 1
        t.micro_turns += session.clock.dispatched
        t.late_micro_turns += session.clock.late
        t.frames_out += session.playout.frames_out
        t.underrun_frames += session.playout.underrun_frames
        try:
            await self.store.delete(session.session_id)
        except Exception:
            log.exception("could not delete the record of session %s", session.session_id)

    async def expire_pending(self) -> None:
        """Forget sessions that were created but never got an offer within the token lifetime."""
        cutoff = time.monotonic() - self.settings.token_ttl_s
        for sid in [sid for sid, created in self.pending.items() if created < cutoff]:
            await self.end(sid, "never connected")

    async def drain(self, timeout_s: float) -> None:
        """Stop taking sessions, let live ones go on for up to ``timeout_s``, then tell the rest to move."""
        self.draining = True
        log.info("draining: %d live sessions, up to %.0f s", len(self.live), timeout_s)
        deadline = time.monotonic() + timeout_s
        while self.live and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        for session in list(self.live.values()):
            session.send_reconnect("this gateway is shutting down; resume the session on another one")
        if self.live:
            await asyncio.sleep(0.5)  # let the messages leave before the peers close

    async def close_all(self) -> None:
        await asyncio.gather(*(s.close("gateway shutting down") for s in list(self.live.values())))
        for sid in list(self.pending):
            await self.end(sid, "gateway shutting down")
