"""The front of a multi-process gateway: one port, ``processes`` whole gateways behind it, one per core.

A gateway process runs all of its sessions' media on one event loop, so it uses about one core, and on a 2-core
machine 20 sessions saturate it (README, Benchmarks). ``microturn serve --processes N`` makes this process a front:
it starts N gateway processes (each :func:`webrtc_gateway.app.run` with its own engine, serving on a Unix socket)
and answers the HTTP API on the port by passing each request to one of them:

- ``POST /v1/sessions`` goes to the process with the fewest sessions. The session id it makes names that process
  (:mod:`webrtc_gateway.routing`), and every later ``/v1/sessions/{id}…`` call goes there by the id alone;
- ``/livez`` and ``/readyz`` are the front's own; ``/metrics`` is every process's, each sample labelled with its
  ``process``, plus ``microturn_gateway_processes`` and ``microturn_gateway_process_restarts_total``;
- anything else (the demo page, the widget) goes to the least loaded running process.

Media never passes through the front: each process offers its own ICE candidates, and browsers send RTP and the
data channel straight to it. A process that exits is started again; its sessions resume as after a gateway's loss.
On SIGTERM the front passes the signal on, keeps routing while the processes drain, and exits after the last one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from microturn import logs
from microturn.config import Settings
from microturn.service import serve_until_signalled
from webrtc_gateway import app as gateway_app
from webrtc_gateway import metrics
from webrtc_gateway.api import SETTINGS, body_limit, error, livez, whole_body
from webrtc_gateway.forward import forward
from webrtc_gateway.routing import process_of

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often the front asks each process for its state and load
START_TIMEOUT_S = 120.0  # a process that does not answer within this at start-up stops the front
STATES = ("ready", "draining", "no_worker", "starting", "down")
STABLE_S = 60.0  # a process that ran this long before it exited is started again at once
BACKOFF_MAX_S = 30.0  # the longest wait before starting again a process that keeps exiting soon after its start


def _process_main(settings: Settings, path: str) -> None:
    """The body of one gateway process: a whole gateway serving on the Unix socket ``path``."""
    with contextlib.suppress(OSError, AttributeError):  # Linux: a front killed outright still ends (drains) us
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    logs.configure(settings.log_level, settings.log_format)
    asyncio.run(gateway_app.run(settings, path))


@dataclass
class GatewayProcess:
    """One gateway process behind the front, as the front last saw it."""

    index: int
    settings: Settings
    path: str  # its Unix socket
    http: aiohttp.ClientSession
    process: BaseProcess | None = None
    state: str = "starting"  # one of STATES: what its /readyz said, or "down"
    sessions: int = 0  # its session count at the last poll, plus the sessions sent to it since
    restarts: int = 0
    started_at: float = 0.0  # time.monotonic() of its last start
    quick_exits: int = 0  # exits in a row, each within STABLE_S of its start
    restart_at: float | None = None  # when an exited process is to be started again

    def start(self) -> None:
        self.process = multiprocessing.get_context("spawn").Process(
            target=_process_main, args=(self.settings, self.path), name=f"microturn-gateway-{self.index}")
        self.process.start()
        self.state = "starting"
        self.started_at = time.monotonic()
        self.restart_at = None

    def due_restart(self, now: float) -> bool:
        """Whether this exited process should be started again now. It is, at once, after a run of
        :data:`STABLE_S` or more; a process that keeps exiting soon after its start waits 1, 2, 4 … up to
        :data:`BACKOFF_MAX_S` seconds first, so a crash loop does not spin."""
        if self.restart_at is None:
            self.quick_exits = self.quick_exits + 1 if now - self.started_at < STABLE_S else 0
            wait = min(BACKOFF_MAX_S, 2.0 ** (self.quick_exits - 1)) if self.quick_exits else 0.0
            code = self.process.exitcode if self.process else None
            log.error("gateway process %d exited (code %s); starting it again in %.0f s", self.index, code, wait)
            self.restart_at = now + wait
        return now >= self.restart_at

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    async def poll(self) -> None:
        try:
            async with self.http.get("http://microturn/readyz", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                body = await resp.json()
            self.state, self.sessions = str(body["status"]), int(body["sessions"])
        except (TimeoutError, aiohttp.ClientError, ValueError, KeyError):
            self.state = "starting" if self.alive else "down"

    async def forward(self, request: web.Request, body: bytes) -> web.Response:
        """Pass ``request`` (its ``body`` already read) to this process; its answer, as it gave it."""
        try:
            return await forward(self.http, "http://microturn", request, body)
        except (TimeoutError, aiohttp.ClientError):
            log.warning("gateway process %d did not answer %s %s", self.index, request.method, request.path)
            return error(503, "process_unavailable", "the gateway process for this request is restarting; retry",
                         {"Retry-After": "1"})


@dataclass
class Front:
    """The gateway processes of one front: starting, watching, choosing and stopping them."""

    settings: Settings
    sockets: Path  # a private folder for the processes' Unix sockets
    processes: list[GatewayProcess] = field(default_factory=list)
    draining: bool = False

    def __post_init__(self) -> None:
        n = self.settings.processes
        share = -(-self.settings.max_sessions // n)
        for i in range(n):
            settings = self.settings.replace(process_index=i, gateway_id=f"{self.settings.gateway_id}-{i}",
                                             max_sessions=share)
            path = str(self.sockets / f"gateway-{i}.sock")
            http = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path), auto_decompress=False,
                                         timeout=aiohttp.ClientTimeout(sock_connect=5, sock_read=60))
            self.processes.append(GatewayProcess(i, settings, path, http))

    async def start(self) -> None:
        """Start every process and wait until each answers."""
        for p in self.processes:
            p.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        for p in self.processes:
            while p.state != "ready":
                if not p.alive:
                    raise RuntimeError(f"gateway process {p.index} exited at start-up "
                                       f"(code {p.process.exitcode if p.process else None})")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gateway process {p.index} did not start within {START_TIMEOUT_S:.0f} s")
                await asyncio.sleep(0.1)
                await p.poll()
                if p.state in ("no_worker", "draining"):
                    break  # it runs; it is not ready for sessions, and /readyz says why
        log.info("front: %d gateway processes running", len(self.processes))

    async def watch(self) -> None:
        """Poll every process's state and load; start again any that exited (unless draining; see
        :meth:`GatewayProcess.due_restart`)."""
        while True:
            for p in self.processes:
                if not p.alive and not self.draining and p.due_restart(time.monotonic()):
                    p.restarts += 1
                    p.start()
            await asyncio.gather(*(p.poll() for p in self.processes))
            await asyncio.sleep(POLL_S)

    def for_session(self, session_id: str) -> GatewayProcess:
        return self.processes[process_of(session_id, len(self.processes))]

    def least_loaded(self, new_session: bool) -> GatewayProcess:
        """The ready process with the fewest sessions (else any that runs; it answers why it cannot take one)."""
        ready = [p for p in self.processes if p.alive and p.state == "ready"] or [p for p in self.processes if p.alive]
        chosen = min(ready or self.processes, key=lambda p: p.sessions)
        if new_session:
            chosen.sessions += 1  # until the next poll, so that a burst of new sessions spreads out
        return chosen

    async def drain(self) -> None:
        """Pass SIGTERM on to every process (each drains: see :meth:`Gateway.drain`) and wait until all exited."""
        self.draining = True
        for p in self.processes:
            if p.alive and p.process is not None:
                p.process.terminate()  # SIGTERM
        while any(p.alive for p in self.processes):
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        for p in self.processes:
            if p.alive and p.process is not None:
                p.process.terminate()
        for p in self.processes:
            if p.process is not None:
                await asyncio.to_thread(p.process.join, 10)
                if p.process.is_alive():
                    p.process.kill()
            await p.http.close()


FRONT = web.AppKey("front", Front)


def _draining() -> web.Response:
    return error(503, "draining", "this gateway is draining; use another one", {"Retry-After": "1"})


async def to_session(request: web.Request) -> web.Response:
    """A call of one session: to the process that holds it."""
    body = await whole_body(request)
    if isinstance(body, web.Response):
        return body
    front = request.app[FRONT]
    process = front.for_session(request.match_info["session_id"])
    if front.draining and not process.alive:
        return _draining()  # that process has drained and exited
    return await process.forward(request, body)


async def to_any(request: web.Request) -> web.Response:
    """A new session, or a call that belongs to no session: to the least loaded process."""
    body = await whole_body(request)
    if isinstance(body, web.Response):
        return body
    front = request.app[FRONT]
    new_session = request.method == "POST" and request.path == "/v1/sessions"
    if front.draining and (new_session or not any(p.alive for p in front.processes)):
        return _draining()
    return await front.least_loaded(new_session).forward(request, body)


async def readyz(request: web.Request) -> web.Response:
    """Ready while any process takes sessions; 503 while draining, or while none does (with each one's state)."""
    front = request.app[FRONT]
    states = [p.state for p in front.processes]
    sessions = sum(p.sessions for p in front.processes)
    if front.draining:
        status = "draining"
    elif "ready" in states:
        status = "ready"
    else:
        status = "no_worker" if "no_worker" in states else "starting"
    return web.json_response({"status": status, "sessions": sessions, "processes": states},
                             status=200 if status == "ready" else 503)


class _Merged(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merge_metrics(texts: dict[int, str]) -> list[Metric]:
    """The metric families of several processes (index → their ``/metrics`` text) as one set, every sample
    labelled with its ``process``."""
    families: dict[str, Metric] = {}
    for index, text in texts.items():
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                             family.unit))
            merged.samples.extend(s._replace(labels={**s.labels, "process": str(index)}) for s in family.samples)
    return list(families.values())


async def metrics_page(request: web.Request) -> web.Response:
    front = request.app[FRONT]

    async def text(p: GatewayProcess) -> str | None:
        try:
            async with p.http.get("http://microturn/metrics", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                return await resp.text() if resp.status == 200 else None
        except (TimeoutError, aiohttp.ClientError):
            return None

    answers = await asyncio.gather(*(text(p) for p in front.processes))
    families = merge_metrics({p.index: t for p, t in zip(front.processes, answers, strict=True) if t is not None})
    states = GaugeMetricFamily("microturn_gateway_processes", "Gateway processes behind this front, by state",
                               labels=["state"])
    for state in STATES:
        states.add_metric([state], sum(p.state == state for p in front.processes))
    restarts = CounterMetricFamily("microturn_gateway_process_restarts", "Gateway processes started again after "
                                   "exiting", value=sum(p.restarts for p in front.processes))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged([*families, states, restarts]))
    return metrics.page(registry)


async def _front_ctx(app: web.Application) -> AsyncIterator[None]:
    front = Front(app[SETTINGS], Path(tempfile.mkdtemp(prefix="microturn-front-")))
    app[FRONT] = front
    try:
        await front.start()
        watcher = asyncio.create_task(front.watch(), name="watch-gateway-processes")
        yield
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    finally:
        await front.stop()
        shutil.rmtree(front.sockets, ignore_errors=True)


def create_front_app(settings: Settings) -> web.Application:
    """The front's application: it starts the gateway processes when it starts, and stops them when it stops."""
    app = web.Application(client_max_size=body_limit(settings))
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_front_ctx)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_route("*", "/v1/sessions/{session_id}", to_session)
    app.router.add_route("*", "/v1/sessions/{session_id}/{tail:.*}", to_session)
    app.router.add_route("*", "/{tail:.*}", to_any)
    return app


async def run_front(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then let every process drain and shut down."""

    async def drain(app: web.Application) -> None:
        await app[FRONT].drain()

    await serve_until_signalled(create_front_app(settings), settings.host, settings.port, drain)
