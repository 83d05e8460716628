"""The sessions' KV caches — one preallocated pool with a bounded slot per session — and the attention plan of
one packed ragged forward.

Policy (StreamingLLM-style sinks + sliding window): a query at position ``p`` attends to its session's first
``n_sink`` tokens (kept for ever) and to the tokens at positions ``(p - window, p]``. Nothing else is kept, so
a session's cache never grows. Each session owns one slot of :class:`KVPool`, with

    capacity = n_sink + window + max_step_tokens - 1   key/value rows per layer

(the ring after the sinks is ``max_step_tokens - 1`` rows longer than the window, so writing one forward's new
tokens never overwrites a key that one of those new queries still needs). Bound: ``2 · n_layers · capacity ·
n_kv_heads · head_dim`` floats per session (1.66 MB for ``tiny`` in fp32), whatever the length of the
conversation; the cost of attention per step is bounded by the same numbers. Keys are stored already rotated
(RoPE with absolute positions that continue across micro-turns) and each row remembers its position, so row
order never matters and the mask is a function of positions only: streaming through the pool gives exactly the
attention of one causal forward over the whole sequence with :func:`window_mask`.

Ownership: the runtime (:mod:`inference.reference`) takes a slot when a session opens (:meth:`KVPool.alloc`),
reserves rows for each forward (:meth:`AttentionPlan.cached`) and frees the slot when the session closes
(:meth:`KVPool.free`, which moves the last slot into the hole so the open sessions stay in slots ``0 … n-1``
and a tick of all of them reads the pool without copying). The model only writes keys and values where the
plan says and reads them back; it keeps nothing in the pool.

Batching (no padding blow-up): rows of all sessions are packed (N, d) for every dense layer; only attention
pads, to (B, T_max) queries against the batch's slots, where T_max ≤ ``max_step_tokens`` and keys are the
bounded window. With the reference layout every session appends one 14-token micro-turn per tick, so a tick
pads nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def window_mask(qpos: torch.Tensor, kpos: torch.Tensor, window: int, n_sink: int) -> torch.Tensor:
    """Which keys each query sees: causal, within ``window`` or among the sinks; empty rows (-1) never.

    (..., T), (..., C) → (..., T, C) bool
    """
    q, k = qpos[..., :, None], kpos[..., None, :]
    return (k >= 0) & (k <= q) & ((k < n_sink) | (q - k < window))


class KVPool:
    """Keys and values of all open sessions, one fixed-size slot each; grows by doubling when full."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, n_sink: int, window: int,
                 max_step_tokens: int, slots: int = 4, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        self.n_sink, self.window, self.max_step_tokens = n_sink, window, max_step_tokens
        self.capacity = n_sink + window + max_step_tokens - 1
        self.shape = (n_layers, n_kv_heads, self.capacity, head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        self.k = torch.zeros(n_layers, slots, n_kv_heads, self.capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)  # (L, S, H, C, D)
        self.pos = torch.full((slots, self.capacity), -1, dtype=torch.long, device=device)  # (S, C)
        self.length: list[int] = []  # per open slot: tokens appended = position of the next one

    @property
    def open_slots(self) -> int:
        return len(self.length)

    @property
    def bytes_per_session(self) -> int:
        n_layers, n_kv_heads, capacity, head_dim = self.shape
        item = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * n_layers * n_kv_heads * capacity * head_dim * item + capacity * 8

    def alloc(self) -> int:
        """A fresh, empty slot."""
        slot = len(self.length)
        if slot == self.k.shape[1]:
            self._grow(2 * slot)
        self.reset(slot)
        self.length.append(0)
        return slot

    def free(self, slot: int) -> int | None:
        """Free ``slot``; if another slot was moved into it to keep slots dense, return where it came from."""
        last = len(self.length) - 1
        moved = None
        if slot != last:
            self.k[:, slot] = self.k[:, last]
            self.v[:, slot] = self.v[:, last]
            self.pos[slot] = self.pos[last]
            self.length[slot] = self.length[last]
            moved = last
        self.length.pop()
        return moved

    def reset(self, slot: int) -> None:
        """Forget everything in ``slot`` (its next token is position 0 again)."""
        self.pos[slot] = -1
        if slot < len(self.length):
            self.length[slot] = 0

    def rows_of(self, pos: torch.Tensor) -> torch.Tensor:
        """The rows of a slot that hold positions ``pos``: sinks first, then the ring."""
        ring = self.capacity - self.n_sink
        return torch.where(pos < self.n_sink, pos, self.n_sink + (pos - self.n_sink) % ring)

    def load(self, slot: int, other: KVPool, other_slot: int) -> None:
        """Make ``slot`` hold what ``other``'s slot holds (same window and sinks, any ring size)."""
        length = other.length[other_slot]
        kept = other.pos[other_slot]
        kept = kept[(kept >= 0) & ((kept < self.n_sink) | (kept >= length - (self.capacity - self.n_sink)))]
        rows, source = self.rows_of(kept), other.rows_of(kept)
        self.pos[slot] = -1
        self.pos[slot, rows] = kept
        self.k[:, slot, :, rows] = other.k[:, other_slot, :, source]
        self.v[:, slot, :, rows] = other.v[:, other_slot, :, source]
        self.length[slot] = length

    def _grow(self, slots: int) -> None:
        k = torch.zeros(self.k.shape[0], slots, *self.k.shape[2:], dtype=self.dtype, device=self.device)
        v = torch.zeros_like(k)
        pos = torch.full((slots, self.capacity), -1, dtype=torch.long, device=self.device)
        n = self.k.shape[1]
        k[:, :n], v[:, :n], pos[:n] = self.k, self.v, self.pos
        self.k, self.v, self.pos = k, v, pos


@dataclass
class AttentionPlan:
    """How the N packed rows of one forward split into B sequences, and where their keys live.

    Attention pads queries to (B, T_max): ``pad_index`` maps each row to ``b * T_max + t``. With a
    ``pool``, each row's key is written to (``row_slot``, ``row_cache``) and the batch attends over ``slots``
    (a range of pool slots when they are consecutive, which needs no copy) up to row ``used``; without one
    (training, offline), each sequence attends over its own rows.
    """

    positions: torch.Tensor  # (N,) absolute position of each row
    pad_index: torch.Tensor  # (N,) row → b · T_max + t
    batch: int
    t_max: int
    mask: torch.Tensor  # (B, 1, T_max, keys) bool
    pool: KVPool | None = None
    slots: torch.Tensor | slice | None = None  # (B,) pool slots, or slice(first, last + 1)
    row_slot: torch.Tensor | None = None  # (N,)
    row_cache: torch.Tensor | None = None  # (N,)
    used: int = 0
    _biases: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    def bias(self, n_kv: int, group: int) -> torch.Tensor:
        """The mask as an additive bias for ``n_kv`` key heads shared by ``group`` query heads each:
        (B * n_kv, group * T_max, keys), 0 where a query sees a key, -inf elsewhere; made once per forward."""
        key = (n_kv, group)
        if key not in self._biases:
            b, _, t, keys = self.mask.shape
            bias = torch.zeros(self.mask.shape, device=self.mask.device)
            bias.masked_fill_(~self.mask, float("-inf"))
            self._biases[key] = bias.expand(b, n_kv * group, t, keys).reshape(b * n_kv, group * t, keys)
        return self._biases[key]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, D) → (B, H, T_max, D), zeros where a sequence is shorter."""
        n, h, d = x.shape
        out = x.new_zeros(self.batch * self.t_max, h, d).index_copy(0, self.pad_index, x)
        return out.view(self.batch, self.t_max, h, d).transpose(1, 2)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, T_max, D) → (N, H · D)."""
        b, h, t, d = x.shape
        return x.transpose(1, 2).reshape(b * t, h * d)[self.pad_index]

    @staticmethod
    def _packing(lengths: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Each row's place in the padded (B, T_max) grid, and its index within its sequence."""
        t_max = max(lengths)
        counts = torch.tensor(lengths, device=device)
        starts = torch.cumsum(counts, 0) - counts
        seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), counts)
        within = torch.arange(int(counts.sum()), device=device) - starts[seq]
        return seq * t_max + within, within, t_max

    @classmethod
    def cached(cls, pool: KVPool, slots: list[int], lengths: list[int]) -> AttentionPlan:
        """Append ``lengths[b]`` tokens to pool slot ``slots[b]``; rows are packed in that order."""
        if max(lengths) > pool.max_step_tokens:
            raise ValueError(f"{max(lengths)} tokens in one step; at most {pool.max_step_tokens} fit")
        device = pool.device
        index, within, t_max = cls._packing(lengths, device)
        counts = torch.tensor(lengths, device=device)
        row_slot = torch.repeat_interleave(torch.tensor(slots, device=device), counts)
        starts = torch.tensor([pool.length[s] for s in slots], device=device)
        positions = torch.repeat_interleave(starts, counts) + within  # (N,)
        rows = pool.rows_of(positions)
        pool.pos[row_slot, rows] = positions
        for slot, n in zip(slots, lengths, strict=True):
            pool.length[slot] += n
        qpos = (starts + counts - 1)[:, None].repeat(1, t_max)  # padded queries repeat the last one (dropped)
        qpos.view(-1)[index] = positions
        used = min(pool.capacity, max(pool.length[s] for s in slots))
        consecutive = slots == list(range(slots[0], slots[0] + len(slots)))
        sel = slice(slots[0], slots[-1] + 1) if consecutive else torch.tensor(slots, device=device)
        mask = window_mask(qpos, pool.pos[sel, :used], pool.window, pool.n_sink)[:, None]  # (B, 1, T, used)
        return cls(positions, index, len(slots), t_max, mask, pool, sel, row_slot, rows, used)

    @classmethod
    def full(cls, lengths: list[int], window: int, n_sink: int, device: str | torch.device = "cpu"
             ) -> AttentionPlan:
        """Whole sequences from position 0, each attending to itself only (the same mask as streaming)."""
        device = torch.device(device)
        index, within, t_max = cls._packing(lengths, device)
        kpos = torch.full((len(lengths), t_max), -1, dtype=torch.long, device=device)
        kpos.view(-1)[index] = within
        grid = torch.arange(t_max, device=device)
        qpos = torch.where(kpos >= 0, kpos, grid)  # padded queries see themselves only ...
        mask = window_mask(qpos, kpos, window, n_sink) | (grid[:, None] == grid[None])  # ... never nothing
        return cls(within, index, len(lengths), t_max, mask[:, None])
