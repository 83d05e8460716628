"""Restoring a reference-model session from its context records, on a fresh model loaded from the same checkpoint:
stepping it on gives what the original session gives (captions, events and decisions equal; logits, flow
conditioning, KV cache, vocoder state and audio equal within fp32 tolerance), alone or batched; bad records are
refused; a long history is rebuilt from its last window only."""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch

from inference import tokenizer
from inference.checkpoint import load_checkpoint, save_checkpoint
from inference.config import ModelConfig, preset
from inference.context import LINK, TurnRecord, first_link
from inference.layout import Tokens
from inference.reference import SEAM, ReferenceModel
from microturn.contracts import ControlEvent, MicroTurn, MicroTurnOutput
from tests._reference_helpers import make_net, make_turn, small_config

ATOL_KV = ATOL_LOGITS = 1e-4
"""Cached keys/values, logits and flow conditioning (fp32): a restored cache is computed in long chunks, the live
one 14 tokens at a time; the same math summed in another order (logit differences seen: ≤ 1e-6)."""
MEL_RTOL, MEL_ATOL = 2**-10, 2**-19
"""Output mel, rounded to fp16 by the live path: fp32 noise flips at most the last bit of a few values. Near zero,
fp16 is finer than that noise: the flow head's mel comes out of ``x · 4.5 − 2.5`` in fp32 (``from_unit``), whose
rounding is absolute, 2^-21 at terms of 4 to 8; four of those (2^-19 ≈ 1.9e-6 log10 units) is the floor. (Seen: one
value of 1.2e-4 off by 1.19e-6, with the caption-context flow head's random weights.)"""
AUDIO_ATOL = 1e-4
"""Output audio where the vocoder's whole input is the same (this micro-turn's mel and the last one's context
frames, bit for bit): the same Griffin-Lim, batched otherwise, differs by fp32 noise (seen: none unbatched). Where
a last-bit mel flip fed it, no sample bound is meaningful for these random-weight nets: their audio is about 85 %
clipped at full scale, so the flip moves zero crossings, and samples differ by up to 0.49 (35 to 93 dB below the
micro-turn's energy, seen over net seeds); the mel bound above covers those micro-turns. A micro-turn's first
:data:`~inference.reference.SEAM` samples are the cross-fade from the last one's output, so they count as its."""


def _checkpoint(tmp_path: Path, cfg: ModelConfig) -> Path:
    return save_checkpoint(make_net(cfg, seed=3), tmp_path / "ckpt")


def _model(path: Path) -> ReferenceModel:
    return ReferenceModel(load_checkpoint(path), record=True)


def _history_turn(sid: str, k: int, n: int) -> MicroTurn:
    """Random audio, the camera on most of the time, typed text, a background result and a control event; text
    typed just before the move is still queued when it happens."""
    text = ("hello there, model",) if k in (1, n - 2) else ()
    events: tuple[ControlEvent, ...] = ()
    if k == 6:
        events = (ControlEvent("background_result", {"text": "42 is the answer"}),)
    elif k == n // 2:
        events = (ControlEvent("camera_off"),)
    return make_turn(sid, k, seed=11, video=k % 5 != 4 and k < n // 2 or k > n // 2 + 3, text=text, events=events)


def _continuation(sid: str, n: int) -> list[MicroTurn]:
    """5 silent gap micro-turns (how a resume fills the time away), then 5 live ones."""
    gap = [MicroTurn(sid, n + k, np.zeros(3200, np.float32)) for k in range(5)]
    return gap + [make_turn(sid, n + 5 + k, seed=12, text=("ok",) if k == 1 else ()) for k in range(5)]


def _records(model: ReferenceModel, outs: list[MicroTurnOutput], link: bytes) -> list[TurnRecord]:
    records = []
    for o in outs:
        records.append(TurnRecord.decode(o.context, model.record_shape, link))
        link = TurnRecord.link_of(o.context)
    return records


def _assert_same(model: ReferenceModel, outs: list[MicroTurnOutput], ref: list[MicroTurnOutput], link: bytes
                 ) -> None:
    """Same indices, captions, events, decisions and caption ids; mel to fp16's last bit; audio to fp32 noise
    wherever the vocoder was given the same mel (see :data:`AUDIO_ATOL`)."""
    assert [o.index for o in outs] == [o.index for o in ref]
    assert [o.text for o in outs] == [o.text for o in ref]
    assert [o.events for o in outs] == [o.events for o in ref]
    same_mel = []
    for x, y in zip(_records(model, outs, link), _records(model, ref, link), strict=True):
        assert (x.index, x.control, x.caption, x.text_slots, x.new_text) == (y.index, y.control, y.caption,
                                                                             y.text_slots, y.new_text)
        assert torch.equal(x.audio_bins, y.audio_bins)
        assert (x.video is None) == (y.video is None) and (x.video is None or torch.equal(x.video, y.video))
        assert (x.mel is None) == (y.mel is None)
        if x.mel is not None and y.mel is not None:
            torch.testing.assert_close(x.mel.float(), y.mel.float(), rtol=MEL_RTOL, atol=MEL_ATOL)
        same_mel.append(x.mel is None or (y.mel is not None and torch.equal(x.mel, y.mel)))
    vocoded_same = [same and (k == 0 or same_mel[k - 1]) for k, same in enumerate(same_mel)]
    for k, (o, r) in enumerate(zip(outs, ref, strict=True)):
        if vocoded_same[k]:
            start = 0 if k == 0 or vocoded_same[k - 1] else SEAM
            np.testing.assert_allclose(o.audio[start:], r.audio[start:], rtol=0, atol=AUDIO_ATOL,
                                       err_msg=f"micro-turn {o.index}")


def _visible_kv(model: ReferenceModel, sid: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The keys, values and positions a session's next query can see, in position order."""
    pool, slot = model.pool, model.sessions[sid].slot
    length = pool.length[slot]
    pos = pool.pos[slot]
    rows = ((pos >= 0) & ((pos < pool.n_sink) | (pos > length - pool.window))).nonzero().squeeze(1)
    rows = rows[pos[rows].argsort()]
    return pos[rows], pool.k[:, slot, :, rows], pool.v[:, slot, :, rows]


@pytest.mark.parametrize(("name", "n"), [("small", 60), ("small with an audio encoder", 60), ("tiny", 300)])
def test_restored_session_continues_like_the_original(tmp_path: Path, name: str, n: int) -> None:
    cfg = {"small": small_config(), "small with an audio encoder": small_config(audio_context=20),
           "tiny": preset("tiny")}[name]
    assert n * cfg.turn_tokens > cfg.n_layers * cfg.window  # keys were evicted, and the rebuild skips the start
    path = _checkpoint(tmp_path, cfg)
    a = _model(path)
    a.open("s", seed=5)
    history = [a.step([_history_turn("s", k, n)])[0] for k in range(n)]
    assert a.sessions["s"].text_backlog  # text still queued at the move
    assert any(o.text for o in history) and any(o.audio.any() for o in history)

    b = _model(path)
    b.restore("s", 5, [o.context for o in history])
    assert list(b.sessions["s"].text_backlog) == list(a.sessions["s"].text_backlog)
    pos_a, k_a, v_a = _visible_kv(a, "s")
    pos_b, k_b, v_b = _visible_kv(b, "s")
    assert torch.equal(pos_a, pos_b) and b.pool.length[b.sessions["s"].slot] == n * cfg.turn_tokens
    torch.testing.assert_close(k_b, k_a, rtol=0, atol=ATOL_KV)
    torch.testing.assert_close(v_b, v_a, rtol=0, atol=ATOL_KV)
    voice_a, voice_b = a.sessions["s"], b.sessions["s"]  # the vocoder's state: its last mel frames and held-back tail
    assert torch.equal(voice_b.voice_context, voice_a.voice_context)
    torch.testing.assert_close(voice_b.voice_tail, voice_a.voice_tail, rtol=0, atol=AUDIO_ATOL)

    rest_a = [a.step([t])[0] for t in _continuation("s", n)]
    rest_b = [b.step([t])[0] for t in _continuation("s", n)]
    _assert_same(b, rest_b, rest_a, TurnRecord.link_of(history[-1].context))
    trace_a, trace_b = a.sessions["s"].trace, b.sessions["s"].trace
    assert trace_a is not None and trace_b is not None
    assert all(torch.equal(x, y) for x, y in zip(trace_b.sampled[n:], trace_a.sampled[n:], strict=True))
    for x, y in zip(trace_b.logits, trace_a.logits[n:], strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=ATOL_LOGITS)
    for x, y in zip(trace_b.flow_cond, trace_a.flow_cond[n:], strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=ATOL_LOGITS)
    # the restored session's records go on the chain, so it can be restored again
    c = _model(path)
    c.restore("s", 5, [o.context for o in history + rest_b])
    assert c.sessions["s"].link == b.sessions["s"].link


def test_restored_session_batched_with_others_gives_the_same_outputs(tmp_path: Path) -> None:
    cfg = small_config()
    path = _checkpoint(tmp_path, cfg)
    a = _model(path)
    a.open("s", seed=8)
    history = [a.step([_history_turn("s", k, 40)])[0] for k in range(40)]
    rest_a = [a.step([t])[0] for t in _continuation("s", 40)]

    b = _model(path)
    b.open("x", seed=1)
    b.open("y", seed=2)
    for k in range(25):
        b.step([make_turn("y", k, seed=3)])
    b.restore("s", 8, [o.context for o in history])
    rest_b = []
    for j, t in enumerate(_continuation("s", 40)):
        outs = b.step([make_turn("y", 25 + j, seed=3), t, make_turn("x", j, seed=4)])
        rest_b.append(outs[1])
    _assert_same(b, rest_b, rest_a, TurnRecord.link_of(history[-1].context))


def test_bad_histories_are_refused_and_open_nothing(tmp_path: Path) -> None:
    cfg = small_config()
    model = ReferenceModel(make_net(cfg))
    model.open("a", seed=0)
    records = [model.step([_history_turn("a", k, 12)])[0].context for k in range(12)]
    flipped = bytearray(records[5])
    flipped[len(flipped) // 2] ^= 0x10
    other = ReferenceModel(make_net(dataclasses.replace(cfg, video_slots=3)))
    other.open("z", seed=0)
    cases = {
        "corrupt": records[:5] + [bytes(flipped)] + records[6:],
        "truncated": records[:5] + [records[5][:-3]] + records[6:],
        "too short": [b"MTC"],
        "lost": records[:5] + records[6:],
        "repeated": records[:6] + records[5:],
        "reordered": records[:4] + [records[5], records[4]] + records[6:],
        "not the start": records[1:],
        "other format": [b"\x80hello"] + records[1:],
        "other config": [other.step([make_turn("z", 0)])[0].context],
    }
    for name, history in cases.items():
        with pytest.raises(ValueError):
            model.restore("b", 0, history)
        assert "b" not in model.sessions and model.pool.open_slots == 1, name
    with pytest.raises(ValueError, match="does not follow"):
        model.restore("b", 1, records)  # another session's records (another seed)
    with pytest.raises(ValueError, match="does not follow"):
        model.restore("b", 0, records[:3] + [bytes(flipped)])
    model.restore("b", 0, records)  # and the good history still restores
    assert model.step([make_turn("b", 12)])[0].index == 12


def _synthetic_history(cfg: ModelConfig, n: int, seed: int) -> list[bytes]:
    """Valid records of an n-micro-turn session (random bins, features and speech), made without stepping."""
    rng = np.random.default_rng(0)
    link, out, queue = first_link(seed), [], deque[int]()
    for k in range(n):
        new = tokenizer.encode("hi there", tokenizer.USER) if k % 50 == 3 else []
        queue.extend(new)
        slots = [queue.popleft() for _ in range(min(cfg.text_in, len(queue)))]
        spoke = k % 3 == 0
        video = (torch.from_numpy(rng.standard_normal((cfg.video_slots, cfg.d_model)).astype(np.float16))
                 if k % 2 else None)
        mel = (torch.from_numpy(rng.uniform(-7, 2, (cfg.frames_per_turn, cfg.n_mels)).astype(np.float16))
               if spoke else None)
        caption = list(b"abc"[: cfg.text_out]) if spoke else [tokenizer.PAD] * cfg.text_out
        bins = torch.from_numpy(rng.integers(0, 16, (cfg.frames_per_turn, cfg.n_mels)))
        record = TurnRecord(k, slots, new, video, bins, tokenizer.SPEAK if spoke else tokenizer.SILENT, caption, mel)
        data = record.encode(link)
        link = data[-LINK:]
        out.append(data)
    return out


def test_long_history_rebuilds_the_full_cache_from_its_last_window_only() -> None:
    cfg = preset("tiny")
    model = ReferenceModel(make_net(cfg))
    history = _synthetic_history(cfg, 3000, seed=4)
    print(f"\nrecord bytes per micro-turn (tiny, synthetic mix): mean {np.mean([len(h) for h in history]):.0f}, "
          f"min {min(map(len, history))}, max {max(map(len, history))}")
    times = []
    for attempt in range(3):
        start = time.perf_counter()
        model.restore(f"s{attempt}", 4, history)
        times.append(time.perf_counter() - start)
    print(f"restore of 3000 micro-turns (tiny, {torch.get_num_threads()} torch thread): "
          f"{', '.join(f'{t * 1000:.0f}' for t in times)} ms")
    assert min(times) < 10  # generous: measured ≈ 0.5 s on 2 shared cores
    assert model.pool.length[model.sessions["s0"].slot] == 3000 * cfg.turn_tokens

    # the same cache as a forward over the whole sequence, on a history longer than the rebuild's reach
    short = history[:400]
    model.restore("r", 4, short)
    whole = ReferenceModel(make_net(cfg), record=True)
    whole.restore("w", 4, short)  # records the whole token sequence
    trace = whole.sessions["w"].trace
    assert trace is not None and len(trace.runs) == 400
    whole._prefill(whole.sessions["w"].slot, Tokens.cat(trace.runs))  # every layer of every token
    for x, y in zip(_visible_kv(model, "r"), _visible_kv(whole, "w"), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=ATOL_KV)


@pytest.mark.parametrize("audio_context", [0, 20])
def test_tokens_built_at_once_equal_the_layout_run_by_run(audio_context: int) -> None:
    cfg = small_config(audio_context=audio_context)
    model = ReferenceModel(make_net(cfg))
    history = _synthetic_history(cfg, 8, seed=0)
    link, records = first_link(0), []
    for data in history:
        records.append(TurnRecord.decode(data, model.record_shape, link))
        link = data[-LINK:]
    runs = []
    heard = torch.zeros(audio_context, cfg.n_mels, dtype=torch.long)
    for k, r in enumerate(records):
        frame = None if r.video is None else Tokens.of_features(r.video, cfg.frames_per_token, cfg.n_mels)
        before = model.layout.silent_model_side() if k == 0 else model._model_side(records[k - 1])
        runs.append(Tokens.cat([before, model.layout.user_side(r.text_slots, frame, r.audio_bins, heard)]))
        heard = model.layout.heard_next(heard, r.audio_bins)
    expected = Tokens.cat(runs)
    got = model._turn_tokens(records, None, torch.zeros(audio_context, cfg.n_mels, dtype=torch.long))
    for field in dataclasses.fields(Tokens):
        assert torch.equal(getattr(got, field.name), getattr(expected, field.name)), field.name
    assert got.before.shape == (2 * len(records), audio_context, cfg.n_mels)
