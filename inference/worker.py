"""``microturn worker``: the engine as its own service, which gateways reach over WebSockets.

A worker hosts one :class:`~inference.engine.Engine` (and so one model). Each gateway holds one WebSocket to it
(``GET /v1/worker``) and multiplexes its sessions over it in the protocol of :mod:`microturn.wire`. The worker
reports its load (sessions, capacity, draining) on every connection each second, and gateways choose workers by it.

When a gateway's connection drops, the worker closes that gateway's sessions. On SIGTERM the worker drains: it
reports ``draining``, ``/readyz`` turns 503, gateways move its sessions to other workers (rebuilding their context
from the conversation log), and the worker exits when it holds no session or after ``drain_timeout_s``.

HTTP routes: ``/v1/worker`` (WebSocket), ``/livez``, ``/readyz`` (503 while draining or full), ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Iterator

from aiohttp import WSMsgType, web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from inference.engine import Engine
from inference.metrics import engine_metrics
from inference.models import load_backend
from microturn import wire
from microturn.config import Settings
from microturn.contracts import MicroTurn, MicroTurnOutput, SessionClosed, TurnNotStepped
from microturn.service import serve_until_signalled

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 64 * 2**20  # an OPEN frame carries a session's whole context history
LOAD_INTERVAL_S = 1.0
SEND_QUEUE_FRAMES = 4096  # frames waiting to go to one gateway; a gateway that stops reading is disconnected


class _Connection:
    """One gateway's WebSocket: frames out through a bounded queue, the sessions it opened."""

    def __init__(self, ws: web.WebSocketResponse, peer: str) -> None:
        self.ws = ws
        self.peer = peer
        self.sessions: set[str] = set()
        self.queued: dict[str, int] = {}  # session → its micro-turns waiting in the engine
        self.out: asyncio.Queue[bytes] = asyncio.Queue(SEND_QUEUE_FRAMES)

    def send(self, frame: bytes) -> None:
        try:
            self.out.put_nowait(frame)
        except asyncio.QueueFull:
            log.error("gateway %s does not read its frames; disconnecting it", self.peer)
            asyncio.ensure_future(self.ws.close(message=b"not reading"))

    async def write(self) -> None:
        while True:
            frame = await self.out.get()
            await self.ws.send_bytes(frame)


class Worker:
    """The worker's engine, its gateways' connections, and which connection opened which session."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.capacity = settings.worker_capacity
        self.draining = False
        self.owner: dict[str, _Connection] = {}  # session → the connection that opened it
        self.connections: set[_Connection] = set()
        self.frame_errors = 0
        self.turns_refused = 0

    @property
    def sessions(self) -> int:
        return len(self.owner)

    def load(self) -> dict[str, object]:
        return {"sessions": self.sessions, "capacity": self.capacity, "draining": self.draining}

    def broadcast_load(self) -> None:
        frame = wire.encode(wire.Kind.LOAD, self.load())
        for conn in self.connections:
            conn.send(frame)

    async def serve(self, request: web.Request) -> web.StreamResponse:
        token = self.settings.worker_token
        if token and not hmac.compare_digest(request.headers.get("Authorization", ""), f"Bearer {token}"):
            return web.json_response({"error": {"code": "unauthorized", "message": "send the worker token as "
                                                "'Authorization: Bearer TOKEN'"}}, status=401)
        ws = web.WebSocketResponse(max_msg_size=MAX_FRAME_BYTES, heartbeat=5.0)
        await ws.prepare(request)
        conn = _Connection(ws, request.remote or "?")
        self.connections.add(conn)
        log.info("gateway %s connected", conn.peer)
        conn.send(wire.encode(wire.Kind.HELLO, {"worker_id": self.settings.worker_id, "model": self.settings.model,
                                                **self.load()}))
        writer = asyncio.create_task(conn.write(), name=f"worker-send-{conn.peer}")
        try:
            async for msg in ws:
                if msg.type != WSMsgType.BINARY:
                    if msg.type == WSMsgType.TEXT:
                        await ws.close(message=b"binary frames only")
                    continue
                try:
                    self._handle(conn, wire.decode(msg.data))
                except wire.WireError as exc:
                    self.frame_errors += 1
                    log.warning("bad frame from gateway %s: %s", conn.peer, exc)
                    await ws.close(code=1003, message=f"bad frame: {exc}"[:120].encode())
        finally:
            writer.cancel()
            self.connections.discard(conn)
            for sid in list(conn.sessions):
                await self._close(sid, conn)
            log.info("gateway %s disconnected", conn.peer)
        return ws

    def _handle(self, conn: _Connection, frame: wire.Frame) -> None:
        if frame.kind == wire.Kind.OPEN:
            sid = str(frame.header.get("sid", ""))
            asyncio.ensure_future(self._open(conn, sid, int(frame.header.get("seed", 0)), frame.blobs,
                                             bool(frame.header.get("restore", False))))
        elif frame.kind == wire.Kind.TURN:
            self._turn(conn, wire.decode_turn(frame))
        elif frame.kind == wire.Kind.CLOSE:
            sid = str(frame.header.get("sid", ""))
            if self.owner.get(sid) is conn:
                asyncio.ensure_future(self._close(sid, conn))
        else:
            raise wire.WireError(f"a gateway does not send {frame.kind.name}")

    async def _open(self, conn: _Connection, sid: str, seed: int, history: list[bytes], restore: bool) -> None:
        def opened(error: str | None = None) -> None:
            conn.send(wire.encode(wire.Kind.OPENED, {"sid": sid, **({"error": error} if error else {})}))

        previous = self.owner.get(sid)
        if previous is not None:  # the session moved to another gateway (or is reopened): the newest open wins
            await self._close(sid, previous)
        if self.draining:
            return opened("worker is draining")
        if self.sessions >= self.capacity:
            return opened(f"worker is full ({self.capacity} sessions)")
        self.owner[sid] = conn
        conn.sessions.add(sid)
        try:
            await self.engine.open_session(sid, seed, history if restore else None)
        except Exception as exc:
            log.exception("could not open session %s", sid, extra={"session_id": sid})
            self.owner.pop(sid, None)
            conn.sessions.discard(sid)
            return opened(f"{type(exc).__name__}: {exc}")
        log.info("session %s opened for gateway %s (%d context records)", sid, conn.peer, len(history),
                 extra={"session_id": sid})
        opened()
        self.broadcast_load()

    async def _close(self, sid: str, conn: _Connection) -> None:
        if self.owner.get(sid) is not conn:
            return
        del self.owner[sid]
        conn.sessions.discard(sid)
        conn.queued.pop(sid, None)
        await self.engine.close_session(sid)
        self.broadcast_load()

    def _turn(self, conn: _Connection, turn: MicroTurn) -> None:
        sid, index = turn.session_id, turn.index

        def failed(error: str) -> None:
            self.turns_refused += 1
            conn.send(wire.encode(wire.Kind.FAILED, {"sid": sid, "index": index, "error": error}))

        if self.owner.get(sid) is not conn:
            return failed("session is not open on this worker")
        if conn.queued.get(sid, 0) >= wire.MAX_QUEUED_PER_SESSION:
            return failed(f"worker overloaded: {wire.MAX_QUEUED_PER_SESSION} micro-turns already queued")
        conn.queued[sid] = conn.queued.get(sid, 0) + 1
        received = time.perf_counter()
        future = self.engine.submit(turn)

        def done(f: asyncio.Future[MicroTurnOutput]) -> None:
            if sid in conn.queued:
                conn.queued[sid] -= 1
            exc = None if f.cancelled() else f.exception()
            if f.cancelled() or isinstance(exc, SessionClosed):
                return
            if exc is not None:
                failed(str(exc) if isinstance(exc, TurnNotStepped) else f"{type(exc).__name__}: {exc}")
            else:
                conn.send(wire.encode_output(f.result(), time.perf_counter() - received))

        future.add_done_callback(done)

    async def drain(self, timeout_s: float) -> None:
        """Take no new sessions, tell the gateways, and wait until they have moved theirs (or the timeout)."""
        self.draining = True
        self.broadcast_load()
        log.info("draining: %d sessions, up to %.0f s", self.sessions, timeout_s)
        deadline = time.monotonic() + timeout_s
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.1)


WORKER = web.AppKey("worker", Worker)
SETTINGS = web.AppKey("settings", Settings)


class WorkerCollector(Collector):
    """The worker's Prometheus metrics (names in infra/RUNBOOK.md and README.md)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def collect(self) -> Iterator[Metric]:
        w = self.worker
        yield GaugeMetricFamily("microturn_engine_sessions", "Sessions open on this engine", value=w.sessions)
        yield GaugeMetricFamily("microturn_engine_capacity", "Sessions this engine takes at most", value=w.capacity)
        yield GaugeMetricFamily("microturn_worker_draining", "1 while draining", value=int(w.draining))
        yield GaugeMetricFamily("microturn_worker_gateways", "Gateways connected", value=len(w.connections))
        yield CounterMetricFamily("microturn_worker_refused_turns", "Micro-turns answered with FAILED",
                                  value=w.turns_refused)
        yield CounterMetricFamily("microturn_worker_frame_errors", "Bad frames received (connection closed)",
                                  value=w.frame_errors)
        yield from engine_metrics(w.engine)


async def _livez(request: web.Request) -> web.Response:
    return web.json_response({"status": "live"})


async def _readyz(request: web.Request) -> web.Response:
    w = request.app[WORKER]
    ready = not w.draining and w.sessions < w.capacity
    return web.json_response({"status": "ready" if ready else ("draining" if w.draining else "full"), **w.load()},
                             status=200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkerCollector(request.app[WORKER]))
    return web.Response(body=generate_latest(registry), content_type="text/plain", charset="utf-8")


async def _socket(request: web.Request) -> web.StreamResponse:
    return await request.app[WORKER].serve(request)


async def _worker_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    backend = await asyncio.get_running_loop().run_in_executor(
        None, load_backend, settings.model, settings.checkpoint, settings.device)
    engine = Engine(backend, tick_budget_ms=settings.tick_budget_ms)
    await engine.start()
    worker = Worker(settings, engine)
    app[WORKER] = worker

    async def report() -> None:
        while True:
            await asyncio.sleep(LOAD_INTERVAL_S)
            worker.broadcast_load()

    reporter = asyncio.create_task(report(), name="load-report")
    yield
    reporter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reporter
    for conn in list(worker.connections):
        await conn.ws.close(message=b"worker shutting down")
    await engine.stop()


def create_worker_app(settings: Settings) -> web.Application:
    """Build the worker application for ``settings``."""
    app = web.Application()
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_worker_ctx)
    app.router.add_get("/v1/worker", _socket)
    app.router.add_get("/livez", _livez)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app


async def run_worker(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then drain and shut down."""

    async def drain(app: web.Application) -> None:
        await app[WORKER].drain(settings.drain_timeout_s)

    await serve_until_signalled(create_worker_app(settings), settings.host, settings.port, drain)
