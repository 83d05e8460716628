"""``microturn bench engine``: what one micro-turn step of the reference model costs, and how many sessions
one machine keeps realtime.

Measured (milliseconds, wall clock, on whatever device is given):

- ``tick_ms``: one session, median step after L micro-turns of history (bounded KV: should not grow with L);
- ``reprefill_tick_ms``: the baseline without KV reuse, rebuilding the whole history before each step;
- ``batch_tick_ms``: median tick with B sessions stepped together (their caches full);
- ``realtime_sessions``: the most sessions whose p99 tick stays within the 150 ms tick budget;
- ``kv_bytes_per_session``: a session's KV footprint after L micro-turns (a constant: the bound).

Inputs are synthetic and deterministic: noisy tones for audio, a camera frame that changes every few seconds
(each session at its own phase) and a typed line now and then. Progress goes to stderr; the result is a
dict. """

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from inference.config import preset as get_preset
from inference.model import Block, ReferenceNet
from inference.reference import ReferenceModel
from microturn.contracts import MICRO_TURN_SAMPLES, MicroTurn

TICK_BUDGET_MS = 150.0


def _log(message: str) -> None:
    print(f"[bench engine] {message}", file=sys.stderr, flush=True)


def synthetic_turn(session_id: str, index: int, phase: int = 0) -> MicroTurn:
    """A deterministic micro-turn: a noisy tone, a camera frame that changes every 3 s, text every 5 s."""
    rng = np.random.default_rng([phase, index])
    t = (np.arange(MICRO_TURN_SAMPLES) + index * MICRO_TURN_SAMPLES) / 16_000
    pitch = 150 + 40 * ((index + phase) % 7)
    audio = 0.2 * np.sin(2 * np.pi * pitch * t) + 0.02 * rng.standard_normal(t.size)
    frame = np.full((120, 160, 3), ((index + phase) // 15) * 37 % 256, dtype=np.uint8)
    text = ("what do you see?",) if (index + phase) % 25 == 0 else ()
    return MicroTurn(session_id, index, audio.astype(np.float32), frame, text)


def count_params(net: ReferenceNet) -> tuple[int, int]:
    """Total parameters, and those one token uses (all but the routed experts it is not sent to)."""
    total = sum(p.numel() for p in net.parameters())
    cfg = net.cfg
    block = net.blocks[0]
    assert isinstance(block, Block)
    experts = block.moe.experts
    per_expert = sum(p[0].numel() for p in experts.parameters())
    return total, total - cfg.n_layers * (cfg.n_experts - cfg.top_k) * per_expert


def _timed_step(model: ReferenceModel, turns: list[MicroTurn]) -> float:
    start = time.perf_counter()
    model.step(turns)
    return (time.perf_counter() - start) * 1000


def _single_session(net: ReferenceNet, lengths: tuple[int, ...], reps: int) -> tuple[dict[str, float],
                                                                                    dict[str, int]]:
    model = ReferenceModel(net)
    _log(f"torch threads: {torch.get_num_threads()}")
    model.open("one", seed=1)
    ticks, kv, k = {}, {}, 0
    for length in lengths:
        while k < length:
            model.step([synthetic_turn("one", k)])
            k += 1
        times = []
        for _ in range(reps):
            times.append(_timed_step(model, [synthetic_turn("one", k)]))
            k += 1
        ticks[f"L{length}"] = round(float(np.median(times)), 2)
        kv[f"L{length}"] = model.pool.bytes_per_session
        _log(f"one session, L={length}: {ticks[f'L{length}']} ms")
    return ticks, kv


def _reprefill(net: ReferenceNet, lengths: tuple[int, ...], reps: int) -> dict[str, float]:
    model = ReferenceModel(net, record=True)
    model.open("one", seed=1)
    ticks, k = {}, 0
    for length in lengths:
        while k < length:
            model.step([synthetic_turn("one", k)])
            k += 1
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            model.reprefill("one")
            model.step([synthetic_turn("one", k)])
            times.append((time.perf_counter() - start) * 1000)
            k += 1
        ticks[f"L{length}"] = round(float(np.median(times)), 2)
        _log(f"re-prefill, L={length}: {ticks[f'L{length}']} ms")
    return ticks


def _batches(net: ReferenceNet, sizes: list[int], reported: tuple[int, ...], warm: int, ticks: int
             ) -> tuple[dict[str, float], int]:
    """Median tick per batch size, and the most sessions whose p99 tick (and that of every smaller batch
    tried) stays within the budget."""
    model = ReferenceModel(net)
    most = max(sizes)
    ids = [f"s{i}" for i in range(most)]
    for i, sid in enumerate(ids):
        model.open(sid, seed=i)
    k = 0
    while k < warm:
        model.step([synthetic_turn(sid, k, phase=i) for i, sid in enumerate(ids)])
        k += 1
    medians, realtime, within_budget = {}, 0, True
    for size in sizes:
        times = []
        for _ in range(ticks):
            turns = [synthetic_turn(sid, k, phase=i) for i, sid in enumerate(ids[:size])]
            times.append(_timed_step(model, turns))
            k += 1
        median, p99 = float(np.median(times)), float(np.percentile(times, 99))
        _log(f"{size} sessions: median {median:.1f} ms, p99 {p99:.1f} ms")
        if size in reported:
            medians[str(size)] = round(median, 2)
        within_budget = within_budget and p99 <= TICK_BUDGET_MS
        if within_budget:
            realtime = size
        elif size >= max(reported):
            break
    return medians, realtime


def bench_engine(preset: str = "tiny", device: str = "cpu", quick: bool = False) -> dict[str, object]:
    """Run the engine benchmark for a preset; ``quick`` uses tiny histories and batches (a smoke test)."""
    cfg = get_preset(preset)
    torch.manual_seed(0)
    net = ReferenceNet(cfg).to(device).eval()
    total, active = count_params(net)
    _log(f"preset {preset}: {total:,} parameters, {active:,} active per token")
    tick_lengths: tuple[int, ...] = (10, 100, 1000, 3000)
    reprefill_lengths: tuple[int, ...] = (10, 100, 1000)
    reported: tuple[int, ...] = (1, 4, 16, 32)
    batch_sizes, reps, warm, n_ticks = [1, 4, 8, 16, 24, 32, 40, 48], 25, 70, 60
    if quick:
        tick_lengths, reprefill_lengths, reported = (2, 4, 6, 8), (2, 4, 6), (1, 2)
        batch_sizes, reps, warm, n_ticks = [1, 2], 2, 2, 3
    tick_ms, kv = _single_session(net, tick_lengths, reps)
    reprefill_ms = _reprefill(net, reprefill_lengths, max(2, reps // 5))
    batch_ms, realtime = _batches(net, batch_sizes, reported, warm, n_ticks)
    return {
        "preset": preset,
        "params_total": total,
        "params_active": active,
        "tick_ms": tick_ms,
        "reprefill_tick_ms": reprefill_ms,
        "batch_tick_ms": batch_ms,
        "realtime_sessions": realtime,
        "kv_bytes_per_session": {key: kv[key] for key in list(kv)[-2:]},
    }
