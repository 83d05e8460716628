"""The data-channel protocol: JSON messages between the browser and the gateway.

Every message is one JSON object with a ``type``. The data channel is named ``microturn``.

Browser → gateway:

- ``{"type": "text", "text": "..."}`` — typed user text (1–2000 characters); it enters the micro-turn in which it
  arrived.
- ``{"type": "control", "name": "...", "data": {...}}`` — a control event (``name`` one of :data:`CONTROL_NAMES`);
  it enters the micro-turn in which it arrived.
- ``{"type": "ping", "id": N}`` — answered at once with ``{"type": "pong", "id": N, "server_time": T}``.

Gateway → browser:

- ``{"type": "session", "session_id": "...", "micro_turn_ms": 200}`` — sent when the channel opens.
- ``{"type": "caption", "turn": K, "text": "..."}`` — what the model said in micro-turn K (a delta).
- ``{"type": "event", "turn": K, "name": "...", "data": {...}}`` — something the model did (e.g. a background task).
- ``{"type": "error", "code": "...", "message": "..."}`` — a message was refused; the session goes on (except
  ``session_expired``: the session reached ``max_session_s`` and ends).
- ``{"type": "reconnect", "reason": "..."}`` — this gateway is going away (drain): resume the session elsewhere.
- ``{"type": "pong", ...}`` — see ping.

Messages larger than the configured limit (4096 bytes by default), binary messages, invalid JSON and unknown types
are refused with an ``error`` message; nothing else happens to the session.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

CHANNEL_LABEL = "microturn"
CONTROL_NAMES = frozenset({"mute", "unmute", "camera_on", "camera_off", "interrupt", "reset_view"})


class MessageError(Exception):
    """A browser message the gateway refuses; ``code`` goes into the error event."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class TextMessage:
    text: str


@dataclass(frozen=True)
class ControlMessage:
    name: str
    data: dict[str, Any]


@dataclass(frozen=True)
class PingMessage:
    id: int | str


ClientMessage = TextMessage | ControlMessage | PingMessage


def parse_client_message(raw: str | bytes, max_bytes: int, max_text_chars: int) -> ClientMessage:
    """Parse and validate one browser message, or raise :class:`MessageError`."""
    if isinstance(raw, bytes):
        raise MessageError("binary_not_supported", "binary messages are not accepted; send JSON text")
    if len(raw.encode("utf-8", "surrogatepass")) > max_bytes:
        raise MessageError("too_large", f"message is larger than {max_bytes} bytes")
    try:
        msg = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise MessageError("invalid_json", f"message is not valid JSON: {exc.msg}") from exc
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise MessageError("invalid_message", 'message must be a JSON object with a string "type"')
    kind = msg["type"]
    if kind == "text":
        text = msg.get("text")
        if not isinstance(text, str) or not text.strip():
            raise MessageError("invalid_message", 'a text message needs a non-empty string "text"')
        if len(text) > max_text_chars:
            raise MessageError("too_large", f"text is longer than {max_text_chars} characters")
        return TextMessage(text)
    if kind == "control":
        name, data = msg.get("name"), msg.get("data", {})
        if name not in CONTROL_NAMES:
            raise MessageError("unknown_control", f"control name must be one of {sorted(CONTROL_NAMES)}")
        if not isinstance(data, dict):
            raise MessageError("invalid_message", 'control "data" must be an object')
        return ControlMessage(name, data)
    if kind == "ping":
        ping_id = msg.get("id")
        if not isinstance(ping_id, int | str) or isinstance(ping_id, bool):
            raise MessageError("invalid_message", 'a ping needs an "id" (number or string)')
        return PingMessage(ping_id)
    raise MessageError("unknown_type", f"unknown message type {kind!r}")


def encode(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)
