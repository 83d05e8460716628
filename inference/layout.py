"""The token layout of a micro-turn in a session's one sequence; :class:`Tokens`, a packed run of tokens.

Every micro-turn has the same layout and length (14 tokens in ``tiny``; the slot counts come from the
config), so every session appends the same number of tokens per tick and batched attention pads nothing::

    user side   [x0 x1 x2 x3]   text slots: bytes of typed text (after USER), background results (after TOOL),
                                control events (after EVENT); PAD when there is nothing. Longer input waits
                                for later micro-turns (4 bytes per 200 ms)
                [v0 v1]         two patch tokens of the latest camera frame, scanning its 12 patches in order
                                (the whole frame every 6 micro-turns, 1.2 s); NO_VIDEO with the camera off.
                                With ``video_thumbnail``, v0 is the frame's thumbnail (the whole frame in one
                                patch) every micro-turn and v1 scans the patches (all 12 every 2.4 s)
                [a0 a1]         dMel in: 8 frames at 40 Hz, 4 frames a token (with an audio encoder, each also
                                carries the ``audio_context`` user frames before its own: what the encoder hears)
    model side  [c]             SPEAK or SILENT
                [t0 t1 t2]      caption bytes of what it says (or PAD)
                [o0 o1]         its own output audio, as dMel tokens like the input

A session's sequence starts with one silent model side (the model was quiet before the call), then ``user
side, model side`` for each micro-turn. The trunk predicts the whole model side from one place, its state
``h`` at the last user-side token (``a1``): a small depth head unrolls ``c, t0, t1, t2`` from ``h`` one after
another (each sampled token feeds the next step), and its final state, which has seen them all, conditions
the flow head that generates the micro-turn's 8 output mel frames. Those are quantised to dMel and become
``o0 o1``, so the model hears what it said. At inference a micro-turn's model side enters the trunk at the
start of the next micro-turn's forward, before its user side: the same sequence, one trunk forward per tick.

Silence is ordinary input: silent audio is dMel bin 0 in every channel. "Not speaking" is ``c = SILENT``:
the flow head is skipped, ``t0, t1, t2`` are PAD, the ``o`` tokens are all bin 0 (silence) and the output audio
is zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inference import tokenizer
from inference.config import ModelConfig

TEXT, AUDIO_IN, AUDIO_OUT, PATCH, FEATURE = 0, 1, 2, 3, 4
"""Token kinds. PATCH carries pixels (the stem embeds it); FEATURE carries a patch already through the stem."""


@dataclass
class Tokens:
    """A packed run of tokens of mixed kinds, in sequence order."""

    kind: torch.Tensor  # (N,) long, one of TEXT / AUDIO_IN / AUDIO_OUT / PATCH / FEATURE
    text: torch.Tensor  # (N,) long, token id where kind == TEXT, else 0
    dmel: torch.Tensor  # (Na, frames_per_token, n_mels) long bins of the audio tokens, in row order
    patches: torch.Tensor  # (Np, 3, 40, 40) uint8 pixels of the PATCH tokens, in row order
    grid: torch.Tensor  # (Np, 2) long (row, col) of each PATCH token in its frame
    features: torch.Tensor  # (Nf, d_model) stem outputs of the FEATURE tokens, in row order; (0, 0) if none
    before: torch.Tensor  # (Ni, audio_context, n_mels) long: per AUDIO_IN token, the user's frames before its own

    def __len__(self) -> int:
        return int(self.kind.shape[0])

    @staticmethod
    def empty(frames_per_token: int, n_mels: int) -> Tokens:
        return Tokens(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                      torch.zeros(0, frames_per_token, n_mels, dtype=torch.long),
                      torch.zeros(0, 3, 40, 40, dtype=torch.uint8), torch.zeros(0, 2, dtype=torch.long),
                      torch.zeros(0, 0), torch.zeros(0, 0, n_mels, dtype=torch.long))

    @staticmethod
    def of_text(ids: list[int], frames_per_token: int, n_mels: int) -> Tokens:
        e = Tokens.empty(frames_per_token, n_mels)
        ids_t = torch.tensor(ids, dtype=torch.long)
        return Tokens(torch.full_like(ids_t, TEXT), ids_t, e.dmel, e.patches, e.grid, e.features, e.before)

    @staticmethod
    def of_audio(bins: torch.Tensor, frames_per_token: int, kind: int, before: torch.Tensor | None = None
                 ) -> Tokens:
        """(F, n_mels) frame bins → F / frames_per_token audio tokens of ``kind``; AUDIO_IN tokens also carry the
        stream's frames before each one's own: the last P of ``before`` (P, n_mels) and of the bins before it."""
        grouped = bins.reshape(-1, frames_per_token, bins.shape[-1])  # (A, G, M)
        n = grouped.shape[0]
        e = Tokens.empty(frames_per_token, bins.shape[-1])
        context = e.before
        if kind == AUDIO_IN:
            if before is None:
                before = torch.zeros(0, bins.shape[-1], dtype=torch.long)
            p, stream = before.shape[0], torch.cat([before, bins])  # (P + F, M)
            context = torch.stack([stream[i * frames_per_token:i * frames_per_token + p] for i in range(n)])
        return Tokens(torch.full((n,), kind, dtype=torch.long), torch.zeros(n, dtype=torch.long), grouped,
                      e.patches, e.grid, e.features, context)

    @staticmethod
    def of_patches(patches: torch.Tensor, grid: torch.Tensor, frames_per_token: int, n_mels: int) -> Tokens:
        e = Tokens.empty(frames_per_token, n_mels)
        n = patches.shape[0]
        return Tokens(torch.full((n,), PATCH, dtype=torch.long), torch.zeros(n, dtype=torch.long), e.dmel,
                      patches, grid, e.features, e.before)

    @staticmethod
    def of_features(features: torch.Tensor, frames_per_token: int, n_mels: int) -> Tokens:
        e = Tokens.empty(frames_per_token, n_mels)
        n = features.shape[0]
        return Tokens(torch.full((n,), FEATURE, dtype=torch.long), torch.zeros(n, dtype=torch.long), e.dmel,
                      e.patches, e.grid, features.float(), e.before)

    def heard_windows(self) -> torch.Tensor:
        """(Ni, audio_context + G, n_mels): each AUDIO_IN token's frames after the frames before them, in row
        order (what the audio encoder hears)."""
        audio_in = self.kind[(self.kind == AUDIO_IN) | (self.kind == AUDIO_OUT)] == AUDIO_IN
        return torch.cat([self.before, self.dmel[audio_in]], dim=1)

    def to(self, device: torch.device) -> Tokens:
        return Tokens(self.kind.to(device), self.text.to(device), self.dmel.to(device),
                      self.patches.to(device), self.grid.to(device), self.features.to(device), self.before.to(device))

    def rows(self, start: int, end: int) -> Tokens:
        """Rows ``[start, end)`` of this run."""
        audio = (self.kind == AUDIO_IN) | (self.kind == AUDIO_OUT)
        patch, feature = self.kind == PATCH, self.kind == FEATURE
        a0, a1 = int(audio[:start].sum()), int(audio[:end].sum())
        p0, p1 = int(patch[:start].sum()), int(patch[:end].sum())
        f0, f1 = int(feature[:start].sum()), int(feature[:end].sum())
        i0, i1 = int((self.kind[:start] == AUDIO_IN).sum()), int((self.kind[:end] == AUDIO_IN).sum())
        return Tokens(self.kind[start:end], self.text[start:end], self.dmel[a0:a1], self.patches[p0:p1],
                      self.grid[p0:p1], self.features[f0:f1], self.before[i0:i1])

    @staticmethod
    def cat(parts: list[Tokens]) -> Tokens:
        features = [p.features for p in parts if len(p.features)]
        before = [p.before for p in parts if len(p.before)]
        return Tokens(torch.cat([p.kind for p in parts]), torch.cat([p.text for p in parts]),
                      torch.cat([p.dmel for p in parts]), torch.cat([p.patches for p in parts]),
                      torch.cat([p.grid for p in parts]), torch.cat(features) if features else parts[0].features,
                      torch.cat(before) if before else parts[0].before)


@dataclass
class TurnLayout:
    """Builds the fixed-size token runs of micro-turns for one model config."""

    frames_per_token: int
    n_mels: int
    text_in: int
    video_slots: int
    text_out: int
    audio_tokens: int
    audio_context: int = 0
    video_thumbnail: bool = False

    @classmethod
    def of(cls, cfg: ModelConfig) -> TurnLayout:
        return cls(cfg.frames_per_token, cfg.n_mels, cfg.text_in, cfg.video_slots, cfg.text_out,
                   cfg.audio_tokens, cfg.audio_context, cfg.video_thumbnail)

    @property
    def n_user(self) -> int:
        return self.text_in + self.video_slots + self.audio_tokens

    @property
    def n_model(self) -> int:
        return 1 + self.text_out + self.audio_tokens

    def user_side(self, text_ids: list[int], video: Tokens | None, audio_bins: torch.Tensor,
                  before: torch.Tensor | None = None) -> Tokens:
        """``text_in`` text slots (PAD-filled), the ``video_slots`` patch tokens (NO_VIDEO without a camera),
        then the audio-in tokens of (frames, n_mels) bins, with the ``audio_context`` frames before them
        (``before``, (audio_context, n_mels); silence when None)."""
        if len(text_ids) > self.text_in:
            raise ValueError(f"at most {self.text_in} text tokens in a micro-turn, got {len(text_ids)}")
        text = text_ids + [tokenizer.PAD] * (self.text_in - len(text_ids))
        if video is None:
            video = Tokens.of_text([tokenizer.NO_VIDEO] * self.video_slots, self.frames_per_token, self.n_mels)
        if before is None:
            before = torch.zeros(self.audio_context, self.n_mels, dtype=torch.long)
        if before.shape[0] != self.audio_context:
            raise ValueError(f"expected {self.audio_context} frames before the audio, got {before.shape[0]}")
        return Tokens.cat([Tokens.of_text(text, self.frames_per_token, self.n_mels), video,
                           Tokens.of_audio(audio_bins, self.frames_per_token, AUDIO_IN, before)])

    def heard_next(self, before: torch.Tensor, audio_bins: torch.Tensor) -> torch.Tensor:
        """The ``audio_context`` frames before the next micro-turn, once one with (frames, n_mels) ``audio_bins``
        was heard after ``before``."""
        stream = torch.cat([before, audio_bins])
        return stream[len(stream) - self.audio_context:]

    def model_side(self, control: int, text_ids: list[int], out_bins: torch.Tensor) -> Tokens:
        """``c``, the ``text_out`` caption tokens, then the output-audio tokens of (frames, n_mels) bins."""
        if len(text_ids) != self.text_out:
            raise ValueError(f"expected {self.text_out} caption tokens, got {len(text_ids)}")
        return Tokens.cat([Tokens.of_text([control, *text_ids], self.frames_per_token, self.n_mels),
                           Tokens.of_audio(out_bins, self.frames_per_token, AUDIO_OUT)])

    def silent_model_side(self) -> Tokens:
        """What every sequence starts with: the model was silent before the session began."""
        frames = self.audio_tokens * self.frames_per_token
        return self.model_side(tokenizer.SILENT, [tokenizer.PAD] * self.text_out,
                               torch.zeros(frames, self.n_mels, dtype=torch.long))

    def video_patches(self, index: int, n_patches: int) -> torch.Tensor:
        """Which patches of its frame micro-turn ``index`` carries: a scan over the frame; with the thumbnail
        (number ``n_patches``, see :func:`inference.video.patches_at`) first."""
        if not self.video_thumbnail:
            return (index * self.video_slots + torch.arange(self.video_slots)) % n_patches
        scan = self.video_slots - 1
        return torch.cat([torch.tensor([n_patches]), (index * scan + torch.arange(scan)) % n_patches])
