"""Video patches: the right pixels and places, and a stem whose token for a patch does not depend on the batch."""

from __future__ import annotations

import numpy as np
import torch

from inference.video import PatchStem, patches_at


def test_patches_at_cuts_row_major_40px_patches() -> None:
    frame = np.arange(120 * 160 * 3, dtype=np.uint32).reshape(120, 160, 3).astype(np.uint8)
    pixels, places = patches_at(frame, [0, 5, 11])
    assert pixels.shape == (3, 3, 40, 40) and pixels.dtype == torch.uint8
    assert places.tolist() == [[0, 0], [1, 1], [2, 3]]
    np.testing.assert_array_equal(pixels[1].permute(1, 2, 0).numpy(), frame[40:80, 40:80])


def test_stem_embeds_each_patch_on_its_own() -> None:
    torch.manual_seed(0)
    stem = PatchStem(64, (16, 32)).eval()
    pixels = torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8)
    places = torch.tensor([[0, 0], [0, 1], [1, 2], [2, 3], [2, 0]])
    with torch.no_grad():
        together = stem(pixels, places)
        alone = torch.cat([stem(pixels[i:i + 1], places[i:i + 1]) for i in range(5)])
    assert together.shape == (5, 64)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    changed = pixels.clone()
    changed[0, :, :5, :5] = 0  # one 5x5 cell of patch 0
    with torch.no_grad():
        other = stem(changed, places)
    assert not torch.allclose(other[0], together[0]) and torch.equal(other[1:], together[1:])
