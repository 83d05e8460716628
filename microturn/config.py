"""All of microturn's settings, in one typed place.

Defaults are the embedded ones (in-process engine, in-memory state, the reference model from the checkpoint that
ships in the repository). Each field can be overridden by an environment variable ``MICROTURN_<FIELD>`` (upper
case) and then by the matching command-line flag; :func:`Settings.from_env` applies the first, :mod:`microturn.cli`
the second.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class Settings:
    """Gateway and engine settings."""

    host: str = "127.0.0.1"
    port: int = 8080
    model: str = "reference"  # reference (the interaction model) | echo | tally (diagnostics)
    checkpoint: Path | None = None  # reference model's folder (config.json + model.safetensors); None: the shipped one
    device: str = "cpu"
    redis: str | None = None  # redis://host:port/db; None keeps session records in memory
    gateway_id: str = field(default_factory=lambda: "gw-" + secrets.token_hex(4))
    # this gateway's HTTP API as the other gateways of a fleet reach it (http://POD_IP:8080): a session call that lands
    # on a gateway that does not hold the session is passed on to the one that does; None: answered here (404)
    advertise_url: str | None = None
    token_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))  # HMAC key for session tokens
    token_ttl_s: int = 600  # how long a session token may be used to connect
    resume_ttl_s: int = 3600  # how long a resume token stays valid (it is also replaced at every resume)
    ice_servers: tuple[str, ...] = ()  # e.g. stun:stun.example.org:3478; empty for loopback/LAN
    ice_host_addresses: tuple[str, ...] = ()  # host candidates to offer; empty: every interface but loopback
    allowed_origins: tuple[str, ...] = ()  # browser Origins allowed to call the API; empty: same origin only
    api_keys: tuple[str, ...] = ()  # keys that may create sessions (integrators' backends); empty: dev mode, open
    drain_timeout_s: float = 600.0  # on SIGTERM, how long live sessions may go on before being told to move
    max_sessions: int = 64  # in all: with ``processes`` > 1, each process takes its share
    processes: int = 1  # gateway processes behind this port (one event loop each); see webrtc_gateway/front.py
    process_index: int = 0  # which of them this is (set by the front; it decides the ids of sessions made here)
    max_sdp_bytes: int = 32_768
    max_message_bytes: int = 4_096  # largest data-channel message accepted
    max_text_chars: int = 2_000
    deadline_grace_ms: int = 60  # how long after its media end a micro-turn waits for late packets
    idle_timeout_s: float = 30.0  # a connected session whose media stops this long is closed
    connect_timeout_s: float = 30.0  # a session whose peer never connects is closed after this
    tick_budget_ms: float = 150.0  # a micro-turn slower than this from submit to output is reported late
    background_reasoner: str = "builtin"  # builtin (tool agent) | openai (an OpenAI-compatible server)
    background_documents: Path | None = None  # file or folder of .txt/.md the search tool indexes
    background_http_allow: tuple[str, ...] = ()  # hosts (or host:port) the http_get tool may fetch
    background_openai_url: str | None = None  # e.g. http://sglang:30000/v1
    background_openai_key: str | None = field(default=None, repr=False)  # that server's key (from the environment)
    background_openai_model: str = "default"
    # background worker processes running at once, per gateway: one core is left to media and the engine
    background_workers: int = field(default_factory=lambda: max(1, (os.cpu_count() or 2) - 1))
    background_max_tasks: int = 2  # background tasks a session may have queued or running at once
    background_timeout_s: float = 60.0  # a background task running longer is stopped and fails
    max_session_s: float = 1800.0  # a session older than this is ended (so a drain never has to wait longer)
    workers: tuple[str, ...] = ()  # ws://HOST:PORT/v1/worker URLs of inference workers; empty: in-process engine
    worker_token: str = field(default="", repr=False)  # shared secret gateways show workers; empty: dev mode, open
    worker_id: str = field(default_factory=lambda: "wk-" + secrets.token_hex(4))  # this worker's name (worker only)
    worker_capacity: int = 32  # sessions this worker takes at most (worker only)
    turn_urls: tuple[str, ...] = ()  # turn:HOST:PORT?transport=udp URLs handed to browsers with per-session credentials
    turn_secret: str = field(default="", repr=False)  # coturn's static-auth-secret (use-auth-secret REST credentials)
    turn_ttl_s: int = 3600  # how long a minted TURN credential is valid
    log_level: str = "INFO"
    log_format: str = "text"  # text | json (one JSON object per line, with the session id when there is one)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then ``MICROTURN_*`` environment variables, then ``overrides`` (values that are not None)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get("MICROTURN_" + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = str(f.type)
    if kind.startswith("tuple"):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if "Path" in kind:
        return Path(raw) if raw else None
    return raw or None if "None" in kind else raw
