"""Video patches: the right pixels and places (the thumbnail's too), the scan over them, and a stem whose token for a
patch does not depend on the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.config import ModelConfig
from inference.layout import TurnLayout
from inference.video import GRID, THUMBNAIL, PatchStem, fit_frame, patches_at


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


def test_the_thumbnail_is_the_whole_frame_in_one_patch_at_a_place_of_its_own() -> None:
    frame = np.zeros((120, 160, 3), np.uint8)
    frame[:, 80:] = 200  # the right half bright
    pixels, places = patches_at(frame, [12, 0])
    assert places.tolist() == [list(THUMBNAIL), [0, 0]]
    thumb = pixels[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(thumb, fit_frame(frame, 40, 40))
    assert (thumb[:, :20] == 0).all() and (thumb[:, 20:] == 200).all()  # the halves, shrunk
    with pytest.raises(ValueError, match="too large"):
        patches_at(np.zeros((40, 40 * GRID, 3), np.uint8), [0])


@pytest.mark.parametrize("thumbnail", [False, True])
def test_the_video_slots_scan_every_patch_and_the_thumbnail_comes_every_micro_turn(thumbnail: bool) -> None:
    layout = TurnLayout.of(ModelConfig(video_thumbnail=thumbnail))
    scans = [layout.video_patches(k, 12).tolist() for k in range(12)]
    if thumbnail:
        assert all(s[0] == 12 for s in scans)  # the thumbnail first, always
        assert [s[1] for s in scans] == list(range(12))  # one patch a micro-turn: the frame every 2.4 s
    else:
        assert scans[0] == [0, 1] and scans[5] == [10, 11] and scans[6] == [0, 1]  # every 1.2 s
    with pytest.raises(ValueError, match="video_thumbnail"):
        ModelConfig(video_thumbnail=True, video_slots=1)


def test_fit_frame_averages_areas_the_same_with_whole_blocks_or_not() -> None:
    rng = np.random.default_rng(0)
    for shape, size in [((120, 160), (40, 40)), ((480, 640), (120, 160)), ((100, 150), (40, 40))]:
        frame = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        pixels = torch.from_numpy(frame).permute(2, 0, 1)[None].float()
        area = torch.nn.functional.interpolate(pixels, size=size, mode="area")[0].permute(1, 2, 0).round()
        np.testing.assert_array_equal(fit_frame(frame, *size), area.to(torch.uint8).numpy())
