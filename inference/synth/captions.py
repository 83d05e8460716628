"""Caption alignment: a model utterance's text spread over the micro-turns its audio covers.

The rule: an utterance of text ``s`` (plus one trailing space, the separator from the next utterance) rendered as
``length`` samples from sample ``start`` is cut into words (a word keeps the spaces after it); the word whose first
character is character ``i`` of the text is placed in the micro-turn that holds sample ``start + ⌊length · i /
len⌋`` — the text is spread over the audio in proportion to its duration, at word boundaries. Words placed at or
after ``stop`` (where the audio was cut short by an interruption) were never said and are dropped. A background
request span (``REQUEST_OPEN`` request ``REQUEST_CLOSE``) is written before the first word, in the utterance's first
micro-turn: it is not spoken.
"""

from __future__ import annotations

import re

from inference.tokenizer import REQUEST_CLOSE, REQUEST_OPEN
from microturn.contracts import MICRO_TURN_SAMPLES

_WORD = re.compile(r"\S+\s*")


def caption_pieces(text: str, start: int, length: int, stop: int, request: str = "") -> dict[int, str]:
    """Micro-turn index → the caption text written in it, for an utterance at ``[start, start + length)`` whose
    audio stops at ``stop`` (``start + length`` when it was not cut)."""
    line = text + " "
    pieces: dict[int, str] = {}
    if request:
        pieces[start // MICRO_TURN_SAMPLES] = REQUEST_OPEN + request + REQUEST_CLOSE
    for word in _WORD.finditer(line):
        at = start + length * word.start() // len(line)
        if at < stop:
            turn = at // MICRO_TURN_SAMPLES
            pieces[turn] = pieces.get(turn, "") + word.group()
    return pieces
