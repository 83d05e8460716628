"""Text tokens: UTF-8 bytes plus a few special tokens. Needs no download and never meets an unknown character.

Ids 0–255 are bytes. The specials mark what a run of text is, or what the model decided:

- ``PAD``: "no text here" (a caption slot the model leaves empty);
- ``SPEAK`` / ``SILENT``: the model's first output of every micro-turn: whether it speaks in it;
- ``NO_VIDEO``: a video slot while the camera is off;
- ``USER`` / ``TOOL`` / ``EVENT``: start of user-typed text, of a background-model result, of a control event
  name. """

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


class CaptionDecoder:
    """Turns a stream of output token ids into text deltas; a character split across micro-turns waits."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: list[int]) -> str:
        return self._decoder.decode(bytes(i for i in ids if i < 256))
