"""Text tokens: UTF-8 bytes plus a few special tokens. Needs no download and never meets an unknown character.

Ids 0–255 are bytes. The specials mark what a run of text is, or what the model decided:

- ``PAD``: "no text here" (a caption slot the model leaves empty);
- ``SPEAK`` / ``SILENT``: the model's first output of every micro-turn: whether it speaks in it;
- ``NO_VIDEO``: a video slot while the camera is off;
- ``USER`` / ``TOOL`` / ``EVENT``: start of user-typed text, of a background-model result (the *background* input
  stream: ``MicroTurn.background``), of a control event name.

The model's caption bytes carry one reserved span: ``REQUEST_OPEN`` (byte 0x02), the request's UTF-8 bytes, then
``REQUEST_CLOSE`` (0x03) asks the background model for a task (:class:`RequestSpans` cuts it out of the caption and
makes it a ``background_request`` event). """

from __future__ import annotations

import codecs

PAD = 256
SPEAK = 257
SILENT = 258
USER = 259
TOOL = 260
EVENT = 261
NO_VIDEO = 262
N_TOKENS = 263
"""Used ids; the model's vocabulary may be larger (rounded up), the extra ids are never produced."""


def encode(text: str, marker: int | None = None) -> list[int]:
    """Byte ids of ``text``, after ``marker`` if one is given."""
    ids = list(text.encode("utf-8"))
    return ids if marker is None else [marker, *ids]


REQUEST_OPEN = "\x02"
REQUEST_CLOSE = "\x03"
MAX_REQUEST_CHARS = 512


class RequestSpans:
    """Cuts reserved request spans out of a caption stream: ``feed(delta)`` → (visible text, finished requests).

    A span may stretch over many micro-turns (3 caption bytes each on ``tiny``); one longer than
    :data:`MAX_REQUEST_CHARS` is dropped. Its state is the open span only, rebuilt on restore by feeding the
    restored captions again.
    """

    def __init__(self) -> None:
        self._open: list[str] | None = None

    def feed(self, text: str) -> tuple[str, list[str]]:
        visible: list[str] = []
        requests: list[str] = []
        for ch in text:
            if ch == REQUEST_OPEN:
                self._open = []
            elif self._open is None:
                visible.append(ch)
            elif ch == REQUEST_CLOSE:
                request = "".join(self._open).strip()
                if request:
                    requests.append(request)
                self._open = None
            elif len(self._open) < MAX_REQUEST_CHARS:
                self._open.append(ch)
            else:
                self._open = None  # too long: not a request
        return "".join(visible), requests


class CaptionDecoder:
    """Turns a stream of output token ids into text deltas; a character split across micro-turns waits."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: list[int]) -> str:
        return self._decoder.decode(bytes(i for i in ids if i < 256))
