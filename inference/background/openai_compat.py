"""A reasoner backed by any OpenAI-compatible chat-completions server (SGLang, vLLM, …), streamed, with tools.

One task is a short loop: ``POST {url}/chat/completions`` with ``stream: true`` and the built-in tools; the
server streams server-sent events (``data: {json}`` lines, ``choices[0].delta.content`` text and
``choices[0].delta.tool_calls`` fragments, then ``data: [DONE]``). Text deltas are reported as progress (in pieces
of whole words); when the reply ends in tool calls, the tools run and their results go back as ``tool`` messages
for the next round (at most ``max_rounds``). Every failure — a refused connection, a status other than 200, a
server that goes silent for ``read_timeout_s`` or takes longer than ``timeout_s`` in all, a stream that is not
valid JSON or ends without ``[DONE]`` — is a :class:`~inference.background.reasoner.ReasonerError` with a clear
message.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp

from inference.background.reasoner import Emit, ReasonerError
from inference.background.tools import Toolbox

SYSTEM_PROMPT = ("You are the background model of a live spoken conversation. You see the conversation so far and "
                 "one request. Use the tools when they help; answer briefly, in plain text that can be said aloud.")
PROGRESS_CHARS = 48  # text deltas are reported as progress once this many characters have gathered


class ChatCompletionsReasoner:
    """Streams a chat completion (with tool calls) from an OpenAI-compatible server."""

    def __init__(self, url: str, api_key: str | None, model: str, toolbox: Toolbox, timeout_s: float = 30.0,
                 read_timeout_s: float = 10.0, max_rounds: int = 4) -> None:
        self.url = url.rstrip("/") + "/chat/completions"
        self.api_key = api_key
        self.model = model
        self.toolbox = toolbox
        self.timeout_s = timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_rounds = max_rounds

    async def run(self, conversation: str, request: str, emit: Emit) -> str:
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Conversation so far:\n{conversation or '(nothing yet)'}\n\n"
                                        f"Request: {request}"},
        ]
        deadline = time.monotonic() + self.timeout_s
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        async with aiohttp.ClientSession(headers=headers) as http:
            for _ in range(self.max_rounds):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        text, calls = await self._round(http, messages, emit)
                except TimeoutError as exc:
                    raise ReasonerError(f"the chat-completions server at {self.url} did not finish within "
                                        f"{self.timeout_s:g} s") from exc
                if not calls:
                    return text
                messages.append({"role": "assistant", "content": text or None, "tool_calls": calls})
                for call in calls:
                    fn = call["function"]
                    emit(f"{fn['name']}({fn['arguments']})")
                    result = await asyncio.to_thread(self.toolbox.call, fn["name"], fn["arguments"])
                    content = result.text if result.ok else f"error: {result.text}"
                    messages.append({"role": "tool", "tool_call_id": call["id"], "content": content})
        raise ReasonerError(f"no answer after {self.max_rounds} rounds of tool calls or {self.timeout_s:g} s")

    async def _round(self, http: aiohttp.ClientSession, messages: list[dict[str, Any]], emit: Emit
                     ) -> tuple[str, list[dict[str, Any]]]:
        """One streamed completion: (its text, its tool calls in OpenAI message form)."""
        body = {"model": self.model, "messages": messages, "stream": True, "tools": self.toolbox.schemas(),
                "tool_choice": "auto"}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=self.read_timeout_s)
        try:
            async with http.post(self.url, json=body, timeout=timeout) as response:
                if response.status != 200:
                    detail = (await response.text())[:200]
                    raise ReasonerError(f"the chat-completions server answered {response.status}: {detail}")
                return await self._read_stream(response, emit)
        except TimeoutError as exc:
            raise ReasonerError(f"the chat-completions server sent nothing for {self.read_timeout_s:g} s") from exc
        except aiohttp.ClientError as exc:
            raise ReasonerError(f"cannot reach the chat-completions server at {self.url}: {exc}") from exc

    async def _read_stream(self, response: aiohttp.ClientResponse, emit: Emit
                           ) -> tuple[str, list[dict[str, Any]]]:
        text, unsent = "", ""
        calls: dict[int, dict[str, Any]] = {}
        done = False
        async for raw in response.content:
            line = raw.decode("utf-8", errors="replace").strip()
            if not line or line.startswith(":"):
                continue  # keep-alive comments and event separators
            if not line.startswith("data:"):
                if line.startswith(("event:", "id:", "retry:")):
                    continue
                raise ReasonerError(f"the chat-completions server sent something that is not an event stream: "
                                    f"{line[:80]!r}")
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            try:
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ReasonerError(f"the chat-completions server reported an error: {chunk['error']}")
                choices = chunk["choices"]
                delta = choices[0].get("delta", {}) if choices else {}
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ReasonerError(f"the chat-completions server sent an invalid chunk: {data[:80]!r}") from exc
            piece = delta.get("content") or ""
            text += piece
            unsent += piece
            if len(unsent) >= PROGRESS_CHARS and " " in unsent:
                cut = unsent.rindex(" ") + 1
                emit(unsent[:cut].strip())
                unsent = unsent[cut:]
            for fragment in delta.get("tool_calls") or []:
                _merge_tool_call(calls, fragment)
        if not done:
            raise ReasonerError("the chat-completions stream ended without [DONE]")
        if unsent.strip() and calls:
            emit(unsent.strip())  # the last words before the tool calls; a final answer is the result instead
        return text, [calls[i] for i in sorted(calls)]


def _merge_tool_call(calls: dict[int, dict[str, Any]], fragment: dict[str, Any]) -> None:
    """Fold one streamed ``tool_calls`` fragment into the calls gathered so far (by ``index``)."""
    try:
        index = int(fragment.get("index", 0))
        call = calls.setdefault(index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        if fragment.get("id"):
            call["id"] = fragment["id"]
        fn = fragment.get("function") or {}
        if fn.get("name"):
            call["function"]["name"] += fn["name"]
        if fn.get("arguments"):
            call["function"]["arguments"] += fn["arguments"]
    except (TypeError, ValueError, AttributeError) as exc:
        raise ReasonerError(f"the chat-completions server sent an invalid tool call: {fragment!r:.80}") from exc
    if not call["id"]:
        call["id"] = f"call_{index}"
