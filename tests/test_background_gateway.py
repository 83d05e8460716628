"""Background tasks through the gateway: started by the model or the API, woven into the context, seen by an aiortc
peer; cancel; and a gateway crash mid-task followed by a resume, delivering the result exactly once."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any

import aiohttp
import numpy as np
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from microturn.client import RATE, ProbeClient
from microturn.local import stop
from tests.conftest import loopback_settings
from tests.conftest import start_gateway as start_in_process
from tests.test_resume import Gateway, start_gateway
from webrtc_gateway.api import GATEWAY
from webrtc_gateway.app import STORE
from webrtc_gateway.store import log_key, tasks_key


def woven(client: ProbeClient) -> list[str]:
    """The background texts the model got, in order, as its captions show them (echo and tally show their input)."""
    out: list[str] = []
    for c in client.captions():
        if " · background: " in c["text"]:
            out += c["text"].split(" · background: ", 1)[1].split(" | ")
    return out


def events(client: ProbeClient, task_id: str | None = None) -> list[dict[str, Any]]:
    return [m for _, m in client.received.messages if m.get("type") == "event"
            and str(m.get("name", "")).startswith("background_")
            and (task_id is None or m["data"].get("task_id") == task_id)]


async def until(check: Callable[[], bool], timeout: float = 15) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.05)


def finished(client: ProbeClient, task_id: str) -> bool:
    return any(e["name"] in ("background_result", "background_failed", "background_cancelled")
               for e in events(client, task_id))


async def api(client: ProbeClient, method: str, path: str, token: str | None = None,
              **kw: Any) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token or client.token}"}
    async with aiohttp.ClientSession() as http, http.request(
            method, f"{client.base_url}/v1/sessions/{client.session_id}{path}", headers=headers, **kw) as r:
        return r.status, dict(await r.json())


async def test_model_and_api_tasks_reach_the_context_and_the_browser(gateway: TestServer) -> None:
    client = ProbeClient(str(gateway.make_url("/")), np.zeros(8 * RATE, np.float32))
    try:
        await client.connect()
        await asyncio.wait_for(client.channel_open.wait(), 10)
        client.send({"type": "text", "text": "/bg what is 6*7"})  # the model asks (echo's diagnostic trigger)
        await until(lambda: any(e["name"] == "background_result" for e in events(client)))
        status, task = await api(client, "POST", "/tasks", json={"request": "convert 5 km to miles"})
        assert status == 201 and task["source"] == "api" and task["state"] == "running"
        await until(lambda: finished(client, task["task_id"]))
        status, listed = await api(client, "GET", "/tasks")
        await asyncio.sleep(0.5)
    finally:
        await client.close()
    model_task = next(e["data"]["task_id"] for e in events(client) if e["name"] == "background_started")
    by_model = [(e["name"], e["data"].get("text")) for e in events(client, model_task)]
    assert by_model == [("background_started", None), ("background_progress", "calculator(expression='6*7')"),
                        ("background_result", "42")]
    request = [m for _, m in client.received.messages if m.get("name") == "background_request"]
    assert [m["data"] for m in request] == [{"request": "what is 6*7"}]
    by_api = [(e["name"], e["data"].get("text")) for e in events(client, task["task_id"])]
    assert by_api[-1] == ("background_result", "5 km = 3.10686 miles")
    # each result entered the model's input exactly once, in a later micro-turn (the echo caption shows its input)
    assert woven(client) == ["calculator(expression='6*7')", "42", "convert_units(value=5.0, from='km', to='miles')",
                             "5 km = 3.10686 miles"]
    assert status == 200 and {t["state"] for t in listed["tasks"]} == {"done"}


async def test_cancel_limits_and_refusals(gateway: TestServer) -> None:
    client = ProbeClient(str(gateway.make_url("/")), np.zeros(6 * RATE, np.float32))
    try:
        await client.connect()
        await asyncio.wait_for(client.channel_open.wait(), 10)
        status, long = await api(client, "POST", "/tasks", json={"request": "/spin 30"})
        assert status == 201
        status, _ = await api(client, "POST", "/tasks", json={"request": "/spin 30"})
        assert status == 201
        status, body = await api(client, "POST", "/tasks", json={"request": "/spin 30"})
        assert status == 429 and body["error"]["code"] == "too_many_tasks"
        assert (await api(client, "POST", "/tasks", json={"request": ""}))[0] == 400
        assert (await api(client, "POST", "/tasks", token="forged", json={"request": "1+1"}))[0] == 401
        await asyncio.sleep(0.3)
        status, cancelled = await api(client, "DELETE", f"/tasks/{long['task_id']}")
        assert status == 200 and cancelled["state"] == "cancelled"
        await until(lambda: finished(client, long["task_id"]))
        assert (await api(client, "DELETE", f"/tasks/{long['task_id']}"))[0] == 409
        assert (await api(client, "DELETE", "/tasks/nope"))[0] == 404
        await asyncio.sleep(0.3)
    finally:
        await client.close()
    assert [e["name"] for e in events(client, long["task_id"])] == ["background_started", "background_cancelled"]
    assert woven(client) == ["cancelled"]


async def test_a_gateway_crash_mid_task_then_resume_delivers_the_result_once(redis_url: str) -> None:
    first, second = start_gateway(redis_url, "gw-bg-a"), start_gateway(redis_url, "gw-bg-b")
    gateways: list[Gateway] = [first, second]
    client = ProbeClient(first.url, np.zeros(12 * RATE, np.float32), fallback_urls=(second.url,))
    raw = aioredis.Redis.from_url(redis_url)
    try:
        await client.connect()
        await asyncio.wait_for(client.channel_open.wait(), 10)
        await asyncio.sleep(0.5)
        status, task = await api(client, "POST", "/tasks", json={"request": "/spin 2"})
        assert status == 201
        await until(lambda: any(e["name"] == "background_progress" for e in events(client)), 10)
        first.proc.send_signal(signal.SIGKILL)  # mid-task: it has reported progress, not its result
        await until(lambda: finished(client, task["task_id"]), 25)
        await asyncio.sleep(1.0)  # let the log catch up
        log = await raw.xrange(log_key(client.session_id))
        stored = await raw.hgetall(tasks_key(client.session_id))
    finally:
        await client.close(delete=False)
        await raw.aclose()
        stop(*(g.proc for g in gateways))
    assert client.resumes == 1, client.errors
    seen = [(e["name"], e["data"]["seq"]) for e in events(client, task["task_id"])]
    assert seen.count(("background_result", 4)) == 1
    assert [s for _, s in seen] == sorted(set(s for _, s in seen))  # every item once, in order
    # exactly one micro-turn of the model's context (tally's records, replayed on resume) holds the result
    assert sum(b"spun for 2 s" in fields[b"ctx"] for _, fields in log) == 1
    assert sum(b"spinning: 25%" in fields[b"ctx"] for _, fields in log) == 1
    assert int(stored[f"delivered:{task['task_id']}".encode()]) == 5
    assert woven(client).count("spun for 2 s") == 1


async def test_a_model_request_whose_task_was_never_recorded_is_restarted_on_resume(redis_url: str) -> None:
    """The old gateway logged the model's request but died before writing its task: the resume starts it again
    (same id, from the log), and the new gateway's background conversation has the text typed before the move."""
    settings = {"redis": redis_url}
    first = await start_in_process(loopback_settings(gateway_id="gw-lost-a", **settings))
    second = await start_in_process(loopback_settings(gateway_id="gw-lost-b", **settings))

    async def never_written(task: object) -> None:  # as if the gateway died before its first write of the task
        return None

    first.app[STORE].put_task = never_written  # type: ignore[method-assign]
    client = ProbeClient(str(first.make_url("/")), np.zeros(10 * RATE, np.float32),
                         fallback_urls=(str(second.make_url("/")),))
    try:
        await client.connect()
        await asyncio.wait_for(client.channel_open.wait(), 10)
        client.send({"type": "text", "text": "my name is Ada"})
        await asyncio.sleep(0.4)
        client.send({"type": "text", "text": "/bg /spin 1.5"})
        await until(lambda: any(e["name"] == "background_started" for e in events(client)), 10)
        await first.close()  # the session's connection drops; the browser resumes on the other gateway
        await until(lambda: any(e["name"] == "background_result" for e in events(client)), 20)
        await asyncio.sleep(0.5)
        conversation = second.app[GATEWAY].live[client.session_id].background.transcript.text()
    finally:
        await client.close(delete=False)
        await second.close()
    assert client.resumes == 1, client.errors
    started = [e["data"]["task_id"] for e in events(client) if e["name"] == "background_started"]
    assert len(set(started)) == 1 and started[0].startswith("model-")  # the same task, started again
    results = [e["data"]["text"] for e in events(client) if e["name"] == "background_result"]
    assert results == ["spun for 1.5 s"]
    assert woven(client).count("spun for 1.5 s") == 1
    assert "my name is Ada" in conversation
