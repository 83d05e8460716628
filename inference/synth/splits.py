"""Train / validation / test splits, disjoint by voice and by phrasing.

Which voices and templates each split gets (:class:`Assignment`) is drawn from the split seed (``data synth
--split-seed``, 0 by default), which conversation goes to which split (:func:`split_of`) from the set's seed; so sets
made with other seeds share their held-out voices and phrasings.

- Voices are split by variant: each espeak-ng variant (with every English voice name) belongs to one split, so a
  test voice (``name+variant``) is never heard in validation or training — nor is its timbre under another accent.
- Templates are split per kind and per edition (:data:`~inference.synth.phrasing.EDITIONS`): each kind gives
  ``round(12 %)`` (at least one) of an edition's templates to test, as many to validation, the rest to train. The
  first edition is dealt as it was before later editions existed, and each later one from a stream of its own, so
  added wordings leave every earlier template in its split.
- Conversations are dealt to splits in blocks of ten (8 train, 1 validation, 1 test, in a seeded order per block),
  so even a tiny set has every split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from inference.synth.phrasing import EDITIONS, Template

SPLITS = ("train", "validation", "test")
HELD_OUT = 0.12
"""Fraction of the variants, and of each kind's templates, given to validation, and again to test."""

SPLIT_BLOCK = ("train",) * 8 + ("validation", "test")

T = TypeVar("T")


@dataclass(frozen=True)
class Assignment:
    """Which voices and which templates each split may use."""

    voices: dict[str, tuple[tuple[str, str], ...]]  # split → (name, variant) pairs
    templates: dict[str, dict[str, tuple[Template, ...]]]  # split → kind → templates

    @classmethod
    def draw(cls, seed: int, names: Sequence[str], variants: Sequence[str]) -> Assignment:
        rng = np.random.default_rng([seed, 0])
        by_variant = _deal(rng, sorted(variants))
        voices = {split: tuple((n, v) for v in sorted(by_variant[split]) for n in sorted(names)) for split in SPLITS}
        dealt: dict[str, dict[str, list[Template]]] = {split: {} for split in SPLITS}
        for edition, kinds in enumerate(EDITIONS):
            edition_rng = rng if edition == 0 else np.random.default_rng([seed, 0, edition])
            for kind, kind_templates in kinds.items():
                for split, share in _deal(edition_rng, kind_templates).items():
                    dealt[split].setdefault(kind, []).extend(share)
        templates = {split: {kind: tuple(sorted(share, key=lambda t: t.id)) for kind, share in kinds.items()}
                     for split, kinds in dealt.items()}
        return cls(voices, templates)

    def phrasings(self, split: str) -> list[str]:
        """The template ids ``split`` may use."""
        return sorted(t.id for kind in self.templates[split].values() for t in kind)


def _deal(rng: np.random.Generator, items: Sequence[T]) -> dict[str, list[T]]:
    if len(items) < 3:
        raise ValueError(f"cannot split {len(items)} items three ways")
    order = [items[i] for i in rng.permutation(len(items))]
    k = max(1, round(HELD_OUT * len(items)))
    return {"test": order[:k], "validation": order[k:2 * k], "train": order[2 * k:]}


def cycled(seed: int, stream: int, items: Sequence[str], index: int) -> str:
    """Entry ``index`` of an endless sequence of blocks, each block all of ``items`` in its own order drawn from
    ``seed`` and ``stream`` (so every ``len(items)`` entries from the start hold each item once)."""
    block, at = divmod(index, len(items))
    order = np.random.default_rng([seed, stream, block]).permutation(len(items))
    return items[int(order[at])]


def split_of(seed: int, index: int) -> str:
    """The split of conversation ``index``."""
    return cycled(seed, 1, SPLIT_BLOCK, index)
