"""Background tasks: what was asked, where it stands, what it produced, and what of it the model has heard.

A :class:`Task` moves ``queued → running → done | failed | cancelled`` (a terminal state never changes again).
Its *items* are what it tells the conversation, numbered in order: item 0 is ``started``, then one per partial
result (``progress``), then the final ``result``, ``failed`` or ``cancelled``. Each item is woven into the session's
context (and sent to the browser as a ``background_*`` event) exactly once: the gateway records, atomically with the
conversation-log entry of the micro-turn that carried it, how many items of each task were delivered
(``delivered``), so a session resumed elsewhere goes on with the first item not yet delivered.

:class:`Transcript` is the conversation text a task is given: the model's caption stream, typed user text and
event history, bounded.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

TaskState = Literal["queued", "running", "done", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"done", "failed", "cancelled"})
ItemKind = Literal["started", "progress", "result", "failed", "cancelled"]


@dataclass
class Task:
    """One background task of one session."""

    task_id: str
    session_id: str
    request: str
    source: str = "api"  # "api" (an integrator's backend) or "model" (the interaction model's reserved span)
    state: TaskState = "queued"
    partials: list[str] = field(default_factory=list)
    result: str | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL

    def items(self) -> list[BackgroundItem]:
        """Everything this task has to tell the conversation so far, in order (see the module docstring)."""
        out = [BackgroundItem(self.task_id, 0, "started", "", {"request": self.request, "source": self.source})]
        for i, text in enumerate(self.partials):
            out.append(BackgroundItem(self.task_id, 1 + i, "progress", text, {"text": text}))
        final = 1 + len(self.partials)
        if self.state == "done":
            out.append(BackgroundItem(self.task_id, final, "result", self.result or "", {"text": self.result}))
        elif self.state == "failed":
            out.append(BackgroundItem(self.task_id, final, "failed", f"failed: {self.error}", {"error": self.error}))
        elif self.state == "cancelled":
            out.append(BackgroundItem(self.task_id, final, "cancelled", "cancelled", {}))
        return out

    def public(self) -> dict[str, Any]:
        """The task as the HTTP API shows it."""
        return {k: v for k, v in asdict(self).items() if k != "session_id"}

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str | bytes) -> Task:
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class BackgroundItem:
    """One thing a task tells the conversation: context text for the model (may be empty) and a browser event."""

    task_id: str
    seq: int
    kind: ItemKind
    text: str
    data: dict[str, Any]

    @property
    def event_name(self) -> str:
        return f"background_{self.kind}"

    def event_data(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "seq": self.seq, **self.data}

    def context_text(self) -> str:
        """What the model hears (the TOOL text stream); empty for ``started``."""
        return "" if self.kind == "started" else self.text


class Transcript:
    """The text of a conversation, as a background task sees it; keeps the last ``max_chars`` characters."""

    def __init__(self, max_chars: int = 16_000) -> None:
        self.max_chars = max_chars
        self._lines: deque[str] = deque()
        self._chars = 0
        self._speaking = False

    def model(self, text: str) -> None:
        """A caption delta: the model's own text stream, joined into one line per stretch of speech."""
        if not text:
            return
        if self._speaking and self._lines:
            last = self._lines.pop()
            self._chars -= len(last)
            self._add(last + text)
        else:
            self._add("model: " + text)
        self._speaking = True

    def user(self, text: str) -> None:
        self._line("user: " + text)

    def event(self, text: str) -> None:
        self._line("event: " + text)

    def _line(self, line: str) -> None:
        self._speaking = False
        self._add(line)

    def _add(self, line: str) -> None:
        self._lines.append(line)
        self._chars += len(line)
        while self._chars > self.max_chars and len(self._lines) > 1:
            self._chars -= len(self._lines.popleft())

    def text(self) -> str:
        return "\n".join(self._lines)[-self.max_chars:]
