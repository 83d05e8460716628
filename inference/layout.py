"""The token layout of a micro-turn in a session's one sequence, and :class:`Tokens`, a packed run of tokens.

A session is one sequence. Each 200 ms micro-turn appends its user side, then the model's own side (``tiny``
numbers; ``text_out``, the frame grouping and the video refresh come from the config)::

    user side   [USER b b b … | TOOL b b … | EVENT b …]   0–16 text tokens: typed text, background results,
                                                          control events (more waits for later micro-turns)
                [p0 … p11]                                12 patch tokens of the camera frame, only when it is
                                                          fresh (first, changed, or every 10th micro-turn);
                                                          none with the camera off
                [a0 a1]                                   2 dMel tokens: 8 frames at 40 Hz, 4 frames a token
    model side  [c]                                       SPEAK or SILENT
                [t0 t1]                                   caption bytes of what it says (or PAD)
                [o0 o1]                                   its own output audio, as dMel tokens like the input

So a quiet micro-turn is 7 tokens, 19 when a camera frame enters, plus any text. Every text token is predicted
by the token before it: ``h(a1)`` gives the logits of ``c``, ``h(c)`` of ``t0``, ``h(t0)`` of ``t1``. The
hidden state that predicts the last caption token (``h(t0)``) also conditions the flow head, which generates
the micro-turn's 8 output mel frames; they are quantised to dMel and become ``o0 o1``, so the model hears what
it said. At inference the last caption token and the ``o`` tokens enter the trunk at the start of the next
micro-turn's forward — the same sequence, one forward per text token per tick (``1 + text_out`` forwards).

Silence is ordinary input: silent audio is dMel bin 0 in every channel. "Not speaking" is ``c = SILENT``: the
flow head is skipped, ``t0, t1`` are PAD, the ``o`` tokens are all bin 0 (silence) and the output audio is
zeros. """

from __future__ import annotations

from dataclasses import dataclass

import torch

from inference import tokenizer

TEXT, AUDIO_IN, AUDIO_OUT, PATCH = 0, 1, 2, 3
"""Token kinds."""


@dataclass
class Tokens:
    """A packed run of tokens of mixed kinds, in sequence order."""

    kind: torch.Tensor  # (N,) long, one of TEXT / AUDIO_IN / AUDIO_OUT / PATCH
    text: torch.Tensor  # (N,) long, token id where kind == TEXT, else 0
    dmel: torch.Tensor  # (Na, frames_per_token, n_mels) long bins of the audio tokens, in row order
    patches: torch.Tensor  # (Np, 3, 40, 40) uint8 pixels of the patch tokens, in row order
    grid: torch.Tensor  # (Np, 2) long (row, col) of each patch in its frame

    def __len__(self) -> int:
        return int(self.kind.shape[0])

    @staticmethod
    def empty(frames_per_token: int, n_mels: int) -> Tokens:
        return Tokens(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                      torch.zeros(0, frames_per_token, n_mels, dtype=torch.long),
                      torch.zeros(0, 3, 40, 40, dtype=torch.uint8), torch.zeros(0, 2, dtype=torch.long))

    @staticmethod
    def of_text(ids: list[int], frames_per_token: int, n_mels: int) -> Tokens:
        e = Tokens.empty(frames_per_token, n_mels)
        ids_t = torch.tensor(ids, dtype=torch.long)
        return Tokens(torch.full_like(ids_t, TEXT), ids_t, e.dmel, e.patches, e.grid)

    @staticmethod
    def of_audio(bins: torch.Tensor, frames_per_token: int, kind: int) -> Tokens:
        """(F, n_mels) frame bins → F / frames_per_token audio tokens of ``kind``."""
        grouped = bins.reshape(-1, frames_per_token, bins.shape[-1])  # (A, G, M)
        n = grouped.shape[0]
        e = Tokens.empty(frames_per_token, bins.shape[-1])
        return Tokens(torch.full((n,), kind, dtype=torch.long), torch.zeros(n, dtype=torch.long), grouped,
                      e.patches, e.grid)

    @staticmethod
    def of_patches(patches: torch.Tensor, grid: torch.Tensor, frames_per_token: int, n_mels: int) -> Tokens:
        e = Tokens.empty(frames_per_token, n_mels)
        n = patches.shape[0]
        return Tokens(torch.full((n,), PATCH, dtype=torch.long), torch.zeros(n, dtype=torch.long), e.dmel,
                      patches, grid)

    def rows(self, start: int, end: int) -> Tokens:
        """Rows ``[start, end)`` of this run."""
        audio = (self.kind == AUDIO_IN) | (self.kind == AUDIO_OUT)
        patch = self.kind == PATCH
        a0, a1 = int(audio[:start].sum()), int(audio[:end].sum())
        p0, p1 = int(patch[:start].sum()), int(patch[:end].sum())
        return Tokens(self.kind[start:end], self.text[start:end], self.dmel[a0:a1], self.patches[p0:p1],
                      self.grid[p0:p1])

    @staticmethod
    def cat(parts: list[Tokens]) -> Tokens:
        return Tokens(torch.cat([p.kind for p in parts]), torch.cat([p.text for p in parts]),
                      torch.cat([p.dmel for p in parts]), torch.cat([p.patches for p in parts]),
                      torch.cat([p.grid for p in parts]))


@dataclass
class TurnLayout:
    """Builds micro-turn token runs for one model config."""

    frames_per_token: int
    n_mels: int
    text_out: int

    def user_side(self, text_ids: list[int], patches: torch.Tensor | None, grid: torch.Tensor | None,
                  audio_bins: torch.Tensor) -> Tokens:
        """Text, then the camera frame's patches (if fresh), then the audio-in tokens ((8, 80) bins)."""
        parts = []
        if text_ids:
            parts.append(Tokens.of_text(text_ids, self.frames_per_token, self.n_mels))
        if patches is not None and grid is not None:
            parts.append(Tokens.of_patches(patches, grid, self.frames_per_token, self.n_mels))
        parts.append(Tokens.of_audio(audio_bins, self.frames_per_token, AUDIO_IN))
        return Tokens.cat(parts)

    def model_side(self, control: int, text_ids: list[int], out_bins: torch.Tensor) -> Tokens:
        """``c``, the ``text_out`` caption tokens, then the output-audio tokens ((8, 80) bins)."""
        if len(text_ids) != self.text_out:
            raise ValueError(f"expected {self.text_out} caption tokens, got {len(text_ids)}")
        return Tokens.cat([Tokens.of_text([control, *text_ids], self.frames_per_token, self.n_mels),
                           Tokens.of_audio(out_bins, self.frames_per_token, AUDIO_OUT)])

    def targets(self, n_user: int) -> tuple[torch.Tensor, int]:
        """Within a whole micro-turn whose user side has ``n_user`` tokens: the rows whose logits predict
        ``[c, t0, ...]``, and the row whose hidden state conditions the flow head (the one that predicts the
        last caption token)."""
        rows = torch.arange(n_user - 1, n_user + self.text_out)
        return rows, int(rows[-1])


def silent_caption(text_out: int) -> list[int]:
    return [tokenizer.PAD] * text_out
