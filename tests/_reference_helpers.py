"""Shared builders for the reference-model tests: a small config, a seeded model, synthetic micro-turns."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from inference.config import ModelConfig, preset
from inference.model import ReferenceNet
from inference.reference import ReferenceModel
from microturn.contracts import ControlEvent, MicroTurn


def small_config(**changes: object) -> ModelConfig:
    """``tiny`` with a short window, so a few dozen micro-turns already evict keys, and no audio encoder unless
    ``changes`` give it one."""
    base = dataclasses.replace(preset("tiny"), window=48, n_sink=4, max_step_tokens=40, griffin_lim_iters=2,
                               audio_context=0)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def narrow_config(width: int, layers: int, flow_width: int, flow_layers: int) -> ModelConfig:
    """``tiny`` with a narrower, shallower trunk (4 heads, 4 experts of ``width``) and flow head, and no audio
    encoder: a model that trains in seconds on the tone task."""
    return dataclasses.replace(preset("tiny"), d_model=width, n_layers=layers, n_heads=4, n_kv_heads=2, n_experts=4,
                               d_expert=width, d_shared=width, flow_dim=flow_width, flow_layers=flow_layers,
                               audio_context=0)


def make_net(cfg: ModelConfig, seed: int = 0) -> ReferenceNet:
    """A seeded random model; its audio encoder's projection (zero when new) random too, so that it counts."""
    torch.manual_seed(seed)
    net = ReferenceNet(cfg).eval()
    if net.audio is not None:
        torch.nn.init.normal_(net.audio.out.weight, std=0.05)
    return net


def make_turn(session_id: str, index: int, seed: int = 0, video: bool = True, text: tuple[str, ...] = (),
              events: tuple[ControlEvent, ...] = ()) -> MicroTurn:
    """A micro-turn of noise and a tone, and a slowly changing camera frame: a function of its arguments."""
    rng = np.random.default_rng([seed, index])
    t = (np.arange(3200) + index * 3200) / 16_000
    audio = (0.05 * rng.standard_normal(3200) + 0.2 * np.sin(2 * np.pi * (200 + 50 * (index % 5)) * t))
    frame = None
    if video:
        frame = np.full((120, 160, 3), (index // 3) * 20 % 256, dtype=np.uint8)
        frame[:, : 40 + index % 4 * 10] = 200
    return MicroTurn(session_id, index, audio.astype(np.float32), frame, text, events)


def run(model: ReferenceModel, session_id: str, turns: int, seed: int = 0, start: int = 0) -> None:
    for k in range(start, start + turns):
        model.step([make_turn(session_id, k, seed, text=("hello",) if k % 7 == 2 else ())])
