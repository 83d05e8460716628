"""Reasoners: what does a background task's work, behind one interface.

A :class:`Reasoner` gets the conversation so far and the request, reports partial results through ``emit`` as it
goes, and returns the final result — or raises :class:`ReasonerError` with a message fit to show. Two ship:

- :class:`ToolAgent`, built in: a small deterministic planner that picks one of the typed tools
  (:mod:`inference.background.tools`) from the request text — arithmetic → ``calculator``, "time in X" →
  ``clock``, "convert 5 km to miles" → ``convert_units``, a URL → ``http_get``, anything else → ``search`` — and
  reports the tool call as progress, then its result. ``/spin SECONDS`` is a diagnostic: CPU-bound work for that
  long, with progress at each quarter (the background benchmark and tests use it);
- :class:`~inference.background.openai_compat.ChatCompletionsReasoner`: any OpenAI-compatible chat-completions
  server (SGLang, vLLM), streaming, with the built-in tools offered to it.

:class:`ReasonerSpec` is the picklable description a worker process builds its reasoner from.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from inference.background.tools import Toolbox, ToolConfig

Emit = Callable[[str], None]


class ReasonerError(Exception):
    """The task cannot be done; the message says why (it becomes the ``background_failed`` event)."""


class Reasoner(Protocol):
    """Does one task: ``conversation`` is the session's text so far, ``request`` what is asked."""

    async def run(self, conversation: str, request: str, emit: Emit) -> str: ...


@dataclass(frozen=True)
class ReasonerSpec:
    """Which reasoner a worker builds, and its settings (picklable; secrets stay out of ``repr``)."""

    kind: str = "builtin"  # builtin | openai
    tools: ToolConfig = field(default_factory=ToolConfig)
    openai_url: str | None = None  # base URL, e.g. http://sglang:30000/v1
    openai_key: str | None = field(default=None, repr=False)
    openai_model: str = "default"
    openai_timeout_s: float = 30.0  # the whole task's requests
    openai_read_timeout_s: float = 10.0  # silence between two streamed chunks

    def build(self) -> Reasoner:
        if self.kind == "builtin":
            return ToolAgent(Toolbox(self.tools))
        if self.kind == "openai":
            from inference.background.openai_compat import ChatCompletionsReasoner

            if not self.openai_url:
                raise ReasonerError("the openai reasoner needs background_openai_url")
            return ChatCompletionsReasoner(self.openai_url, self.openai_key, self.openai_model, Toolbox(self.tools),
                                           self.openai_timeout_s, self.openai_read_timeout_s)
        raise ReasonerError(f"unknown reasoner {self.kind!r}; choose builtin or openai")


_ARITHMETIC = re.compile(r"^[\d\s.+\-*/%^()×÷,a-z]*\d[\d\s.+\-*/%^()×÷,a-z]*$")
_CONVERT = re.compile(r"(-?\d+(?:\.\d+)?)\s*([^\s\d]+(?:\s?/\s?[a-z]+)?)\s+(?:to|in|into)\s+([^\s?.!]+)", re.I)
_TIME = re.compile(r"\btime\b(?:\s+is\s+it)?\s+(?:in|at)\s+([a-z_/ ]+?)\s*[?.!]*$", re.I)
_URL = re.compile(r"https?://\S+")
_LEAD = re.compile(r"^(?:please\s+)?(?:calculate|compute|evaluate|what\s+is|what's|how\s+much\s+is)\s+", re.I)


class ToolAgent:
    """The built-in reasoner: one tool, chosen from the request text, and its result."""

    def __init__(self, toolbox: Toolbox) -> None:
        self.toolbox = toolbox

    def plan(self, request: str) -> tuple[str, dict[str, object]]:
        """The tool and arguments for ``request`` (no tool is run)."""
        text = request.strip()
        url = _URL.search(text)
        if url:
            return "http_get", {"url": url.group(0).rstrip(").,;")}
        if m := _TIME.search(text):
            return "clock", {"zone": m.group(1).strip()}
        if (m := _CONVERT.search(text)) and re.search(r"\b(convert|to|in|into)\b", text, re.I):
            unit_from = m.group(2).replace(" ", "")
            if not re.fullmatch(r"[*/+\-^%]+", unit_from):
                return "convert_units", {"value": float(m.group(1)), "from": unit_from, "to": m.group(3)}
        expression = _LEAD.sub("", text).rstrip("?=. ")
        if _ARITHMETIC.match(expression.lower()) and re.search(r"\d\s*[-+*/%^×÷]|\w\(", expression):
            return "calculator", {"expression": expression}
        return "search", {"query": text}

    async def run(self, conversation: str, request: str, emit: Emit) -> str:
        if request.startswith("/spin "):
            return spin(request, emit)
        name, args = self.plan(request)
        if name not in self.toolbox.tools:
            raise ReasonerError(f"no tool can answer {request!r} (document search is not configured)")
        shown = ", ".join(f"{k}={v!r}" for k, v in args.items())
        emit(f"{name}({shown})")
        result = await asyncio.to_thread(self.toolbox.call, name, args)
        if not result.ok:
            raise ReasonerError(result.text)
        return result.text


def spin(request: str, emit: Emit) -> str:
    """``/spin SECONDS``: CPU-bound work (a diagnostic load) for that long, progress at each quarter."""
    try:
        seconds = float(request.split()[1])
    except (IndexError, ValueError) as exc:
        raise ReasonerError("usage: /spin SECONDS") from exc
    if not 0 <= seconds <= 600:
        raise ReasonerError("/spin takes 0 to 600 seconds")
    start, quarter, x = time.perf_counter(), 1, 0
    while (elapsed := time.perf_counter() - start) < seconds:
        for i in range(20_000):
            x = (x * 31 + i) % 1_000_003
        if quarter < 4 and elapsed >= seconds * quarter / 4:
            emit(f"spinning: {quarter * 25}%")
            quarter += 1
    while quarter < 4:  # a short spin still reports every quarter, so reruns report the same
        emit(f"spinning: {quarter * 25}%")
        quarter += 1
    return f"spun for {seconds:g} s"
