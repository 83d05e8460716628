"""Video patch tokens: a camera frame cut into 40×40 patches, each embedded by a hierarchical MLP stem.

Besides its patches, a frame may give a thumbnail: the whole frame shrunk to one 40×40 patch (area averaging),
embedded by the same stem at a place of its own (:data:`THUMBNAIL`). A thing that fills several patches (a card
held up to the camera) is seen whole in it, at a quarter of the resolution.

The stem (hMLP, as in "Three things everyone should know about Vision Transformers") is three per-patch stages
whose stride equals their kernel, so patches never mix: 5×5 pixel cells → 10×10 → the whole 40×40 patch, each
stage a linear layer and a layer norm (never batch norm: a patch's token does not depend on what else is in
the batch). """

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from microturn.contracts import PATCH

GRID = 32
"""Rows (and columns) of the stem's place tables: frames up to ``GRID - 1`` patches a side."""
THUMBNAIL = (GRID - 1, GRID - 1)
"""The thumbnail's (row, col) place: one no patch of such a frame has."""


def fit_frame(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """An (H, W, 3) uint8 frame resized to (height, width) by area averaging (unchanged if it already fits)."""
    h, w = frame.shape[:2]
    if (h, w) == (height, width):
        return frame
    if h % height == 0 and w % width == 0:  # whole blocks (a 160x120 frame's thumbnail): their means, in numpy
        fy, fx = h // height, w // width
        rows = frame.reshape(height, fy, w, 3).sum(axis=1, dtype=np.uint32)  # (height, w, 3)
        sums = rows.reshape(height, width, fx, 3).sum(axis=2, dtype=np.uint32)
        return np.round(sums.astype(np.float32) / (fy * fx)).astype(np.uint8)
    t = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float()
    resized = torch.nn.functional.interpolate(t, size=(height, width), mode="area")
    return resized[0].permute(1, 2, 0).round().to(torch.uint8).numpy()


def patches_at(frame: np.ndarray, which: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches number ``which`` (row-major) of an (H, W, 3) uint8 frame: (n, 3, 40, 40) uint8 pixels and their
    (n, 2) (row, col) places. Number ``rows · cols`` (one past the last patch) is the frame's thumbnail."""
    rows, cols = frame.shape[0] // PATCH, frame.shape[1] // PATCH
    if max(rows, cols) >= GRID:
        raise ValueError(f"a frame of {rows}x{cols} patches is too large for the stem (at most {GRID - 1} a side)")
    places, pixels = [], []
    for i in which:
        if i == rows * cols:
            places.append(THUMBNAIL)
            pixels.append(fit_frame(frame, PATCH, PATCH))
            continue
        r, c = divmod(i, cols)
        places.append((r, c))
        pixels.append(frame[r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH])
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2), torch.tensor(places, dtype=torch.long)


class PatchStem(nn.Module):
    """Hierarchical MLP stem: (P, 3, 40, 40) uint8 → (P, d_model)."""

    def __init__(self, d_model: int, dims: tuple[int, int] = (48, 96)) -> None:
        super().__init__()
        c1, c2 = dims
        self.cell = nn.Sequential(nn.Linear(3 * 5 * 5, c1), nn.LayerNorm(c1), nn.GELU())  # 5x5 px cells
        self.quad = nn.Sequential(nn.Linear(4 * c1, c2), nn.LayerNorm(c2), nn.GELU())  # 2x2 cells: 10x10 px
        self.patch = nn.Sequential(nn.Linear(16 * c2, d_model), nn.LayerNorm(d_model))  # 4x4 quads: 40x40 px
        self.row = nn.Embedding(GRID, d_model)
        self.col = nn.Embedding(GRID, d_model)

    def forward(self, patches: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        p = patches.shape[0]
        x = patches.float() / 255.0 - 0.5
        # rows = (4 quads, 2 cells, 5 px) and the same for columns
        x = x.view(p, 3, 4, 2, 5, 4, 2, 5)
        x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (P, qr, qc, cr, cc, 3, 5, 5)
        x = x.reshape(p, 16, 4, 75)
        x = self.cell(x)  # (P, 16, 4, c1)
        x = self.quad(x.reshape(p, 16, -1))  # (P, 16, c2)
        x = self.patch(x.reshape(p, -1))  # (P, d)
        return x + self.row(grid[:, 0]) + self.col(grid[:, 1])
