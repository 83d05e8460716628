"""The gateway's aiohttp application factory, used by ``microturn serve`` and by the tests alike.

Process layout (all in one process in the embedded default): the aiohttp event loop runs signalling, the data
channels and aiortc's media I/O; aiortc decodes audio in its own decoder threads; the engine steps the model in its
own tick thread (:mod:`inference.engine`). With ``--workers`` the model runs in ``microturn worker`` processes
instead, reached over WebSockets (:mod:`webrtc_gateway.workers`). With ``--processes N``, N such gateways run
behind one port (:mod:`webrtc_gateway.front`). Handlers only enqueue. Resources are opened in
``cleanup_ctx`` and closed in reverse order; live peers are closed first on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import jinja2
from aiohttp import web

from inference.engine import Engine
from inference.models import load_backend
from microturn.config import Settings
from microturn.contracts import MicroTurnEngine
from microturn.service import serve_until_signalled
from webrtc_gateway import api, metrics, turn
from webrtc_gateway.gateway import Gateway
from webrtc_gateway.ice import use_host_addresses
from webrtc_gateway.store import MemorySessionStore, RedisSessionStore, SessionStore
from webrtc_gateway.workers import RemoteEngine

log = logging.getLogger(__name__)

WEB_ROOT = Path(__file__).resolve().parent.parent / "web"
ENGINE = web.AppKey("engine", MicroTurnEngine)
STORE = web.AppKey("store", SessionStore)
TEMPLATES = web.AppKey("templates", jinja2.Environment)
WIDGET_FILES = {  # what /widget/ serves, and as which type
    "microturn-widget.js": "text/javascript",
    "microturn-widget.d.ts": "application/typescript",
}
# the URL is not versioned: a short max-age, then revalidation by ETag / Last-Modified
WIDGET_CACHE = "public, max-age=600, stale-while-revalidate=86400"


def make_store(settings: Settings) -> SessionStore:
    return RedisSessionStore(settings.redis) if settings.redis else MemorySessionStore()


async def demo_page(request: web.Request) -> web.Response:
    page = request.app[TEMPLATES].get_template("index.html").render(
        model=request.app[api.SETTINGS].model, micro_turn_ms=200)
    return web.Response(text=page, content_type="text/html")


async def widget_file(request: web.Request) -> web.StreamResponse:
    """The embeddable widget, loadable as a cross-origin ES module from the allowed origins (see web/README.md)."""
    name = request.match_info["name"]
    if name not in WIDGET_FILES:
        raise web.HTTPNotFound()
    headers = {"Cache-Control": WIDGET_CACHE, "Vary": "Origin", "X-Content-Type-Options": "nosniff",
               "Cross-Origin-Resource-Policy": "cross-origin", "Content-Type": f"{WIDGET_FILES[name]}; charset=utf-8"}
    origin = request.headers.get("Origin")
    if origin is not None:
        if not api._origin_allowed(request, request.app[api.SETTINGS]):
            return api.error(403, "origin_not_allowed", f"origin {origin} may not load this widget")
        headers["Access-Control-Allow-Origin"] = origin
    return web.FileResponse(WEB_ROOT / "widget" / name, headers=headers)


async def metrics_page(request: web.Request) -> web.Response:
    return metrics.page(metrics.registry_for(request.app[api.GATEWAY]))


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    store = make_store(app[api.SETTINGS])
    app[STORE] = store
    yield
    await store.close()


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    """The in-process engine, or with ``--workers`` the remote workers behind the same interface."""
    settings = app[api.SETTINGS]
    engine: MicroTurnEngine
    if settings.workers:
        engine = RemoteEngine(settings.workers, settings.worker_token, app[STORE])
    else:
        backend = await asyncio.get_running_loop().run_in_executor(
            None, load_backend, settings.model, settings.checkpoint, settings.device, settings.processes)
        engine = Engine(backend, tick_budget_ms=settings.tick_budget_ms)
    await engine.start()
    app[ENGINE] = engine
    yield
    await engine.stop()


async def _fleet_http_ctx(app: web.Application) -> AsyncIterator[None]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(sock_connect=5, sock_read=60)) as http:
        app[api.FLEET_HTTP] = http
        yield


async def _gateway_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[api.SETTINGS]
    store = app[STORE]
    gateway = Gateway(settings, app[ENGINE], store)
    app[api.GATEWAY] = gateway

    async def expire() -> None:
        while True:
            await asyncio.sleep(5)
            await gateway.expire_pending()

    expiry = asyncio.create_task(expire(), name="expire-pending-sessions")
    gateway.log.start()
    yield
    expiry.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await expiry
    await gateway.close_all()
    await gateway.log.stop()


async def _close_peers(app: web.Application) -> None:
    await app[api.GATEWAY].close_all()


async def run(settings: Settings, path: str | None = None) -> None:
    """Serve (on ``settings``' host and port, or on the Unix socket ``path``) until SIGTERM or SIGINT, then drain
    (see :meth:`Gateway.drain`) and shut down."""

    async def drain(app: web.Application) -> None:
        await app[api.GATEWAY].drain(settings.drain_timeout_s)

    await serve_until_signalled(create_app(settings), settings.host, settings.port, drain, path)


def create_app(settings: Settings) -> web.Application:
    """Build the gateway application for ``settings``."""
    turn.check_settings(settings)  # TURN URLs without the secret that signs their credentials: refuse to start
    use_host_addresses(settings.ice_host_addresses)
    app = web.Application(middlewares=[api.origin_and_errors], client_max_size=api.body_limit(settings))
    app[api.SETTINGS] = settings
    app[TEMPLATES] = jinja2.Environment(loader=jinja2.FileSystemLoader(WEB_ROOT / "templates"),
                                        autoescape=True)
    app.cleanup_ctx.extend([_store_ctx, _engine_ctx, _gateway_ctx, _fleet_http_ctx])
    app.on_shutdown.append(_close_peers)
    api.add_routes(app)
    app.router.add_get("/", demo_page)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_static("/static/", WEB_ROOT / "static")
    app.router.add_get("/widget/{name}", widget_file)
    return app
