"""The listening probe: a training-only head that names the words the user has just said.

The model's own losses reward hearing the user's words only where an answer depends on them, a few micro-turns
per question, and through a long path (the question's audio, attention, the depth head, the caption's first bytes).
This auxiliary task gives hearing a dense signal of its own: a linear probe on the trunk's state at the last
user-side token of every micro-turn (the row the model side is predicted from) says which of the user's words
ended in that micro-turn, one logit per word of the train split's vocabulary (multi-label); with a ``span``, which
words it said in the last ``span`` micro-turns, so that the trunk must gather a question's words in one state.
Where a word ends follows a proportional rule like the captions' (:mod:`inference.synth.captions`): an utterance's
text is spread over its audio in proportion to its length, and a word ends at the sample its last character's
share ends at.

With an audio encoder (:mod:`inference.audio_encoder`) the probe may instead listen at the encoder (``at =
"encoder"``, ``microturn train --listen-at encoder``): it then reads what the encoder's convolutions heard for the
micro-turn's last audio-in token (before their projection into the trunk). That trains the encoder to recognise
words directly, the way a speech recogniser is trained, instead of through the trunk.

The probe is not part of the served model: ``microturn train --listen-weight W`` trains it beside the model and
keeps it in the run's ``state.pt`` only.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from microturn.contracts import MICRO_TURN_SAMPLES

_WORD = re.compile(r"[A-Za-z']+")

PLACES = ("trunk", "encoder")
"""Where a probe listens: the trunk's state at a micro-turn's last user-side token, or the audio encoder's features
of its last audio-in token."""


def words_of(text: str) -> list[tuple[str, int]]:
    """The words of ``text`` (lowercase letters and apostrophes; numbers written in digits are not words here),
    each with the index just past its last character."""
    return [(m.group().lower(), m.end()) for m in _WORD.finditer(text)]


def vocabulary(metas: list[dict[str, Any]], min_count: int = 2) -> list[str]:
    """The words the user says in these conversations at least ``min_count`` times, sorted."""
    counts = Counter(word for meta in metas for text in meta["user_speech_text"] for word, _ in words_of(text))
    return sorted(word for word, n in counts.items() if n >= min_count)


def vocabulary_of(conversations: list[Path]) -> list[str]:
    """The :func:`vocabulary` of these conversations (their ``.npz`` or ``.json`` paths)."""
    return vocabulary([json.loads(p.with_suffix(".json").read_text()) for p in conversations])


def heard(meta: dict[str, Any], vocab: list[str], start: int, length: int, span: int = 1) -> torch.Tensor:
    """(length, V) 0/1: which words of ``vocab`` the user finished saying in micro-turns ``[start, start +
    length)`` of a conversation (its ``user_speech`` spans and ``user_speech_text``). With ``span`` > 1 a word
    stays heard for ``span`` micro-turns from the one it ends in: the target is then what the user said in the
    last ``span`` micro-turns (a question's words, together, by the time it is answered)."""
    if span < 1:
        raise ValueError(f"a word is heard for at least one micro-turn, not {span}")
    index = {word: i for i, word in enumerate(vocab)}
    out = torch.zeros(length, len(vocab))
    for (first, last), text in zip(meta["user_speech"], meta["user_speech_text"], strict=True):
        for word, end in words_of(text):
            if word not in index:
                continue
            sample = min(first + (last - first) * end // max(1, len(text)), last - 1)
            ends = sample // MICRO_TURN_SAMPLES - start
            out[max(0, ends):max(0, min(length, ends + span)), index[word]] = 1.0
    return out


class ListenProbe(nn.Module):
    """A linear probe from the trunk's state (d), or the audio encoder's features, to one logit per vocabulary word.

    It starts with zero weights, so its first step sends no gradient into a trained trunk (the trunk's share then
    grows as the probe learns), and with every word unlikely (a bias of −log V, near a word's base rate), so its
    first losses are not spent on learning that most words are not said in most micro-turns."""

    def __init__(self, d_in: int, vocab: list[str], at: str = "trunk") -> None:
        super().__init__()
        if at not in PLACES:
            raise ValueError(f"a listening probe listens at one of {', '.join(PLACES)}, not {at!r}")
        self.vocab, self.at = list(vocab), at
        self.head = nn.Linear(d_in, len(vocab))
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, -math.log(max(2, len(vocab))))

    def loss(self, state: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of (M, d_in) states against (M, V) words heard, summed over the words and
        averaged over micro-turns (a micro-turn holds a word or two of a few hundred)."""
        logits = self.head(state)
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / max(1, len(state))
