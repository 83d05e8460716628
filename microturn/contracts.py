"""The contracts between the parts of microturn.

Every part depends on these small dataclasses, never on another part's internals:

- the gateway builds a :class:`MicroTurn` for each 200 ms of a session's input and hands it to an engine;
- the engine returns one :class:`MicroTurnOutput` for each micro-turn it was given;
- the session store keeps one :class:`SessionRecord` per session.

Audio inside the contracts is always mono float32 at :data:`SAMPLE_RATE` in [-1, 1]; video is an RGB uint8 array
whose sides are multiples of :data:`PATCH`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import asyncio

import numpy as np

SAMPLE_RATE = 16_000
"""Sample rate of the input timeline and of model audio (Hz)."""

MICRO_TURN_MS = 200
"""Length of one micro-turn (ms)."""

MICRO_TURN_SAMPLES = SAMPLE_RATE * MICRO_TURN_MS // 1000
"""Samples of one micro-turn at :data:`SAMPLE_RATE` (3200)."""

PATCH = 40
"""Side of a video patch (px); video frames given to the model are multiples of it."""

VIDEO_WIDTH = 160
VIDEO_HEIGHT = 120
"""Size the gateway downscales video to before it reaches the model: 4 × 3 patches."""


@dataclass(frozen=True)
class ControlEvent:
    """A control event from the browser (e.g. ``camera_off``), placed in the micro-turn in which it arrived."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MicroTurn:
    """Everything one session gave the model during one 200 ms micro-turn.

    ``audio`` holds samples ``[index * 3200, (index + 1) * 3200)`` of the session's input timeline; samples that never
    arrived are silence. ``late`` is set when the micro-turn was dispatched at its deadline rather than complete.
    ``background`` is the session's background input stream: what its background tasks reported since the last
    micro-turn, in order, each exactly once (see :mod:`inference.background`).
    """

    session_id: str
    index: int
    audio: np.ndarray  # (3200,) float32, 16 kHz mono
    video: np.ndarray | None = None  # (H, W, 3) uint8 RGB, H and W multiples of PATCH; None: no camera
    text: tuple[str, ...] = ()  # user text typed during this micro-turn
    events: tuple[ControlEvent, ...] = ()
    late: bool = False
    background: tuple[str, ...] = ()  # background-model results (partial or final) woven into this micro-turn

    def __post_init__(self) -> None:
        if self.audio.shape != (MICRO_TURN_SAMPLES,) or self.audio.dtype != np.float32:
            raise ValueError(f"micro-turn audio must be float32 ({MICRO_TURN_SAMPLES},), got "
                             f"{self.audio.dtype} {self.audio.shape}")
        if self.video is not None and (
            self.video.ndim != 3 or self.video.shape[2] != 3 or self.video.dtype != np.uint8
            or self.video.shape[0] % PATCH or self.video.shape[1] % PATCH
        ):
            raise ValueError(f"micro-turn video must be uint8 (H, W, 3) with sides multiple of {PATCH}, "
                             f"got {self.video.dtype} {self.video.shape}")


@dataclass(frozen=True)
class OutputEvent:
    """Something the model did that the browser may show (e.g. ``background_started``)."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MicroTurnOutput:
    """What the model produced for one micro-turn: audio (silence is an ordinary output), caption text, events."""

    session_id: str
    index: int
    audio: np.ndarray  # (≤3200,) float32, 16 kHz mono
    text: str = ""  # caption delta: what the model said (or wrote) in this micro-turn
    events: tuple[OutputEvent, ...] = ()
    context: bytes = b""  # compact record of this micro-turn, enough to rebuild the session elsewhere (see restore)


@dataclass
class SessionRecord:
    """What the session store keeps about one session."""

    session_id: str
    owner: str  # id of the gateway that holds the peer connection
    model: str  # engine model name, e.g. "echo" or "reference"
    created: float  # unix seconds
    last_seen: float  # unix seconds
    micro_turn: int = 0  # index of the last micro-turn dispatched, -1 before the first
    state: str = "new"  # new → connected → closed
    config: dict[str, Any] = field(default_factory=dict)
    resume_hash: str = ""  # SHA-256 of the one resume token that may move the session now
    seed: int = 0  # the model's per-session seed: a rebuilt session samples as the original did
    owner_url: str = ""  # where other gateways reach the owner's HTTP API (Settings.advertise_url; "" if not set)


class ModelBackend(Protocol):
    """A model as the engine drives it: per-session state, stepped a batch of micro-turns at a time.

    All methods are called from the engine's tick thread only, never from the event loop, so a backend needs no locks.
    ``step`` gets at most one micro-turn per session and returns one output per micro-turn, in the same order.

    Rebuilding a session elsewhere: every output carries ``context``, a compact, model-specific record of its
    micro-turn (the model's input features and its own output tokens; never raw audio or video). ``restore`` opens
    a session given the ``context`` records of all its micro-turns so far, in order, so that stepping it on gives
    exactly the outputs the original session would have given.
    """

    name: str

    def open(self, session_id: str, seed: int) -> None: ...

    def step(self, turns: list[MicroTurn]) -> list[MicroTurnOutput]: ...

    def restore(self, session_id: str, seed: int, history: list[bytes]) -> None: ...

    def close(self, session_id: str) -> None: ...


class MicroTurnEngine(Protocol):
    """What the gateway drives: an engine in this process (:class:`inference.engine.Engine`) or remote inference
    workers (:class:`webrtc_gateway.workers.RemoteEngine`). All methods are called on the event loop."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def open_session(self, session_id: str, seed: int = 0, history: list[bytes] | None = None) -> None:
        """Open a session; with ``history`` (its micro-turns' context records) rebuild it where it left off."""
        ...

    def submit(self, turn: MicroTurn) -> asyncio.Future[MicroTurnOutput]:
        """Queue a micro-turn without blocking; the future gives its output, or fails with
        :class:`SessionClosed` (the session was closed) or :class:`TurnNotStepped` (it could not be stepped)."""
        ...

    async def close_session(self, session_id: str) -> None: ...


class SessionClosed(Exception):
    """The session was closed while one of its micro-turns was waiting."""


class TurnNotStepped(Exception):
    """A micro-turn the engine could not step (no worker available, worker overloaded, model error): the session
    goes on, this micro-turn produces nothing, and the model's context does not include it."""
