"""The gateway's registry of sessions: creating, looking up and ending them, and the totals they leave behind.

HTTP handlers (:mod:`webrtc_gateway.api`) stay thin and call this; it owns every
:class:`~webrtc_gateway.session.GatewaySession` of the process and the session records in the store.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from dataclasses import dataclass, field

from inference.background.reasoner import ReasonerSpec
from inference.background.runner import BackgroundRunner
from inference.background.tools import ToolConfig
from microturn.config import Settings
from microturn.contracts import MICRO_TURN_MS, MicroTurnEngine, SessionRecord
from microturn.histogram import SECONDS_BUCKETS, Histogram
from webrtc_gateway.background import SessionBackground
from webrtc_gateway.conversation_log import ConversationLog
from webrtc_gateway.routing import new_session_id
from webrtc_gateway.session import GatewaySession, ResumePlan
from webrtc_gateway.store import SessionStore
from webrtc_gateway.tokens import TokenError, TokenSigner

log = logging.getLogger(__name__)


class GatewayFull(Exception):
    """No room for another session on this gateway."""


class UnknownSession(Exception):
    """No such session on this gateway."""


class AlreadyConnected(Exception):
    """The session already has a peer connection."""


class Draining(Exception):
    """The gateway is draining: it takes no new sessions or connections."""


class ResumeRefused(TokenError):
    """The resume token is not the session's current one (already used, replaced, or the session is gone)."""


MAX_GAP_TURNS = 50  # a longer gap between a session's last logged micro-turn and its resume counts as 10 s


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Grant:
    """What a browser gets to connect (and later resume) a session."""

    record: SessionRecord
    token: str  # connect scope: POST the offer with it
    resume_token: str  # resume scope: POST /resume with it, once


@dataclass
class Pending:
    """A session created or resumed on this gateway, waiting for its offer."""

    created: float = field(default_factory=time.monotonic)
    resume_from_turn: int | None = None  # the last micro-turn the browser saw, when resuming


@dataclass
class Totals:
    """Counters of sessions that have ended, so that metrics never go backwards."""

    sessions_closed: int = 0
    micro_turns: int = 0
    late_micro_turns: int = 0
    frames_out: int = 0
    underrun_frames: int = 0
    missed_slots: int = 0
    turns_not_stepped: int = 0


class Gateway:
    """All sessions of this gateway process."""

    def __init__(self, settings: Settings, engine: MicroTurnEngine, store: SessionStore) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.signer = TokenSigner(settings.token_secret)
        self.pending: dict[str, Pending] = {}  # created or resumed here, no offer yet
        self.live: dict[str, GatewaySession] = {}
        self.totals = Totals()
        self.turn_latency = Histogram(SECONDS_BUCKETS)  # micro-turn submitted → output back, all sessions
        self.draining = False
        self.log = ConversationLog(store, settings.gateway_id, self._moved)
        self.runner = BackgroundRunner(reasoner_spec(settings), workers=settings.background_workers,
                                       per_session=settings.background_max_tasks,
                                       timeout_s=settings.background_timeout_s)

    @property
    def session_count(self) -> int:
        return len(self.pending) + len(self.live)

    def _check_room(self) -> None:
        if self.draining:
            raise Draining("this gateway is draining; use another one")
        if self.session_count >= self.settings.max_sessions:
            raise GatewayFull(f"this gateway holds its maximum of {self.settings.max_sessions} sessions")

    def _grant(self, record: SessionRecord) -> Grant:
        resume_token = self.signer.issue(record.session_id, "resume", self.settings.resume_ttl_s)
        record.resume_hash = token_hash(resume_token)
        connect = self.signer.issue(record.session_id, "connect", self.settings.token_ttl_s)
        return Grant(record, connect, resume_token)

    async def create(self) -> Grant:
        """Make a new session; returns its record and tokens."""
        self._check_room()
        now = time.time()
        sid = new_session_id(self.settings.process_index, self.settings.processes)
        record = SessionRecord(session_id=sid, owner=self.settings.gateway_id, model=self.settings.model, created=now,
                               last_seen=now, micro_turn=-1, seed=secrets.randbits(31),
                               owner_url=self.settings.advertise_url or "")
        grant = self._grant(record)
        await self.store.put(record)
        self.pending[record.session_id] = Pending()
        return grant

    async def resume(self, session_id: str, resume_token: str, last_turn_seen: int) -> Grant:
        """Move a session here (from whichever gateway had it); the token rotates. Then the browser offers."""
        self._check_room()
        try:
            self.signer.verify(resume_token, session_id, "resume")
        except TokenError as exc:
            raise ResumeRefused(str(exc), exc.forbidden) from exc
        record = await self.store.get(session_id)
        if record is None:
            raise UnknownSession("no such session (it ended or expired)")
        grant = self._grant(record)
        if not await self.store.claim(session_id, token_hash(resume_token), record.resume_hash,
                                      self.settings.gateway_id, self.settings.advertise_url or ""):
            raise ResumeRefused("this resume token was already used or replaced")
        here = self.live.get(session_id)
        if here is not None:  # resumed on the gateway that has it (the browser lost its connection)
            await here.close("resumed by the browser", keep_state=True)
        self.pending[session_id] = Pending(resume_from_turn=last_turn_seen)
        log.info("session %s resumed here from %s", session_id, record.owner)
        return grant

    def _moved(self, session_id: str) -> None:
        session = self.live.get(session_id)
        if session is not None:
            asyncio.ensure_future(session.close("the session moved to another gateway", keep_state=True))

    async def _resume_plan(self, session_id: str, last_turn_seen: int) -> ResumePlan:
        await self.log.flushed()
        history, last_time = await self.store.history(session_id)
        last_turn = history[-1][0] if history else -1
        gap = 0
        if last_time is not None:
            gap = min(MAX_GAP_TURNS, int((time.time() - last_time) * 1000 // MICRO_TURN_MS))
        said = await self.store.messages_after(session_id, -1)
        missed = [m for m in said if int(m.get("turn", -1)) > last_turn_seen]
        tasks, delivered = await self.store.tasks(session_id)
        return ResumePlan([context for _, context in history], last_turn + 1, gap, missed, tasks, delivered, said)

    async def connect(self, session_id: str, offer_sdp: str) -> str:
        """Accept the browser's offer for a created session; returns the answer SDP."""
        if self.draining:
            raise Draining("this gateway is draining; start the session on another one")
        if session_id in self.live:
            raise AlreadyConnected("this session already has a connection")
        pending = self.pending.pop(session_id, None)
        if pending is None:
            raise UnknownSession("no such session on this gateway")
        record = await self.store.get(session_id)
        if record is None:
            raise UnknownSession("no such session (it ended or expired)")
        plan = None
        if pending.resume_from_turn is not None:
            plan = await self._resume_plan(session_id, pending.resume_from_turn)
        session = GatewaySession(session_id, record.seed, self.settings, self.engine, self.log, self._closed,
                                 SessionBackground(session_id, self.runner, self.store), self.turn_latency)
        self.live[session_id] = session
        try:
            answer = await session.accept(offer_sdp, plan)
        except BaseException:
            await session.close("offer refused", keep_state=plan is not None)
            raise
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
        await session.close(reason, keep_state=False)

    async def _closed(self, session: GatewaySession) -> None:
        self.live.pop(session.session_id, None)
        t = self.totals
        t.sessions_closed += 1
        t.micro_turns += session.clock.dispatched
        t.late_micro_turns += session.clock.late
        t.frames_out += session.playout.frames_out
        t.underrun_frames += session.playout.underrun_frames
        t.missed_slots += session.playout.missed_slots
        t.turns_not_stepped += session.turns_not_stepped
        if session.keep_state:
            return  # the browser may resume it here or elsewhere; the store's TTL ends it otherwise
        try:
            await self.log.flushed()
            await self.store.delete(session.session_id)
        except Exception:
            log.exception("could not delete the state of session %s", session.session_id)

    async def expire_pending(self) -> None:
        """Forget sessions that were created but never got an offer within the token lifetime."""
        cutoff = time.monotonic() - self.settings.token_ttl_s
        for sid in [sid for sid, p in self.pending.items() if p.created < cutoff]:
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
        await asyncio.gather(*(s.close("gateway shutting down", keep_state=True) for s in list(self.live.values())))
        for sid in list(self.pending):
            await self.end(sid, "gateway shutting down")
        await self.runner.close()


def reasoner_spec(settings: Settings) -> ReasonerSpec:
    """The background model a gateway's workers run, from its settings."""
    tools = ToolConfig(documents=settings.background_documents, http_allowlist=settings.background_http_allow)
    return ReasonerSpec(settings.background_reasoner, tools, settings.background_openai_url,
                        settings.background_openai_key, settings.background_openai_model,
                        openai_timeout_s=settings.background_timeout_s)
