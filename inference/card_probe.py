"""The card probe: a training-only head that names the card on the camera from its thumbnail's token.

A question about a card ("what shape is this?") rewards seeing the card only in the first caption bytes of its
answer, a few hundred times in a run over conversations: far too little for the patch stem to learn shapes and
digits. This task gives seeing a dense signal of its own: a linear probe on the stem's token for a frame's thumbnail
(:mod:`inference.video`) says which card it shows, one of :data:`NAMES` (a colour card's colour, a shape card's
shape, a number card's digit). The cards are drawn fresh for every step by :mod:`inference.synth.cards`, so the
stem sees tens of thousands of them in a minute.

``microturn train --parts stem`` trains the patch stem alone on this task (the trunk and the heads do not run);
the probe is kept in the run's ``state.pt`` only, never in the served checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inference.config import ModelConfig
from inference.synth.cards import COLOURS, DIGITS, SHAPES, Card
from inference.video import fit_frame, patches_at

NAMES: tuple[str, ...] = (*sorted(COLOURS), *SHAPES, *DIGITS)
"""What a card can show: 8 colours, 4 shapes, 10 digits (the answers of the visual questions)."""

KINDS = ("colour", "shape", "number")


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
    """Linear head: a thumbnail's stem token (N, d_model) → logits over :data:`NAMES` (N, 22)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.head = nn.Linear(d_model, len(NAMES))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(features), labels)

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self(features).argmax(dim=-1) == labels).float().mean())
