"""Streaming equals offline: stepping a session through its KV pool slot gives the logits and flow
conditioning of one causal forward over the whole sequence, also after the sliding window has evicted keys."""

from __future__ import annotations

import pytest
import torch

from inference import tokenizer
from inference.flow_head import caption_context
from inference.kv_cache import AttentionPlan, KVPool
from inference.layout import Tokens
from inference.reference import ReferenceModel
from tests._reference_helpers import make_net, run, small_config


def _offline(model: ReferenceModel, session_id: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every micro-turn's text logits and flow conditioning, from one full forward over the whole sequence and
    the depth head run on the tokens the session sampled."""
    trace = model.sessions[session_id].trace
    assert trace is not None
    cfg = model.cfg
    sequence = Tokens.cat(trace.runs)
    rows = torch.tensor([len(run) for run in trace.runs]).cumsum(0) - 1  # each run ends with its user side
    with torch.no_grad():
        plan = AttentionPlan.full([len(sequence)], cfg.window, cfg.n_sink)
        h, _ = model.net(model.net.embed(sequence), plan)
        logits, cond = model.net.teacher_forced(h[rows], torch.stack(trace.sampled))
    return logits.flatten(0, 1), cond


@pytest.mark.parametrize("audio_context", [0, 28])
def test_stepping_equals_one_causal_forward_after_eviction(audio_context: int) -> None:
    cfg = small_config(audio_context=audio_context)
    model = ReferenceModel(make_net(cfg), record=True)
    model.open("a", seed=3)
    run(model, "a", 24)
    trace = model.sessions["a"].trace
    assert trace is not None
    assert model.pool.length[0] > cfg.window + cfg.n_sink  # keys have been evicted
    logits, cond = _offline(model, "a")
    stepped = torch.cat(trace.logits)
    torch.testing.assert_close(stepped, logits, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(torch.stack(trace.flow_cond), cond, atol=2e-4, rtol=1e-4)
    # the flow head's caption context is the one training gives it: the sampled captions, laid out offline
    captions = torch.stack(trace.sampled)[:, 1:]
    assert cfg.flow_text_turns > 1 and int((captions != tokenizer.PAD).sum()) > 0
    assert torch.equal(torch.stack(trace.flow_text), caption_context(captions, cfg.flow_text_turns))


def test_reprefill_rebuilds_the_same_cache() -> None:
    cfg = small_config()
    a, b = ReferenceModel(make_net(cfg), record=True), ReferenceModel(make_net(cfg), record=True)
    for m in (a, b):
        m.open("s", seed=1)
        run(m, "s", 12)
    b.reprefill("s")
    run(a, "s", 3, start=12)
    run(b, "s", 3, start=12)
    ta, tb = a.sessions["s"].trace, b.sessions["s"].trace
    assert ta is not None and tb is not None
    torch.testing.assert_close(torch.cat(ta.logits[12:]), torch.cat(tb.logits[12:]), atol=2e-4, rtol=1e-4)


def test_pool_ring_keeps_exactly_the_window_and_sinks() -> None:
    pool = KVPool(1, 1, 2, n_sink=2, window=5, max_step_tokens=3)
    slot = pool.alloc()
    for n in (3, 1, 3, 2, 3, 3):
        plan = AttentionPlan.cached(pool, [slot], [n])
        for q, row in zip(plan.positions.tolist(), plan.mask[0, 0], strict=True):
            seen = sorted(pool.pos[slot, :plan.used][row].tolist())
            assert seen == sorted({0, 1} & set(range(q + 1)) | set(range(max(0, q - 4), q + 1)))
    assert pool.bytes_per_session == 2 * 1 * 1 * pool.capacity * 2 * 4 + pool.capacity * 8


def test_pool_free_keeps_slots_dense() -> None:
    pool = KVPool(1, 1, 2, n_sink=1, window=4, max_step_tokens=2)
    slots = [pool.alloc() for _ in range(5)]  # grows past its initial 4 slots
    assert slots == [0, 1, 2, 3, 4]
    AttentionPlan.cached(pool, [4], [2])
    assert pool.free(1) == 4
    assert pool.length == [0, 2, 0, 0]
    assert pool.free(3) is None
    assert pool.open_slots == 3
