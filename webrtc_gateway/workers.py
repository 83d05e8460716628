"""Remote inference workers, as the gateway sees them: one engine made of many ``microturn worker`` processes.

:class:`RemoteEngine` has the interface of the in-process engine (:class:`~microturn.contracts.MicroTurnEngine`),
so sessions do not know where their model runs. Behind it:

- **Links.** One WebSocket per worker (:class:`WorkerLink`, protocol in :mod:`microturn.wire`), reconnecting with
  back-off. Each ``--workers`` URL is resolved every few seconds and every address it names is a worker, so a
  Kubernetes headless Service name reaches every worker pod.
- **Placement.** A session sticks to one worker. It goes to the worker it is assigned to in the session store (after
  the browser resumed the session on another gateway), else to the least loaded worker by the load the workers
  report (sessions / capacity, counting every gateway's sessions). The assignment is written to the store.
- **Moves.** When a worker dies (its link drops) or drains (it says so), each of its sessions is moved: the gateway
  rebuilds the model's context on another worker from the conversation log (the store's log, plus the last outputs
  the log has not written yet), then sends again, in order, the micro-turns the old worker never answered. The
  browser's connection is untouched; it hears a gap. A drain first lets the old worker answer what it has.
- **Backpressure.** Micro-turns wait in the gateway until answered; while a session has no worker (moving, or none
  up) they are held, and held ones older than :data:`HOLD_LIMIT_S` fail with
  :class:`~microturn.contracts.TurnNotStepped` (silence for the browser, nothing in the model's context).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

from microturn import wire
from microturn.contracts import MicroTurn, MicroTurnOutput, SessionClosed, TurnNotStepped
from microturn.histogram import SECONDS_BUCKETS, Histogram
from webrtc_gateway.store import SessionStore, StoreUnavailable

log = logging.getLogger(__name__)

RESOLVE_INTERVAL_S = 5.0
OPEN_TIMEOUT_S = 30.0  # rebuilding a long session's context takes a worker about half a second per 3,000 turns
HOLD_LIMIT_S = 2.0  # a micro-turn unanswered this long while its session has no worker fails
RECENT_TURNS = 600  # outputs remembered per session (2 minutes), for log entries Redis has not got yet
DRAIN_WAIT_S = 2.0  # how long a draining worker may take to answer a moving session's sent micro-turns


class WorkerUnavailable(TurnNotStepped):
    """No worker can take the session now."""


@dataclass
class _Turn:
    turn: MicroTurn
    future: asyncio.Future[MicroTurnOutput]
    queued: float  # perf_counter when submitted
    sent: float | None = None  # perf_counter when last sent to a worker; None: held


@dataclass
class _Session:
    session_id: str
    seed: int
    link: WorkerLink | None = None
    turns: dict[int, _Turn] = field(default_factory=dict)  # unanswered, in index order
    recent: deque[tuple[int, bytes]] = field(default_factory=lambda: deque(maxlen=RECENT_TURNS))
    move: asyncio.Task[None] | None = None


class WorkerLink:
    """One WebSocket to one worker, and what that worker last said of itself."""

    def __init__(self, url: str, engine: RemoteEngine) -> None:
        self.url = url
        self.engine = engine
        self.worker_id: str | None = None
        self.capacity = 0
        self.load = 0  # sessions on the worker, all gateways
        self.draining = False
        self.up = False
        self.opening: dict[str, asyncio.Future[str | None]] = {}
        self._out: asyncio.Queue[bytes] = asyncio.Queue()
        self._connected = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"worker-link-{self.url}")

    async def stop(self) -> None:
        """Close the link for good; its sessions are not moved (the caller closes or moves them)."""
        self.up = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def send(self, frame: bytes) -> None:
        """Queue a frame for the worker, in order; dropped when the link is down (the session moves anyway)."""
        if self._connected:
            self._out.put_nowait(frame)

    async def _write(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):  # a dead link is noticed by its reader
            while True:
                await ws.send_bytes(await self._out.get())

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            try:
                await self._connect_and_read()
                backoff = 0.2
            except (TimeoutError, aiohttp.ClientError, OSError, wire.WireError) as exc:
                log.debug("worker %s: %s", self.url, exc)
            finally:
                self.lost()
            await asyncio.sleep(backoff)
            backoff = min(5.0, backoff * 2)

    async def _connect_and_read(self) -> None:
        e = self.engine
        async with e.http.ws_connect(self.url, headers=e.auth, heartbeat=5.0, max_msg_size=0,
                                     timeout=aiohttp.ClientWSTimeout(ws_close=2.0)) as ws:
            self._connected = True
            writer = asyncio.create_task(self._write(ws), name=f"worker-send-{self.url}")
            try:
                await self._read(ws)
            finally:
                writer.cancel()

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        e = self.engine
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.BINARY:
                continue
            frame = wire.decode(msg.data)
            if frame.kind in (wire.Kind.HELLO, wire.Kind.LOAD):
                self._report(frame.header)
            elif frame.kind == wire.Kind.OPENED:
                waiter = self.opening.pop(str(frame.header.get("sid")), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(frame.header.get("error"))
            elif frame.kind == wire.Kind.OUTPUT:
                output, worker_s = wire.decode_output(frame)
                e.answered(self, output, worker_s)
            elif frame.kind == wire.Kind.FAILED:
                e.failed(self, str(frame.header.get("sid")), int(frame.header.get("index", -1)),
                         str(frame.header.get("error", "")))
            else:
                raise wire.WireError(f"a worker does not send {frame.kind.name}")

    def _report(self, header: dict[str, Any]) -> None:
        was_draining = self.draining
        if "worker_id" in header:
            self.worker_id = str(header["worker_id"])
            if not self.up:
                log.info("worker %s up at %s", self.worker_id, self.url)
            self.up = True
        self.capacity = int(header.get("capacity", 0))
        self.load = int(header.get("sessions", 0))
        self.draining = bool(header.get("draining", False))
        if self.draining and not was_draining:
            log.info("worker %s is draining; moving its sessions", self.worker_id)
            self.engine.move_all(self, graceful=True)

    def lost(self) -> None:
        """The connection is gone: fail pending opens, and move this worker's sessions elsewhere."""
        self._connected = False
        self._out = asyncio.Queue()
        for waiter in self.opening.values():
            if not waiter.done():
                waiter.set_result("connection lost")
        self.opening.clear()
        if self.up:
            log.warning("worker %s at %s is gone; moving its sessions", self.worker_id, self.url)
            self.up = False
            self.engine.move_all(self, graceful=False)


@dataclass
class RemoteStats:
    """What ``/metrics`` and ``microturn bench cluster`` read."""

    reassignments: int = 0
    turns_resent: int = 0
    hop_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=65536))
    round_trip_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=65536))  # sent → output back
    hop_hist: Histogram = field(default_factory=lambda: Histogram(SECONDS_BUCKETS))


class RemoteEngine:
    """Sessions' micro-turns stepped by remote workers (see the module docstring)."""

    def __init__(self, urls: tuple[str, ...], token: str, store: SessionStore) -> None:
        if not urls:
            raise ValueError("RemoteEngine needs at least one worker URL")
        for url in urls:
            if URL(url).scheme not in ("ws", "wss"):
                raise ValueError(f"worker URL {url!r} must be ws://HOST:PORT/v1/worker (or wss://)")
        self.urls = urls
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.store = store
        self.links: dict[str, WorkerLink] = {}
        self.stats = RemoteStats()
        self._sessions: dict[str, _Session] = {}
        self._resolver: asyncio.Task[None] | None = None
        self.http: aiohttp.ClientSession

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def up(self) -> list[WorkerLink]:
        return [link for link in self.links.values() if link.up]

    def placement(self) -> dict[str, int]:
        """Sessions of this gateway per worker id."""
        counts: dict[str, int] = {}
        for s in self._sessions.values():
            if s.link is not None:
                key = s.link.worker_id or s.link.url
                counts[key] = counts.get(key, 0) + 1
        return counts

    async def start(self) -> None:
        self.http = aiohttp.ClientSession()
        await self._resolve()
        self._resolver = asyncio.create_task(self._keep_resolving(), name="resolve-workers")

    async def stop(self) -> None:
        if self._resolver is not None:
            self._resolver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resolver
        for sid in list(self._sessions):
            await self.close_session(sid)
        for link in self.links.values():
            await link.stop()
        await self.http.close()

    async def wait_for_workers(self, count: int = 1, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.up()) < count:
            if time.monotonic() > deadline:
                raise WorkerUnavailable(f"{len(self.up())} of {count} workers up after {timeout_s:.0f} s")
            await asyncio.sleep(0.05)

    # -- the engine interface -------------------------------------------------------------------------------

    async def open_session(self, session_id: str, seed: int = 0, history: list[bytes] | None = None) -> None:
        if session_id in self._sessions:
            raise ValueError(f"session {session_id} is already open")
        s = self._sessions[session_id] = _Session(session_id, seed)
        try:
            prefer = None
            with contextlib.suppress(StoreUnavailable):
                prefer = await self.store.worker_of(session_id)
            await self._place(s, history, prefer=prefer)
        except BaseException:
            self._sessions.pop(session_id, None)
            raise

    def submit(self, turn: MicroTurn) -> asyncio.Future[MicroTurnOutput]:
        s = self._sessions.get(turn.session_id)
        if s is None:
            raise SessionClosed(turn.session_id)
        future: asyncio.Future[MicroTurnOutput] = asyncio.get_running_loop().create_future()
        t = s.turns[turn.index] = _Turn(turn, future, time.perf_counter())
        if s.move is None and s.link is not None and s.link.up:
            self._send(s.link, t)
        else:
            self._expire_held(s)
        return future

    async def close_session(self, session_id: str) -> None:
        s = self._sessions.pop(session_id, None)
        if s is None:
            return
        if s.move is not None:
            s.move.cancel()
        for t in s.turns.values():
            if not t.future.done():
                t.future.set_exception(SessionClosed(session_id))
        if s.link is not None:
            s.link.send(wire.encode(wire.Kind.CLOSE, {"sid": session_id}))

    # -- frames from links ----------------------------------------------------------------------------------

    def answered(self, link: WorkerLink, output: MicroTurnOutput, worker_s: float) -> None:
        s = self._sessions.get(output.session_id)
        if s is None or s.link is not link:
            return  # a session closed or moved since: its old worker's answer is stale
        t = s.turns.pop(output.index, None)
        if t is None or t.sent is None:
            return
        now = time.perf_counter()
        hop = max(0.0, now - t.sent - worker_s)
        self.stats.hop_seconds.append(hop)
        self.stats.hop_hist.observe(hop)
        self.stats.round_trip_seconds.append(now - t.sent)
        s.recent.append((output.index, output.context))
        if not t.future.done():
            t.future.set_result(output)

    def failed(self, link: WorkerLink, session_id: str, index: int, error: str) -> None:
        s = self._sessions.get(session_id)
        if s is None or s.link is not link:
            return
        t = s.turns.pop(index, None)
        if t is not None and not t.future.done():
            t.future.set_exception(TurnNotStepped(f"worker {link.worker_id}: {error}"))

    def move_all(self, link: WorkerLink, graceful: bool) -> None:
        for s in self._sessions.values():
            if s.link is link and s.move is None:
                s.move = asyncio.create_task(self._move(s, graceful), name=f"move-{s.session_id}")

    # -- placement and moves --------------------------------------------------------------------------------

    def _choose(self, prefer: str | None, exclude: set[WorkerLink]) -> list[WorkerLink]:
        """Candidate workers, best first: the preferred one, then by load."""
        ok = [w for w in self.up() if not w.draining and w.load < w.capacity and w not in exclude]
        ok.sort(key=lambda w: (w.worker_id != prefer, w.load / max(1, w.capacity)))
        return ok

    async def _place(self, s: _Session, history: list[bytes] | None, prefer: str | None = None,
                     exclude: set[WorkerLink] | None = None) -> None:
        """Open ``s`` on the best worker that accepts it; :class:`WorkerUnavailable` if none does."""
        errors = []
        for link in self._choose(prefer, exclude or set()):
            waiter: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
            link.opening[s.session_id] = waiter
            link.load += 1  # until its next report, so that a burst of sessions spreads
            restore = history is not None
            link.send(wire.encode(wire.Kind.OPEN, {"sid": s.session_id, "seed": s.seed, "restore": restore},
                                  history or []))
            try:
                error = await asyncio.wait_for(waiter, OPEN_TIMEOUT_S)
            except TimeoutError:
                error = f"no answer in {OPEN_TIMEOUT_S:.0f} s"
            finally:
                link.opening.pop(s.session_id, None)
            if error is None:
                s.link = link
                with contextlib.suppress(StoreUnavailable):
                    await self.store.set_worker(s.session_id, link.worker_id or link.url)
                return
            link.load -= 1
            errors.append(f"{link.worker_id}: {error}")
        raise WorkerUnavailable("no inference worker can take the session" +
                                (f" ({'; '.join(errors)})" if errors else ": none is up"))

    async def _history(self, s: _Session) -> list[bytes]:
        """The context records of every micro-turn the session's model has answered, in order."""
        logged, _ = await self.store.history(s.session_id)
        last = logged[-1][0] if logged else -1
        if len(s.recent) == s.recent.maxlen and s.recent[0][0] > last + 1:  # outputs in between are forgotten
            raise StoreUnavailable(f"the conversation log ends at micro-turn {last}, too far behind to rebuild from")
        return [c for _, c in logged] + [c for i, c in s.recent if i > last]

    async def _move(self, s: _Session, graceful: bool) -> None:
        old = s.link
        started = time.monotonic()
        if graceful and old is not None:  # let the draining worker answer what it was sent
            while any(t.sent is not None for t in s.turns.values()) and old.up:
                if time.monotonic() - started > DRAIN_WAIT_S:
                    break
                await asyncio.sleep(0.01)
            old.send(wire.encode(wire.Kind.CLOSE, {"sid": s.session_id}))
        s.link = None
        while True:
            self._expire_held(s)
            try:
                await self._place(s, await self._history(s), exclude={old} if old is not None else set())
                break
            except (WorkerUnavailable, StoreUnavailable) as exc:
                log.warning("session %s: cannot move yet (%s); retrying", s.session_id, exc,
                            extra={"session_id": s.session_id})
                await asyncio.sleep(0.5)
        self.stats.reassignments += 1
        assert s.link is not None
        for t in list(s.turns.values()):  # what the old worker never answered, in order
            if t.sent is not None:
                self.stats.turns_resent += 1
            self._send(s.link, t)
        log.info("session %s moved from %s to %s in %.0f ms", s.session_id, old.worker_id if old else None,
                 s.link.worker_id, (time.monotonic() - started) * 1000, extra={"session_id": s.session_id})
        s.move = None

    def _send(self, link: WorkerLink, t: _Turn) -> None:
        t.sent = time.perf_counter()
        link.send(wire.encode_turn(t.turn))

    def _expire_held(self, s: _Session) -> None:
        cutoff = time.perf_counter() - HOLD_LIMIT_S
        for index, t in list(s.turns.items()):
            if t.queued < cutoff:
                del s.turns[index]
                if not t.future.done():
                    t.future.set_exception(WorkerUnavailable("no worker answered within "
                                                             f"{HOLD_LIMIT_S:.0f} s (worker moving)"))

    # -- finding workers ------------------------------------------------------------------------------------

    async def _keep_resolving(self) -> None:
        while True:
            await asyncio.sleep(RESOLVE_INTERVAL_S)
            await self._resolve()

    async def _resolve(self) -> None:
        wanted: set[str] = set()
        for url in self.urls:
            found = await _addresses(url)
            if found is None:
                return  # keep the workers we have until the name resolves again
            wanted.update(found)
        for url in wanted - self.links.keys():
            link = self.links[url] = WorkerLink(url, self)
            link.start()
        for url in self.links.keys() - wanted:  # a worker pod that is gone from the name: move its sessions
            link = self.links.pop(url)
            link.lost()
            await link.stop()


async def _addresses(url: str) -> set[str] | None:
    """``url`` once per address its host names (a headless Service name names every worker pod); None when the
    name does not resolve now."""
    parsed = URL(url)
    host = parsed.host or ""
    try:
        ipaddress.ip_address(host)
        return {url}
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, parsed.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        log.warning("worker host %s does not resolve: %s", host, exc)
        return None
    return {str(parsed.with_host(str(info[4][0]))) for info in infos}
