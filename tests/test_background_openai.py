"""Contract test of the OpenAI-compatible reasoner against a local server speaking the chat-completions streaming
protocol as SGLang and vLLM do (``data: {chunk}`` server-sent events, ``delta.content`` / ``delta.tool_calls``
fragments, ``data: [DONE]``) — and against servers that hang, fail or send garbage. No model weights: the server
plays a scripted model that calls the calculator, then answers with the tool's result."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from inference.background.openai_compat import ChatCompletionsReasoner
from inference.background.reasoner import ReasonerError
from inference.background.tools import Toolbox

KEY = "sk-test-key"


def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "scripted",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n".encode()


class ScriptedModel:
    """A chat-completions endpoint: first a streamed calculator call, then a streamed answer using its result."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    async def completions(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {KEY}":
            return web.json_response({"error": {"message": "invalid api key", "type": "auth"}}, status=401)
        body = await request.json()
        self.requests.append(body)
        assert body["stream"] is True and {t["function"]["name"] for t in body["tools"]} >= {"calculator"}
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        tool_messages = [m for m in body["messages"] if m["role"] == "tool"]
        if not tool_messages:
            await response.write(chunk({"role": "assistant", "content": ""}))
            await response.write(chunk({"content": "Let me compute that. "}))
            await response.write(b": keep-alive\n\n")
            call = {"index": 0, "id": "call_abc", "type": "function", "function": {"name": "calculator",
                                                                                  "arguments": ""}}
            await response.write(chunk({"tool_calls": [call]}))
            for part in ['{"expr', 'ession": "', "(17 + 25)", ' * 2"}']:
                await response.write(chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}))
                await asyncio.sleep(0.01)
            await response.write(chunk({}, "tool_calls"))
        else:
            result = tool_messages[-1]["content"]
            assert tool_messages[-1]["tool_call_id"] == "call_abc"
            words = f"The answer is {result}, which is twice forty-two; the calculator confirms it exactly.".split()
            for word in words:
                await response.write(chunk({"content": word + " "}))
            await response.write(chunk({}, "stop"))
        await response.write(b"data: [DONE]\n\n")
        return response

    async def hang(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chunk({"role": "assistant", "content": "thinking"}))
        await asyncio.sleep(60)
        return response

    async def garbage(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chunk({"content": "ok so far"}))
        await response.write(b"data: {\"choices\": [{\"delta\": {\"content\": \"trunc\n\n")
        return response

    async def html(self, request: web.Request) -> web.Response:
        return web.Response(text="<html>welcome to nginx</html>", content_type="text/html")

    async def cut(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chunk({"content": "half an ans"}))
        return response

    async def overloaded(self, request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "server overloaded"}}, status=503)


@pytest.fixture
async def server() -> AsyncIterator[tuple[TestServer, ScriptedModel]]:
    model = ScriptedModel()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", model.completions)
    app.router.add_post("/hang/v1/chat/completions", model.hang)
    app.router.add_post("/garbage/v1/chat/completions", model.garbage)
    app.router.add_post("/html/v1/chat/completions", model.html)
    app.router.add_post("/cut/v1/chat/completions", model.cut)
    app.router.add_post("/busy/v1/chat/completions", model.overloaded)
    srv = TestServer(app, host="127.0.0.1")
    await srv.start_server()
    yield srv, model
    await srv.close()


def reasoner(srv: TestServer, prefix: str = "", key: str = KEY, **kw: float) -> ChatCompletionsReasoner:
    return ChatCompletionsReasoner(f"http://127.0.0.1:{srv.port}{prefix}/v1", key, "scripted", Toolbox(), **kw)


async def test_contract_streaming_with_a_tool_call(server: tuple[TestServer, ScriptedModel]) -> None:
    srv, model = server
    progress: list[str] = []
    answer = await reasoner(srv).run("user: what is (17+25)*2?", "compute (17+25)*2", progress.append)
    assert answer == "The answer is 84, which is twice forty-two; the calculator confirms it exactly. "
    assert progress[:2] == ["Let me compute that.", 'calculator({"expression": "(17 + 25) * 2"})']
    assert "".join(progress[2:]).startswith("The answer is 84,")  # the answer streamed as it came
    first, second = model.requests
    assert "user: what is (17+25)*2?" in first["messages"][1]["content"]  # the conversation reaches the model
    assert second["messages"][2]["tool_calls"][0]["function"] == {"name": "calculator",
                                                                  "arguments": '{"expression": "(17 + 25) * 2"}'}
    assert second["messages"][3] == {"role": "tool", "tool_call_id": "call_abc", "content": "84"}


@pytest.mark.parametrize(("prefix", "key", "message"), [
    ("/garbage", KEY, "invalid chunk"),
    ("/html", KEY, "not an event stream"),
    ("/cut", KEY, "ended without [DONE]"),
    ("/busy", KEY, "answered 503"),
    ("", "wrong-key", "answered 401"),
])
async def test_contract_bad_servers_fail_clearly(server: tuple[TestServer, ScriptedModel], prefix: str, key: str,
                                                 message: str) -> None:
    with pytest.raises(ReasonerError, match=message.replace("[", r"\[").replace("]", r"\]")):
        await reasoner(server[0], prefix, key).run("", "hello", lambda _: None)


async def test_contract_a_hanging_server_times_out(server: tuple[TestServer, ScriptedModel]) -> None:
    start = time.monotonic()
    with pytest.raises(ReasonerError, match="sent nothing for 0.3 s"):
        await reasoner(server[0], "/hang", read_timeout_s=0.3).run("", "hello", lambda _: None)
    with pytest.raises(ReasonerError, match="did not finish within 0.5 s"):
        await reasoner(server[0], "/hang", read_timeout_s=5, timeout_s=0.5).run("", "hello", lambda _: None)
    assert time.monotonic() - start < 3


async def test_contract_an_unreachable_server_fails_clearly() -> None:
    from microturn.local import free_port

    r = ChatCompletionsReasoner(f"http://127.0.0.1:{free_port()}/v1", None, "m", Toolbox())
    with pytest.raises(ReasonerError, match="cannot reach"):
        await r.run("", "hello", lambda _: None)
