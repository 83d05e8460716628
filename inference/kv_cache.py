"""Per-session KV caches with a bounded footprint, and the attention plan of one packed ragged forward.

Policy (StreamingLLM-style sinks + sliding window): a query at position ``p`` attends to the session's first
``n_sink`` tokens (kept for ever) and to the tokens at positions ``(p - window, p]``. Nothing else is kept, so a
session's cache never grows: it is allocated once, at open, with

    capacity = n_sink + window + max_step_tokens - 1   slots per layer

(the ring is ``max_step_tokens - 1`` slots longer than the window so that writing one forward's new tokens never
overwrites a key that one of those new queries still needs). Bound: ``2 · n_layers · capacity · d_model`` floats per
session (3.6 MB for ``tiny`` in fp32), whatever the length of the conversation; the per-step cost of attention is
bounded by the same numbers. Keys are stored already rotated (RoPE with absolute positions that continue across
micro-turns) and each slot remembers its position, so slot order never matters and the mask is a function of
positions only: streaming with the cache gives exactly the same attention as one causal forward over the whole
sequence with :func:`window_mask`.

Ownership: the runtime (:mod:`inference.reference`) creates a session's :class:`KVCache` when the session opens,
reserves slots for each forward, and drops it when the session closes. The model only writes keys and values into
the slots it is told to and reads them back; it keeps nothing in the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def window_mask(qpos: torch.Tensor, kpos: torch.Tensor, window: int, n_sink: int) -> torch.Tensor:
    """Which keys each query sees: causal, within ``window`` or among the sinks; empty slots (-1) never.

    (T,), (C,) → (T, C) bool
    """
    q, k = qpos[:, None], kpos[None, :]
    return (k >= 0) & (k <= q) & ((k < n_sink) | (q - k < window))


class KVCache:
    """One session's preallocated keys and values: ``n_sink`` fixed slots, then a ring."""

    def __init__(self, n_layers: int, n_heads: int, head_dim: int, n_sink: int, window: int,
                 max_step_tokens: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                 ) -> None:
        self.n_sink, self.window, self.max_step_tokens = n_sink, window, max_step_tokens
        self.capacity = n_sink + window + max_step_tokens - 1
        self.k = torch.zeros(n_layers, n_heads, self.capacity, head_dim, dtype=dtype, device=device)  # (L,H,C,D)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((self.capacity,), -1, dtype=torch.long, device=device)  # position held by a slot
        self.length = 0  # tokens appended so far = position of the next one

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.pos.nbytes

    @property
    def used(self) -> int:
        """Slots filled so far (they fill in order: sinks, then the ring until it wraps)."""
        return min(self.length, self.capacity)

    def reserve(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions and slots for the next ``n`` tokens; marks the slots as holding those positions."""
        if n > self.max_step_tokens:
            raise ValueError(f"{n} tokens in one step; this cache takes at most {self.max_step_tokens}")
        pos = torch.arange(self.length, self.length + n, device=self.pos.device)
        ring = self.capacity - self.n_sink
        slots = torch.where(pos < self.n_sink, pos, self.n_sink + (pos - self.n_sink) % ring)
        self.pos[slots] = pos
        self.length += n
        return pos, slots


@dataclass
class Span:
    """One sequence's part of a packed forward: rows ``[start, end)``, and where its keys come from.

    With a ``cache``, new keys go to ``slots`` and queries attend over the cache's first ``used`` slots; without one
    (training, offline), the span attends over its own keys only.
    """

    start: int
    end: int
    mask: torch.Tensor  # (T, keys) bool
    cache: KVCache | None = None
    slots: torch.Tensor | None = None
    used: int = 0


@dataclass
class AttentionPlan:
    """How the rows of one packed forward split into sequences (no padding anywhere)."""

    spans: list[Span]
    positions: torch.Tensor  # (N,) absolute position of each row

    @classmethod
    def cached(cls, caches: list[KVCache], lengths: list[int]) -> AttentionPlan:
        """Append ``lengths[b]`` tokens to each cache; rows are packed in the order of ``caches``."""
        spans, positions, start = [], [], 0
        for cache, n in zip(caches, lengths, strict=True):
            pos, slots = cache.reserve(n)
            used = cache.used
            mask = window_mask(pos, cache.pos[:used], cache.window, cache.n_sink)
            spans.append(Span(start, start + n, mask, cache, slots, used))
            positions.append(pos)
            start += n
        return cls(spans, torch.cat(positions))

    @classmethod
    def full(cls, lengths: list[int], window: int, n_sink: int, device: str | torch.device = "cpu"
             ) -> AttentionPlan:
        """Whole sequences from position 0, each attending to itself only (the same mask as streaming)."""
        spans, positions, start = [], [], 0
        for n in lengths:
            pos = torch.arange(n, device=device)
            spans.append(Span(start, start + n, window_mask(pos, pos, window, n_sink)))
            positions.append(pos)
            start += n
        return cls(spans, torch.cat(positions))
