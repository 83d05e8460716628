"""The audio encoder: what an audio-in token adds to its embedding from the user's speech around it.

An audio-in token holds 4 dMel frames (100 ms); a spoken word lasts 200–600 ms, so no single token holds one, and
the trunk, which could gather a word from several tokens by attention, was measured not to (inference/README.md,
"Does the trunk hear the words?"). The encoder hears a word-long window instead: the token's own frames and the
``audio_context`` frames of the user's audio before them (a causal window: nothing after the token), through a
small 1-D convolution net over time, flattened, projected to ``d_model``.

It is a function of that window alone, so a session's only state for it is its last ``audio_context`` input frames
(:class:`~inference.reference.Session`), which a restored session rebuilds from its context records; training
gives every token its window from the conversation (:mod:`inference.conversation`). The projection starts at
zero, so an encoder added to a trained model starts out changing nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KERNEL = 3
STRIDES = (1, 2, 2)
"""The convolutions over time: kernel 3, strides 1, 2, 2 (33 frames in → 7 positions out)."""


def _fits(frames: int) -> bool:
    """Whether the convolutions cover ``frames`` frames exactly: every stride lands on the last frame."""
    for stride in STRIDES:
        if frames < KERNEL or (frames - KERNEL) % stride:
            return False
        frames = (frames - KERNEL) // stride + 1
    return True


def left_pad(window: int) -> int:
    """Zero frames put before a window of ``window`` frames so that the convolutions cover it exactly, the newest
    frame included (a strided convolution would otherwise drop the frames after its last stride)."""
    pad = 0
    while not _fits(window + pad):
        pad += 1
    return pad


def encoded_length(frames: int) -> int:
    """Time positions left after the convolutions of ``frames`` frames (padded on the left to fit them)."""
    frames += left_pad(frames)
    for stride in STRIDES:
        frames = (frames - KERNEL) // stride + 1
    return frames


class AudioEncoder(nn.Module):
    """(N, window, n_mels) dMel bins → (N, d_model): a word-long window of audio frames, heard as one vector."""

    def __init__(self, n_mels: int, dmel_bins: int, window: int, dim: int, d_model: int, bin_dim: int = 8) -> None:
        super().__init__()
        self.n_mels, self.dmel_bins, self.window, self.pad = n_mels, dmel_bins, window, left_pad(window)
        self.bins = nn.Embedding(n_mels * dmel_bins, bin_dim)
        self.frame = nn.Linear(n_mels * bin_dim, dim)
        self.convs = nn.ModuleList(nn.Conv1d(dim, dim, KERNEL, stride=s) for s in STRIDES)
        self.feature_dim = dim * encoded_length(window)
        self.out = nn.Linear(self.feature_dim, d_model)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.register_buffer("channel_offset", torch.arange(n_mels) * dmel_bins, persistent=False)
        self.channel_offset: torch.Tensor

    def features(self, bins: torch.Tensor) -> torch.Tensor:
        """(N, window, n_mels) bins → (N, feature_dim): what the convolutions heard, before the projection."""
        n = bins.shape[0]
        x = self.bins(bins + self.channel_offset).flatten(2)  # (N, window, n_mels · bin_dim)
        x = F.pad(F.gelu(self.frame(x)).transpose(1, 2), (self.pad, 0))  # (N, dim, pad + window)
        for conv in self.convs:
            x = F.gelu(conv(x))  # (N, dim, shorter)
        return x.reshape(n, -1)

    def forward(self, bins: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(bins))
