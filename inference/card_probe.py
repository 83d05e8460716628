"""The card probe: a training-only head that names the card on the camera, from the stem or from the trunk.

A question about a card ("what shape is this?") rewards seeing the card only in the first caption bytes of its
answer, a few hundred times in a run over conversations: far too little to learn shapes and digits. This task
gives seeing a dense signal of its own: a linear probe says which card is shown, one of :data:`NAMES` (a colour
card's colour, a shape card's shape, a number card's digit). It reads either

- the stem's token for a frame's thumbnail (:mod:`inference.video`): ``microturn train --parts stem`` trains the
  patch stem alone on cards drawn fresh for every step by :mod:`inference.synth.cards` (tens of thousands a
  minute; the trunk and the heads do not run); or
- the trunk's state at each micro-turn's last user-side token (the row the model side is predicted from), in a
  run over conversations (``--card-weight W``): every micro-turn in which the camera shows a card that a question
  asks about is labelled with its answer (:func:`shown`), ten or more per question, so that the trunk learns to
  hold what it sees where the answer is read from.

The probe is kept in the run's ``state.pt`` only, never in the served checkpoint.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inference.config import ModelConfig
from inference.synth.cards import COLOURS, DIGITS, SHAPES, Card
from inference.video import fit_frame, patches_at
from microturn.contracts import MICRO_TURN_SAMPLES

NAMES: tuple[str, ...] = (*sorted(COLOURS), *SHAPES, *DIGITS)
"""What a card can show: 8 colours, 4 shapes, 10 digits (the answers of the visual questions)."""

KINDS = ("colour", "shape", "number")


def shown(meta: dict[str, Any], camera: np.ndarray, start: int, length: int) -> torch.Tensor:
    """(length,) for micro-turns ``[start, start + length)`` of a conversation (its labels ``meta``, its per
    micro-turn ``camera`` flags): the index in :data:`NAMES` of the card shown, -1 where none is known. A card's
    name is the answer of the visual question asked while it shows: the camera's run of micro-turns around the
    question's end."""
    labels = torch.full((length,), -1)
    for q in meta.get("questions", []):
        at = int(q["end"]) // MICRO_TURN_SAMPLES
        if q["kind"] != "visual" or at >= len(camera) or not camera[at]:
            continue
        first, last = at, at
        while first > 0 and camera[first - 1]:
            first -= 1
        while last + 1 < len(camera) and camera[last + 1]:
            last += 1
        labels[max(first, start) - start:max(0, min(last + 1, start + length) - start)] = NAMES.index(q["answer"])
    return labels


def draw_cards(rng: np.random.Generator, n: int, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` random cards (each kind equally often) as the stem sees their thumbnails: (n, 3, 40, 40) uint8
    pixels, (n, 2) places and (n,) indices into :data:`NAMES`."""
    pixels, places, labels = [], [], []
    for _ in range(n):
        card = Card.draw(rng, KINDS[int(rng.integers(len(KINDS)))])
        frame = fit_frame(card.frame(), cfg.video_height, cfg.video_width)
        p, g = patches_at(frame, [cfg.patches])
        pixels.append(p)
        places.append(g)
        labels.append(NAMES.index(card.answer))
    return torch.cat(pixels), torch.cat(places), torch.tensor(labels)


class CardProbe(nn.Module):
    """Linear head: a thumbnail's stem token or the trunk's state (N, d_model) → logits over :data:`NAMES`
    (N, 22)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.head = nn.Linear(d_model, len(NAMES))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(features), labels)

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self(features).argmax(dim=-1) == labels).float().mean())
