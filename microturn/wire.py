"""The gateway ↔ inference-worker protocol: binary WebSocket messages carrying micro-turns in and outputs out.

One WebSocket (``GET /v1/worker`` on a worker, ``Authorization: Bearer WORKER_TOKEN``) per gateway–worker pair;
the sessions of that gateway on that worker are multiplexed over it. Every WebSocket message is one binary frame::

    offset  size  field
    0       2     magic  b"MT"
    2       1     version (1)
    3       1     kind   (see Kind)
    4       4     H: length of the header, unsigned little-endian
    8       H     header: a UTF-8 JSON object; its "blobs" lists the byte length of each blob that follows
    8 + H   …     the blobs, back to back (their lengths sum to the rest of the frame)

Audio blobs are little-endian float32 mono at 16 kHz; a video blob is RGB uint8 rows of the ``video`` [height,
width] the header gives. Kinds, their header fields and blobs:

=========  ===============  ======================================================  ====================================
kind       direction        header                                                  blobs
=========  ===============  ======================================================  ====================================
HELLO      worker→gateway   worker_id, model, capacity, sessions, draining          —
LOAD       worker→gateway   sessions, capacity, draining (sent every second and     —
                            when it changes)
OPEN       gateway→worker   sid, seed, restore (false: a new session; true: rebuild  with restore: the session's context
                            it from the blobs)                                      records so far, in order
OPENED     worker→gateway   sid, error (absent when it worked)                      —
TURN       gateway→worker   sid, index, late, text[], events[{name, data}],         audio (3200 float32), then video
                            background[], video ([h, w] or null)                    when ``video`` is set
OUTPUT     worker→gateway   sid, index, text, events[{name, data}], worker_s        audio (≤ 3200 float32), context
                            (seconds the micro-turn spent in the worker)            record
FAILED     worker→gateway   sid, index, error: the micro-turn was not stepped       —
                            (session not open, worker overloaded, model error)
CLOSE      gateway→worker   sid                                                     —
=========  ===============  ======================================================  ====================================

Backpressure: a worker queues at most :data:`MAX_QUEUED_PER_SESSION` micro-turns per session and answers any more
with FAILED at once; a gateway keeps the micro-turns it sent until their OUTPUT (or FAILED) comes back, so that
when a worker dies it can send them again to the worker that takes the session over.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from microturn.contracts import ControlEvent, MicroTurn, MicroTurnOutput, OutputEvent

MAGIC = b"MT"
VERSION = 1
MAX_QUEUED_PER_SESSION = 8  # micro-turns of one session waiting in a worker (1.6 s); more are refused
_PREFIX = struct.Struct("<2sBBI")


class Kind(enum.IntEnum):
    HELLO = 1
    LOAD = 2
    OPEN = 3
    OPENED = 4
    TURN = 5
    OUTPUT = 6
    FAILED = 7
    CLOSE = 8


class WireError(ValueError):
    """A frame that does not follow the protocol."""


@dataclass
class Frame:
    kind: Kind
    header: dict[str, Any] = field(default_factory=dict)
    blobs: list[bytes] = field(default_factory=list)


def encode(kind: Kind, header: dict[str, Any], blobs: list[bytes] | tuple[bytes, ...] = ()) -> bytes:
    head = json.dumps({**header, "blobs": [len(b) for b in blobs]}, separators=(",", ":")).encode()
    return b"".join([_PREFIX.pack(MAGIC, VERSION, kind, len(head)), head, *blobs])


def decode(data: bytes) -> Frame:
    """Parse one frame; :class:`WireError` says what is wrong with a bad one."""
    if len(data) < _PREFIX.size:
        raise WireError(f"frame of {len(data)} bytes is shorter than its {_PREFIX.size}-byte prefix")
    magic, version, kind, head_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}")
    if version != VERSION:
        raise WireError(f"protocol version {version} is not supported (this side speaks {VERSION})")
    try:
        frame_kind = Kind(kind)
    except ValueError:
        raise WireError(f"unknown frame kind {kind}") from None
    start = _PREFIX.size + head_len
    if start > len(data):
        raise WireError("header runs past the end of the frame")
    try:
        header = json.loads(data[_PREFIX.size:start])
    except ValueError as exc:
        raise WireError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WireError("header is not a JSON object")
    lengths = header.pop("blobs", [])
    if not isinstance(lengths, list) or not all(isinstance(n, int) and n >= 0 for n in lengths):
        raise WireError("blobs must be a list of byte lengths")
    if start + sum(lengths) != len(data):
        raise WireError(f"blob lengths sum to {sum(lengths)} but {len(data) - start} bytes follow the header")
    blobs = []
    for n in lengths:
        blobs.append(bytes(data[start:start + n]))
        start += n
    return Frame(frame_kind, header, blobs)


def _events(items: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(items, list):
        raise WireError("events must be a list")
    out = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise WireError("an event needs a name")
        out.append((item["name"], dict(item.get("data") or {})))
    return out


def encode_turn(turn: MicroTurn) -> bytes:
    blobs = [turn.audio.astype("<f4", copy=False).tobytes()]
    video = None
    if turn.video is not None:
        video = [int(turn.video.shape[0]), int(turn.video.shape[1])]
        blobs.append(np.ascontiguousarray(turn.video).tobytes())
    header = {"sid": turn.session_id, "index": turn.index, "late": turn.late, "text": list(turn.text),
              "events": [{"name": e.name, "data": e.data} for e in turn.events],
              "background": list(turn.background), "video": video}
    return encode(Kind.TURN, header, blobs)


def decode_turn(frame: Frame) -> MicroTurn:
    h = frame.header
    try:
        video = None
        if h.get("video") is not None:
            height, width = (int(v) for v in h["video"])
            video = np.frombuffer(frame.blobs[1], np.uint8).reshape(height, width, 3).copy()
        return MicroTurn(
            session_id=str(h["sid"]), index=int(h["index"]),
            audio=np.frombuffer(frame.blobs[0], "<f4").astype(np.float32),
            video=video, text=tuple(str(t) for t in h.get("text", [])),
            events=tuple(ControlEvent(name, data) for name, data in _events(h.get("events", []))),
            late=bool(h.get("late", False)), background=tuple(str(b) for b in h.get("background", [])))
    except WireError:
        raise
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise WireError(f"bad TURN frame: {exc}") from None


def encode_output(output: MicroTurnOutput, worker_s: float) -> bytes:
    header = {"sid": output.session_id, "index": output.index, "text": output.text,
              "events": [{"name": e.name, "data": e.data} for e in output.events], "worker_s": worker_s}
    return encode(Kind.OUTPUT, header, [output.audio.astype("<f4", copy=False).tobytes(), output.context])


def decode_output(frame: Frame) -> tuple[MicroTurnOutput, float]:
    """The output and the seconds its micro-turn spent inside the worker."""
    h = frame.header
    try:
        output = MicroTurnOutput(
            session_id=str(h["sid"]), index=int(h["index"]),
            audio=np.frombuffer(frame.blobs[0], "<f4").astype(np.float32), text=str(h.get("text", "")),
            events=tuple(OutputEvent(name, data) for name, data in _events(h.get("events", []))),
            context=frame.blobs[1])
        return output, float(h.get("worker_s", 0.0))
    except WireError:
        raise
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise WireError(f"bad OUTPUT frame: {exc}") from None
