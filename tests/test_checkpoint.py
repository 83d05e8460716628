"""Checkpoints: init writes config + safetensors; save → load gives a model with identical outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.checkpoint import CONFIG, WEIGHTS, export_checkpoint, init_checkpoint, load_checkpoint, save_checkpoint
from inference.config import preset
from inference.reference import ReferenceModel
from tests._reference_helpers import make_net, make_turn, small_config


def test_save_load_identical_outputs(tmp_path: Path) -> None:
    net = make_net(small_config())
    net.blocks[0].moe.router.balance_bias += 0.01  # buffers travel too
    save_checkpoint(net, tmp_path / "ck")
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.cfg == net.cfg
    a, b = ReferenceModel(net), ReferenceModel(loaded)
    for m in (a, b):
        m.open("s", seed=4)
    for k in range(5):
        x, y = a.step([make_turn("s", k)])[0], b.step([make_turn("s", k)])[0]
        assert x.text == y.text
        np.testing.assert_array_equal(x.audio, y.audio)


def test_export_stores_half_precision_and_loads_as_float32(tmp_path: Path) -> None:
    net = make_net(small_config())
    save_checkpoint(net, tmp_path / "full")
    export_checkpoint(tmp_path / "full", tmp_path / "half")
    assert (tmp_path / "half" / WEIGHTS).stat().st_size < 0.55 * (tmp_path / "full" / WEIGHTS).stat().st_size
    loaded = load_checkpoint(tmp_path / "half")
    for (name, a), b in zip(net.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert b.dtype == a.dtype, name
        expected = a.half().to(a.dtype) if a.is_floating_point() else a
        assert torch.equal(b, expected), name


def test_init_checkpoint_and_from_checkpoint(tmp_path: Path) -> None:
    out = init_checkpoint("tiny", tmp_path / "tiny", seed=0)
    assert (out / WEIGHTS).exists()
    config = json.loads((out / CONFIG).read_text())
    assert config["model"]["d_model"] == preset("tiny").d_model
    model = ReferenceModel.from_checkpoint(out)
    assert model.name == "reference"
    model.open("s", seed=0)
    assert model.step([make_turn("s", 0)])[0].audio.shape == (3200,)


def test_bad_checkpoints_are_refused(tmp_path: Path) -> None:
    init_checkpoint("tiny", tmp_path / "c")
    data = json.loads((tmp_path / "c" / CONFIG).read_text())
    data["model"]["mystery"] = 1
    (tmp_path / "c" / CONFIG).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="mystery"):
        load_checkpoint(tmp_path / "c")
    (tmp_path / "c" / CONFIG).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="format"):
        load_checkpoint(tmp_path / "c")
    with pytest.raises(ValueError, match="preset"):
        init_checkpoint("huge", tmp_path / "d")
