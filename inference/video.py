"""Video patch tokens: a camera frame cut into 40×40 patches, each embedded by a hierarchical MLP stem.

The stem (hMLP, as in "Three things everyone should know about Vision Transformers") is three per-patch stages
whose stride equals their kernel, so patches never mix: 5×5 pixel cells → 10×10 → the whole 40×40 patch, each
stage a linear layer and a layer norm (never batch norm: a patch's token does not depend on what else is in
the batch). """

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from microturn.contracts import PATCH


def fit_frame(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """An (H, W, 3) uint8 frame resized to (height, width) by area averaging (unchanged if it already fits)."""
    if frame.shape[:2] == (height, width):
        return frame
    t = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float()
    resized = torch.nn.functional.interpolate(t, size=(height, width), mode="area")
    return resized[0].permute(1, 2, 0).round().to(torch.uint8).numpy()


def patches_at(frame: np.ndarray, which: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches number ``which`` (row-major) of an (H, W, 3) uint8 frame: (n, 3, 40, 40) uint8 pixels and their
    (n, 2) (row, col) places."""
    cols = frame.shape[1] // PATCH
    places = [(i // cols, i % cols) for i in which]
    pixels = np.stack([frame[r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] for r, c in places])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2), torch.tensor(places, dtype=torch.long)


class PatchStem(nn.Module):
    """Hierarchical MLP stem: (P, 3, 40, 40) uint8 → (P, d_model)."""

    def __init__(self, d_model: int, dims: tuple[int, int] = (48, 96), max_grid: int = 32) -> None:
        super().__init__()
        c1, c2 = dims
        self.cell = nn.Sequential(nn.Linear(3 * 5 * 5, c1), nn.LayerNorm(c1), nn.GELU())  # 5x5 px cells
        self.quad = nn.Sequential(nn.Linear(4 * c1, c2), nn.LayerNorm(c2), nn.GELU())  # 2x2 cells: 10x10 px
        self.patch = nn.Sequential(nn.Linear(16 * c2, d_model), nn.LayerNorm(d_model))  # 4x4 quads: 40x40 px
        self.row = nn.Embedding(max_grid, d_model)
        self.col = nn.Embedding(max_grid, d_model)

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
