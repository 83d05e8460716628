"""The reference backend: batching does not change a session's outputs, sampling is seeded per (session,
index), sessions free everything on close, and it plugs into the engine like ``echo``."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
import torch

from inference import tokenizer
from inference.engine import Engine
from inference.layout import FEATURE
from inference.models import load_backend
from inference.reference import MAX_TEXT_BACKLOG, SEAM, ReferenceModel, cpu_threads
from microturn.contracts import MICRO_TURN_SAMPLES, ControlEvent, MicroTurn, MicroTurnOutput
from tests._reference_helpers import make_net, make_turn, run, small_config


def _outputs(model: ReferenceModel, session_id: str, seed: int, start: int, n: int) -> list[MicroTurnOutput]:
    return [model.step([make_turn(session_id, k, seed)])[0] for k in range(start, start + n)]


def test_outputs_are_the_same_alone_or_batched_with_other_lengths() -> None:
    cfg = small_config()
    alone = ReferenceModel(make_net(cfg), record=True)
    alone.open("a", seed=7)
    solo = _outputs(alone, "a", 0, 0, 10)

    batched = ReferenceModel(make_net(cfg), record=True)
    batched.open("b", seed=1)
    run(batched, "b", 9, seed=1)  # an older session, longer than the window
    batched.open("a", seed=7)
    batched.open("c", seed=2)
    run(batched, "c", 2, seed=2)
    together = []
    for k in range(10):
        turns = [make_turn("c", k + 2, 2), make_turn("a", k, 0), make_turn("b", k + 9, 1)]
        outs = batched.step(turns)
        assert [o.session_id for o in outs] == ["c", "a", "b"]
        together.append(outs[1])
    ta, tb = alone.sessions["a"].trace, batched.sessions["a"].trace
    assert ta is not None and tb is not None
    torch.testing.assert_close(torch.cat(ta.logits), torch.cat(tb.logits), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.stack(ta.flow_cond), torch.stack(tb.flow_cond), atol=1e-4, rtol=1e-4)
    assert [o.text for o in solo] == [o.text for o in together]
    for x, y in zip(solo, together, strict=True):  # Griffin-Lim's FFTs batch differently: close, not equal
        assert float(np.abs(x.audio - y.audio).mean()) < 1e-3


def test_same_seed_same_outputs_other_seed_other_outputs() -> None:
    cfg = small_config()
    runs = []
    for seed in (5, 5, 6):
        model = ReferenceModel(make_net(cfg))
        model.open("s", seed=seed)
        runs.append(_outputs(model, "s", 0, 0, 8))
    assert [o.text for o in runs[0]] == [o.text for o in runs[1]]
    assert all(np.array_equal(x.audio, y.audio) for x, y in zip(runs[0], runs[1], strict=True))
    assert any(not np.array_equal(x.audio, y.audio) for x, y in zip(runs[0], runs[2], strict=True))


def test_output_contract_and_silence() -> None:
    model = ReferenceModel(make_net(small_config()), record=True)
    model.open("s", seed=0)
    outs = []
    for k in range(16):
        turn = make_turn("s", k, text=("é" * 20,) if k == 0 else (),
                         events=(ControlEvent("background_result", {"text": "42"}),) if k == 3 else ())
        out = model.step([turn])[0]
        assert (out.session_id, out.index) == ("s", k)
        assert out.audio.shape == (MICRO_TURN_SAMPLES,) and out.audio.dtype == np.float32
        assert isinstance(out.text, str)
        outs.append(out)
    trace = model.sessions["s"].trace
    assert trace is not None
    speaks = [int(ids[0]) == tokenizer.SPEAK for ids in trace.sampled]
    assert any(speaks) and not all(speaks)  # a random model does both
    for k, out in enumerate(outs):
        if speaks[k]:
            assert np.any(out.audio[SEAM:])
        else:
            assert out.text == "" and not np.any(out.audio[SEAM:])  # silence (after a 25 ms fade-out)
            if k == 0 or not speaks[k - 1]:
                assert not np.any(out.audio)


def test_video_scans_the_frame_and_odd_sizes_are_fitted() -> None:
    model = ReferenceModel(make_net(small_config(video_thumbnail=False)), record=True)  # two slots that scan
    model.open("s", seed=0)
    frame = np.zeros((120, 160, 3), np.uint8)
    big = np.zeros((240, 320, 3), np.uint8)
    for k, video in enumerate([frame, frame, frame + 100, None, big]):
        model.step([MicroTurn("s", k, np.zeros(3200, np.float32), video)])
    trace = model.sessions["s"].trace
    assert trace is not None
    assert [int((run.kind == FEATURE).sum()) for run in trace.runs] == [2, 2, 2, 0, 2]
    assert not torch.equal(trace.runs[0].features, trace.runs[1].features)  # the next patches of the frame
    assert model.layout.video_patches(1, 12).tolist() == [2, 3]
    assert model.layout.video_patches(6, 12).tolist() == [0, 1]


def test_close_frees_the_slot_and_many_sessions_leave_nothing() -> None:
    model = ReferenceModel(make_net(small_config()))
    for i in range(20):
        model.open(f"s{i}", seed=i)
        model.step([make_turn(f"s{j}", i - j) for j in range(max(0, i - 3), i + 1)])
        if i >= 3:
            model.close(f"s{i - 3}")
    assert model.pool.open_slots == 3
    for sid in list(model.sessions):
        model.close(sid)
    assert model.pool.open_slots == 0 and not model.sessions
    model.close("never-opened")


def test_expert_load_is_counted() -> None:
    model = ReferenceModel(make_net(small_config()))
    model.open("s", seed=0)
    run(model, "s", 3)
    load = model.expert_load
    assert load.shape == (model.cfg.n_layers, model.cfg.n_experts)
    assert torch.all(load.sum(dim=1) == load.sum(dim=1)[0])  # every layer routes every token
    assert int(load.sum(dim=1)[0]) % model.cfg.top_k == 0


async def test_plugs_into_the_engine() -> None:
    engine = Engine(ReferenceModel(make_net(small_config())))
    await engine.start()
    try:
        await engine.open_session("x", seed=1)
        await engine.open_session("y", seed=2)
        futures = [engine.submit(make_turn(sid, k)) for k in range(3) for sid in ("x", "y")]
        outs = await asyncio.wait_for(asyncio.gather(*futures), timeout=60)
        assert [(o.session_id, o.index) for o in outs] == [(s, k) for k in range(3) for s in ("x", "y")]
    finally:
        await engine.stop()


def test_step_refuses_unknown_and_duplicate_sessions() -> None:
    model = ReferenceModel(make_net(small_config()))
    model.open("s", seed=0)
    with pytest.raises(ValueError, match="not open"):
        model.step([make_turn("nope", 0)])
    with pytest.raises(ValueError, match="one micro-turn per session"):
        model.step([make_turn("s", 0), make_turn("s", 1)])
    with pytest.raises(ValueError, match="already open"):
        model.open("s", seed=1)
    assert model.step([]) == []
    assert model.step([make_turn("s", 0)])[0].index == 0  # refusals left the session as it was


def test_long_session_state_stays_bounded() -> None:
    model = ReferenceModel(make_net(small_config()))
    model.open("s", seed=0)
    k_before, bytes_before = model.pool.k, model.pool.bytes_per_session
    flood = ("x" * 500,)  # far more text than 4 slots per micro-turn can take
    for k in range(150):
        model.step([make_turn("s", k, video=k % 2 == 0, text=flood)])
    session = model.sessions["s"]
    assert len(session.text_backlog) <= MAX_TEXT_BACKLOG
    assert model.pool.k is k_before and model.pool.bytes_per_session == bytes_before  # nothing reallocated
    assert model.pool.length[session.slot] == 150 * model.cfg.turn_tokens  # positions keep counting
    assert session.trace is None


def _turn(k: int, session_id: str = "s") -> MicroTurn:
    return make_turn(session_id, k, video=k % 5 != 4, text=("hello there, model",) if k == 1 else (),
                     events=(ControlEvent("background_result", {"text": "42"}),) if k == 6 else ())


def test_restore_from_context_records_gives_the_same_outputs() -> None:
    cfg = small_config()
    original = ReferenceModel(make_net(cfg))
    original.open("s", seed=9)
    outs = [original.step([_turn(k)])[0] for k in range(16)]
    assert all(0 < len(o.context) < 3000 for o in outs)
    elsewhere = ReferenceModel(make_net(cfg))
    elsewhere.restore("s", 9, [o.context for o in outs[:9]])  # longer than the window, text still queued
    again = [elsewhere.step([_turn(k)])[0] for k in range(9, 16)]
    assert [o.text for o in again] == [o.text for o in outs[9:]]
    for x, y in zip(again, outs[9:], strict=True):
        assert float(np.abs(x.audio - y.audio).mean()) < 1e-3


def test_restore_refuses_bad_records_and_leaves_nothing_open() -> None:
    cfg = small_config()
    model = ReferenceModel(make_net(cfg))
    model.open("a", seed=0)
    records = [model.step([_turn(k, "a")])[0].context for k in range(3)]
    with pytest.raises(ValueError):
        model.restore("b", 0, [records[0], b"garbage" + records[1]])
    with pytest.raises(ValueError, match="does not follow"):
        model.restore("b", 0, [records[2]])  # its text slots need the queue of micro-turn 1
    assert "b" not in model.sessions and model.pool.open_slots == 1
    model.restore("c", 0, [])
    assert model.step([make_turn("c", 0)])[0].index == 0


def test_the_models_of_a_multi_process_gateway_share_half_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert [cpu_threads(n) for n in (1, 2, 4, 8)] == [4, 2, 1, 1]
    threads = torch.get_num_threads()
    try:
        load_backend("reference", processes=2)
        assert torch.get_num_threads() == 2
        load_backend("reference")
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(threads)


def _decisions(cfg_changes: dict[str, float], n: int = 40) -> tuple[list[float], list[bool]]:
    """p(SPEAK) and whether the model spoke, in each of ``n`` micro-turns of one session."""
    model = ReferenceModel(make_net(small_config(**cfg_changes)), record=True)
    model.open("s", seed=3)
    _outputs(model, "s", 0, 0, n)
    trace = model.sessions["s"].trace
    assert trace is not None
    p = [float(torch.softmax(step[0, [tokenizer.SPEAK, tokenizer.SILENT]], -1)[0]) for step in trace.logits]
    return p, [int(ids[0]) == tokenizer.SPEAK for ids in trace.sampled]


def test_a_greedy_decision_speaks_exactly_when_speaking_is_more_likely() -> None:
    p, spoke = _decisions({"decision_temperature": 0.0})
    assert spoke == [x > 0.5 for x in p]
    p, spoke = _decisions({})
    assert any(s != (x > 0.5) for x, s in zip(p, spoke, strict=True))  # sampled at temperature 1: not the same


def test_a_silent_model_starts_only_above_the_start_threshold() -> None:
    p, spoke = _decisions({})
    starts = [x for k, x in enumerate(p) if spoke[k] and (k == 0 or not spoke[k - 1])]
    threshold = float(np.median(starts)) + 1e-6  # half of the sampled starts fall below it
    assert min(starts) < threshold
    p, spoke = _decisions({"start_threshold": threshold})
    starts = [x for k, x in enumerate(p) if spoke[k] and (k == 0 or not spoke[k - 1])]
    assert starts and min(starts) >= threshold
    assert any(not spoke[k] and spoke[k - 1] for k in range(1, len(spoke)))  # and it still stops when it samples so
    with pytest.raises(ValueError, match="start_threshold"):
        small_config(start_threshold=1.5)
    with pytest.raises(ValueError, match="temperatures"):
        small_config(decision_temperature=-1.0)
