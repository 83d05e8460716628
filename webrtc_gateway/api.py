"""HTTP API of the gateway: thin handlers over :class:`~webrtc_gateway.gateway.Gateway`.

==========================================  =====================================================================
``POST /v1/sessions``                       create a session (``Authorization: Bearer API_KEY`` when keys are set)
``POST /v1/sessions/{id}/offer``            ``{"sdp", "type": "offer"}`` + ``Authorization: Bearer TOKEN`` → answer
``POST /v1/sessions/{id}/resume``           ``{"last_turn": K}`` + ``Authorization: Bearer RESUME_TOKEN`` → new tokens
``GET /v1/sessions/{id}``                   the session's state and counters (token required)
``DELETE /v1/sessions/{id}``                end the session (token required)
``POST /v1/sessions/{id}/tasks``            ``{"request": "..."}`` start a background task (API key or token) → task
``GET /v1/sessions/{id}/tasks``             the session's background tasks (API key or token)
``DELETE /v1/sessions/{id}/tasks/{tid}``    cancel a background task (API key or token)
``GET /livez``, ``GET /readyz``             health; ``/readyz`` is 503 while draining
``GET /metrics``                            Prometheus text format
==========================================  =====================================================================

A call of one session that lands on a gateway of the fleet other than the one holding it is passed on there
(:func:`at_owner`). Errors are JSON ``{"error": {"code": "...", "message": "..."}}`` with a 4xx/5xx status.
Browser calls carry an ``Origin``; one that is neither this gateway's own nor in ``allowed_origins`` is refused
with 403.
"""

from __future__ import annotations

import contextlib
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from inference.background.runner import TooManyTasks
from microturn.config import Settings
from webrtc_gateway import turn
from webrtc_gateway.background import MAX_REQUEST_CHARS, TaskFinished, UnknownTask
from webrtc_gateway.forward import FORWARDED_BY, forward
from webrtc_gateway.gateway import (
    AlreadyConnected,
    Draining,
    Gateway,
    GatewayFull,
    Grant,
    ResumeRefused,
    UnknownSession,
)
from webrtc_gateway.session import GatewaySession, OfferError
from webrtc_gateway.store import StoreUnavailable
from webrtc_gateway.tokens import TokenError
from webrtc_gateway.workers import RemoteEngine, WorkerUnavailable

GATEWAY = web.AppKey("gateway", Gateway)
SETTINGS = web.AppKey("settings", Settings)
FLEET_HTTP = web.AppKey("fleet_http", aiohttp.ClientSession)  # for calls passed on to other gateways

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def body_limit(settings: Settings) -> int:
    """The largest request body the gateway reads: its SDP limit, and at least 64 KiB."""
    return max(settings.max_sdp_bytes, 65536)


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


def _origin_allowed(request: web.Request, settings: Settings) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not a browser call (a backend, a probe)
    own = f"{request.scheme}://{request.host}"
    return origin == own or origin in settings.allowed_origins or "*" in settings.allowed_origins


@web.middleware
async def origin_and_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse disallowed browser origins, answer CORS preflights, and turn known failures into JSON errors."""
    settings = request.app[SETTINGS]
    origin = request.headers.get("Origin")
    cors = {}
    if origin is not None and request.path.startswith("/v1/"):
        if not _origin_allowed(request, settings):
            # readable by the refused page, so that it can say why (the error carries no session data)
            return error(403, "origin_not_allowed", f"origin {origin} may not call this gateway",
                         {"Access-Control-Allow-Origin": origin, "Vary": "Origin"})
        cors = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if request.method == "OPTIONS":
            return web.Response(status=204, headers={
                **cors, "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                "Access-Control-Allow-Headers": "Authorization, Content-Type", "Access-Control-Max-Age": "600"})
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400 and not exc.text:
            response = error(exc.status, "http_error", exc.reason)
        else:
            raise
    except Draining as exc:
        response = error(503, "draining", str(exc), {"Retry-After": "1"})
    except StoreUnavailable as exc:
        response = error(503, "store_unavailable", f"session state is unavailable: {exc}",
                         {"Retry-After": "2"})
    except WorkerUnavailable as exc:
        response = error(503, "no_worker", str(exc), {"Retry-After": "2"})
    response.headers.update(cors)
    return response


async def _json_body(request: web.Request, max_bytes: int) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > max_bytes:
        raise _Refused(413, "too_large", f"request body is larger than {max_bytes} bytes")
    raw = await request.content.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise _Refused(413, "too_large", f"request body is larger than {max_bytes} bytes")
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise _Refused(400, "invalid_json", "request body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise _Refused(400, "invalid_json", "request body must be a JSON object")
    return body


async def whole_body(request: web.Request) -> bytes | web.Response:
    """The request's body as it came, to pass on to another gateway; a 413 answer when it is larger than a gateway
    reads (:func:`body_limit`)."""
    limit = body_limit(request.app[SETTINGS])
    if request.content_length is None or request.content_length <= limit:
        with contextlib.suppress(web.HTTPRequestEntityTooLarge):
            return await request.read()
    return error(413, "too_large", f"request body is larger than {limit} bytes")


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.response = error(status, code, message)


def _check_token(request: web.Request, session_id: str) -> None:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        raise _Refused(401, "token_missing", "send the session token as 'Authorization: Bearer TOKEN'")
    try:
        request.app[GATEWAY].signer.verify(header.removeprefix("Bearer ").strip(), session_id, "connect")
    except TokenError as exc:
        raise _Refused(403 if exc.forbidden else 401, "token_invalid", str(exc)) from exc


def refusals(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except _Refused as exc:
            return exc.response
    return wrapped


def _check_api_key(request: web.Request) -> None:
    keys = request.app[SETTINGS].api_keys
    if not keys:
        return  # dev mode: anyone who may reach the gateway (and passes the Origin check) creates sessions
    given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip().encode()
    if not any(hmac.compare_digest(given, key.encode()) for key in keys):
        raise _Refused(401, "api_key_invalid", "creating a session needs 'Authorization: Bearer API_KEY'; "
                       "call this from your backend, never from a browser")


def _check_key_or_token(request: web.Request, session_id: str) -> None:
    """An integrator's API key (as for creating sessions) or the session's own token."""
    keys = request.app[SETTINGS].api_keys
    given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip().encode()
    if keys and any(hmac.compare_digest(given, key.encode()) for key in keys):
        return
    if not keys and not given:
        return  # dev mode, as for creating sessions
    _check_token(request, session_id)


def at_owner(handler: Handler) -> Handler:
    """A call of a session this gateway does not hold goes to the gateway that does, when the fleet's gateways
    advertise where they are (``advertise_url``) and the session's record names another. A call passed on once is
    answered where it lands."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        gateway, settings = request.app[GATEWAY], request.app[SETTINGS]
        session_id = request.match_info["session_id"]
        if (session_id in gateway.pending or session_id in gateway.live or not settings.advertise_url
                or FORWARDED_BY in request.headers):
            return await handler(request)
        record = await gateway.store.get(session_id)
        if record is None or not record.owner_url or record.owner_url == settings.advertise_url:
            return await handler(request)
        body = await whole_body(request)
        if isinstance(body, web.Response):
            return body
        try:
            return await forward(request.app[FLEET_HTTP], record.owner_url, request, body, by=settings.gateway_id)
        except (TimeoutError, aiohttp.ClientError):
            return error(503, "owner_unavailable", "the gateway that holds this session does not answer; resume "
                         "the session", {"Retry-After": "1"})
    return wrapped


def _live_session(request: web.Request, session_id: str) -> GatewaySession:
    session = request.app[GATEWAY].live.get(session_id)
    if session is None:
        raise _Refused(404, "unknown_session", "no such connected session on this gateway")
    return session


@at_owner
@refusals
async def start_task(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    _check_key_or_token(request, session_id)
    body = await _json_body(request, 8192)
    text = body.get("request")
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_REQUEST_CHARS:
        return error(400, "invalid_request", f'send {{"request": "..."}} (1-{MAX_REQUEST_CHARS} characters)')
    session = _live_session(request, session_id)
    try:
        task = session.background.start(text, "api")
    except TooManyTasks as exc:
        return error(429, "too_many_tasks", str(exc), {"Retry-After": "1"})
    return web.json_response(task.public(), status=201)


@at_owner
@refusals
async def list_tasks(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    _check_key_or_token(request, session_id)
    session = _live_session(request, session_id)
    return web.json_response({"tasks": [t.public() for t in session.background.tasks.values()]})


@at_owner
@refusals
async def cancel_task(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    _check_key_or_token(request, session_id)
    session = _live_session(request, session_id)
    try:
        task = await session.background.cancel(request.match_info["task_id"])
    except UnknownTask as exc:
        return error(404, "unknown_task", str(exc))
    except TaskFinished as exc:
        return error(409, "task_finished", str(exc))
    return web.json_response(task.public())


@refusals
async def create_session(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    _check_api_key(request)
    await _json_body(request, 4096)
    try:
        grant = await gateway.create()
    except GatewayFull as exc:
        return error(503, "gateway_full", str(exc), {"Retry-After": "5"})
    return _grant_response(request, grant, 201)


def _grant_response(request: web.Request, grant: Grant, status: int) -> web.Response:
    settings = request.app[SETTINGS]
    sid = grant.record.session_id
    ice_servers: list[dict[str, Any]] = [{"urls": [url]} for url in settings.ice_servers]
    if settings.turn_urls:  # a fresh time-limited credential per grant (a resume gets a new one)
        ice_servers.append(turn.ice_server(settings, sid))
    return web.json_response({
        "session_id": sid,
        "token": grant.token,
        "expires_in": settings.token_ttl_s,
        "resume_token": grant.resume_token,
        "ice_servers": ice_servers,
        "offer_url": f"/v1/sessions/{sid}/offer",
        "resume_url": f"/v1/sessions/{sid}/resume",
        "micro_turn_ms": 200,
    }, status=status)


@refusals
async def resume_session(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        return error(401, "token_missing", "send the resume token as 'Authorization: Bearer RESUME_TOKEN'")
    body = await _json_body(request, 4096)
    last_turn = body.get("last_turn", -1)
    if not isinstance(last_turn, int) or isinstance(last_turn, bool):
        return error(400, "invalid_request", '"last_turn" must be the index of the last micro-turn received')
    try:
        grant = await request.app[GATEWAY].resume(session_id, header.removeprefix("Bearer ").strip(), last_turn)
    except ResumeRefused as exc:
        return error(403 if exc.forbidden else 401, "resume_refused", str(exc))
    except UnknownSession as exc:
        return error(404, "unknown_session", str(exc))
    except GatewayFull as exc:
        return error(503, "gateway_full", str(exc), {"Retry-After": "5"})
    return _grant_response(request, grant, 200)


@at_owner
@refusals
async def offer(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    _check_token(request, session_id)
    body = await _json_body(request, request.app[SETTINGS].max_sdp_bytes)
    sdp = body.get("sdp")
    if body.get("type", "offer") != "offer" or not isinstance(sdp, str) or not sdp.strip():
        return error(400, "invalid_offer", 'send {"type": "offer", "sdp": "..."}')
    try:
        answer = await request.app[GATEWAY].connect(session_id, sdp)
    except UnknownSession as exc:
        return error(404, "unknown_session", str(exc))
    except AlreadyConnected as exc:
        return error(409, "already_connected", str(exc))
    except OfferError as exc:
        return error(400, "invalid_offer", str(exc))
    return web.json_response({"type": "answer", "sdp": answer})


@at_owner
@refusals
async def session_state(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    _check_token(request, session_id)
    gateway = request.app[GATEWAY]
    if session_id in gateway.pending:
        return web.json_response({"session_id": session_id, "state": "new"})
    session = gateway.live.get(session_id)
    if session is None:
        return error(404, "unknown_session", "no such session on this gateway")
    return web.json_response({
        "session_id": session_id,
        "state": session.pc.connectionState,
        "micro_turns": session.clock.dispatched,
        "late_micro_turns": session.clock.late,
        "audio_frames_in": session.audio.frames,
        "audio_gaps": session.audio.gaps,
        "video_frames_in": session.video.frames,
        "frames_out": session.playout.frames_out,
        "underrun_frames": session.playout.underrun_frames,
        "captions_sent": session.captions_sent,
        "messages_received": session.messages_received,
        "errors_sent": session.errors_sent,
        "input_levels_dbfs": list(session.clock.levels_dbfs),
    })


@at_owner
@refusals
async def delete_session(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    _check_token(request, session_id)
    try:
        await request.app[GATEWAY].end(session_id, "deleted by client")
    except UnknownSession as exc:
        return error(404, "unknown_session", str(exc))
    return web.json_response({"session_id": session_id, "state": "closed"})


async def livez(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    if gateway.draining:
        return web.json_response({"status": "draining", "sessions": gateway.session_count}, status=503)
    if isinstance(gateway.engine, RemoteEngine) and not gateway.engine.up():
        return web.json_response({"status": "no_worker", "sessions": gateway.session_count}, status=503)
    return web.json_response({"status": "ready", "sessions": gateway.session_count})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/sessions", create_session)
    app.router.add_post("/v1/sessions/{session_id}/offer", offer)
    app.router.add_post("/v1/sessions/{session_id}/resume", resume_session)
    app.router.add_get("/v1/sessions/{session_id}", session_state)
    app.router.add_delete("/v1/sessions/{session_id}", delete_session)
    app.router.add_post("/v1/sessions/{session_id}/tasks", start_task)
    app.router.add_get("/v1/sessions/{session_id}/tasks", list_tasks)
    app.router.add_delete("/v1/sessions/{session_id}/tasks/{task_id}", cancel_task)
    app.router.add_route("OPTIONS", "/v1/{tail:.*}", livez)  # answered by the middleware
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
