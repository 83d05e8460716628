"""``reference``: the reference interaction model as an engine backend (sessions, batched ticks, sampling).

The engine (:mod:`inference.engine`) calls :meth:`ReferenceModel.step` from its tick thread with at most one
micro-turn per session. One step runs one trunk forward for all of them together, over one packed ragged
batch (each session's new tokens: the last micro-turn's model side, then this micro-turn's user side;
concatenated, no padding; each session attends over its own KV slot); then the depth head unrolls each
session's text tokens (``SPEAK``/``SILENT`` and the captions), sampled one after another; then the flow head
(speaking sessions only) and the vocoder. See :mod:`inference.layout` for the token layout. Output audio is
held back 25 ms (:data:`SEAM`) so that each micro-turn's Griffin-Lim chunk is cross-faded into the last one
instead of butting against it; a silent micro-turn is zeros (after fading out speech that just ended).

Session state (:class:`Session`) is created by :meth:`open` (or :meth:`restore`), touched only by the tick
thread and dropped by :meth:`close`: its slot of the :class:`~inference.kv_cache.KVPool` (bounded: sinks +
sliding window), the last output mel frames and held-back samples (vocoder context), pending user text
(bounded), the model side not yet in the cache, the caption decoder, the link of its last context record, and the
last ``audio_context`` input frames, which the audio encoder hears before the next ones (none without an encoder).
dMel input features keep no state (each micro-turn is framed on its own). Nothing grows with the length of a
session.

Randomness (text sampling, flow noise) comes from a generator seeded by ``(session seed, micro-turn index)``
only, so a context rebuilt elsewhere from the same inputs reproduces the same outputs, alone or in any
batch. """

from __future__ import annotations

import hashlib
import logging
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from inference import tokenizer
from inference.checkpoint import load_checkpoint
from inference.context import RecordShape, TurnRecord, first_link
from inference.dmel import LOG_MIN, DMelStream, quantize
from inference.flow_head import caption_context
from inference.kv_cache import AttentionPlan, KVPool
from inference.layout import AUDIO_IN, AUDIO_OUT, FEATURE, TEXT, Tokens, TurnLayout
from inference.model import ReferenceNet, rope_tables
from inference.video import fit_frame, patches_at
from inference.vocoder import GriffinLim, Vocoder
from microturn.contracts import MICRO_TURN_SAMPLES, MicroTurn, MicroTurnOutput, OutputEvent

log = logging.getLogger(__name__)

MAX_TEXT_BACKLOG = 4096
"""User-side text tokens a session may have waiting; more is dropped (and logged)."""

SEAM = 400
"""Samples (25 ms) by which output audio is held back, so consecutive micro-turns are cross-faded, not cut."""


def turn_seed(seed: int, index: int) -> int:
    """The sampling seed of micro-turn ``index`` of a session seeded ``seed`` (stable across processes)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass
class Trace:
    """What a session's steps computed, kept only when the model records (tests, the re-prefill baseline)."""

    runs: list[Tokens] = field(default_factory=list)  # the tokens each step fed the trunk, in order
    sampled: list[torch.Tensor] = field(default_factory=list)  # per micro-turn (1 + text_out,) text ids
    logits: list[torch.Tensor] = field(default_factory=list)  # per micro-turn (1 + text_out, vocab)
    flow_cond: list[torch.Tensor] = field(default_factory=list)  # per micro-turn (d_model,)
    flow_text: list[torch.Tensor] = field(default_factory=list)  # per micro-turn (flow_text_turns · text_out,)


@dataclass
class Session:
    """One session's state between micro-turns (owned by :class:`ReferenceModel`)."""

    seed: int
    slot: int  # its rows in the KV pool
    voice_context: torch.Tensor  # (vocoder_context, 80) last output log-mel frames
    voice_tail: torch.Tensor  # (SEAM,) last output samples, held back for the next cross-fade
    pending: Tokens  # the last micro-turn's model side, not yet in the cache
    link: bytes  # the link of the session's last context record (the key of the next one)
    said: torch.Tensor  # (flow_text_turns − 1, text_out) caption ids of the last micro-turns, oldest first
    heard: torch.Tensor  # (audio_context, n_mels) the user's last input frames, what the audio encoder hears before
    text_backlog: deque[int] = field(default_factory=deque)
    captions: tokenizer.CaptionDecoder = field(default_factory=tokenizer.CaptionDecoder)
    requests: tokenizer.RequestSpans = field(default_factory=tokenizer.RequestSpans)  # background requests
    trace: Trace | None = None


def cpu_threads(processes: int = 1) -> int:
    """Torch threads for the model of one of ``processes`` gateway processes on this machine's CPU: the tick thread
    is a process's only torch user, and the models share half the cores; the other half is the gateways' codecs."""
    return max(1, (os.cpu_count() or 2) // 2 // processes)


class ReferenceModel:
    """The reference model as a :class:`~microturn.contracts.ModelBackend`."""

    name = "reference"

    def __init__(self, net: ReferenceNet, vocoder: Vocoder | None = None, record: bool = False,
                 threads: int | None = None) -> None:
        self.net = net.eval()
        self.cfg = net.cfg
        self.device = next(net.parameters()).device
        if self.device.type == "cpu":
            torch.set_num_threads(threads or cpu_threads())
        self.layout = TurnLayout.of(self.cfg)
        if self.cfg.vocoder_context * self.cfg.hop < SEAM:
            raise ValueError(f"vocoder_context must cover the {SEAM}-sample cross-fade")
        self.features = DMelStream()
        self.vocoder: Vocoder = vocoder if vocoder is not None else GriffinLim(self.cfg.griffin_lim_iters)
        self.record = record
        self.sessions: dict[str, Session] = {}
        c = self.cfg
        self.pool = KVPool(c.n_layers, c.n_kv_heads, c.head_dim, c.n_sink, c.window, c.max_step_tokens,
                           device=self.device)
        self._slot_owner: list[str] = []
        self.expert_load = torch.zeros(self.cfg.n_layers, self.cfg.n_experts, dtype=torch.long)

    @classmethod
    def from_checkpoint(cls, path: Path, device: str = "cpu", threads: int | None = None) -> ReferenceModel:
        return cls(load_checkpoint(path, device), threads=threads)

    def kv_cache_bytes(self) -> int:
        """Memory the KV pool holds now (all its slots, open or not): what ``/metrics`` reports."""
        return int(self.pool.k.nbytes + self.pool.v.nbytes + self.pool.pos.nbytes)

    # sessions

    def open(self, session_id: str, seed: int) -> None:
        if session_id in self.sessions:
            raise ValueError(f"session {session_id} is already open")
        silence = torch.full((self.cfg.vocoder_context, self.cfg.n_mels), LOG_MIN)
        said = torch.full((max(0, self.cfg.flow_text_turns - 1), self.cfg.text_out), tokenizer.PAD)
        heard = torch.zeros(self.cfg.audio_context, self.cfg.n_mels, dtype=torch.long)  # silence before the call
        self.sessions[session_id] = Session(seed, self.pool.alloc(), silence, torch.zeros(SEAM),
                                            self.layout.silent_model_side(), first_link(seed), said, heard,
                                            trace=Trace() if self.record else None)
        self._slot_owner.append(session_id)

    def close(self, session_id: str) -> None:
        s = self.sessions.pop(session_id, None)
        if s is None:
            return
        moved = self.pool.free(s.slot)
        last = self._slot_owner.pop()
        if moved is not None:
            self._slot_owner[s.slot] = last
            self.sessions[last].slot = s.slot

    # one tick

    def step(self, turns: list[MicroTurn]) -> list[MicroTurnOutput]:
        if not turns:
            return []
        if len({t.session_id for t in turns}) != len(turns):
            raise ValueError("at most one micro-turn per session in a step")
        unknown = [t.session_id for t in turns if t.session_id not in self.sessions]
        if unknown:
            raise ValueError(f"sessions not open: {', '.join(unknown)}")
        # in pool-slot order, so that a tick of all open sessions reads the KV pool without copying
        order = sorted(range(len(turns)), key=lambda i: self.sessions[turns[i].session_id].slot)
        with torch.inference_mode():
            outputs = self._step([turns[i] for i in order])
        result: list[MicroTurnOutput | None] = [None] * len(turns)
        for i, out in zip(order, outputs, strict=True):
            result[i] = out
        return [out for out in result if out is not None]

    def _step(self, turns: list[MicroTurn]) -> list[MicroTurnOutput]:
        cfg = self.cfg
        sessions = [self.sessions[t.session_id] for t in turns]
        gens = [torch.Generator().manual_seed(turn_seed(s.seed, t.index))
                for s, t in zip(sessions, turns, strict=True)]
        bins = self.features.step(torch.from_numpy(np.stack([t.audio for t in turns])))  # (B, 8, 80)
        video = self._video(turns)
        runs, texts = [], []
        for b, (s, t) in enumerate(zip(sessions, turns, strict=True)):
            texts.append(self._take_text(s, t))
            features = video[b]
            frame = None if features is None else Tokens.of_features(features, cfg.frames_per_token, cfg.n_mels)
            runs.append(Tokens.cat([s.pending, self.layout.user_side(texts[b][0], frame, bins[b], s.heard)]))

        z = self._advance(sessions, runs)  # (B, d): trunk state at each session's last user-side token
        logits = [self.net.text_logits(z)]
        control = self._decide(sessions, logits[-1], gens)
        speaking = [c == tokenizer.SPEAK for c in control]
        z = self.net.depth.step(z, torch.tensor(control, device=self.device), 0)
        caption: list[list[int]] = [[] for _ in turns]
        for j in range(cfg.text_out):
            logits.append(self.net.text_logits(z))
            sampled = self._sample(logits[-1], gens, tuple(range(tokenizer.PAD + 1)), cfg.temperature)
            chosen = [i if talk else tokenizer.PAD for i, talk in zip(sampled, speaking, strict=True)]
            for ids, i in zip(caption, chosen, strict=True):
                ids.append(i)
            z = self.net.depth.step(z, torch.tensor(chosen, device=self.device), j + 1)
        cond = z  # (B, d): the depth state after all of this micro-turn's text
        said_so_far = [self._said(s, ids) for s, ids in zip(sessions, caption, strict=True)]  # (turns · text_out,) each

        frames = cfg.frames_per_turn
        mel = torch.full((len(turns), frames, cfg.n_mels), LOG_MIN)
        talkers = [b for b, talk in enumerate(speaking) if talk]
        if talkers:
            noise = torch.stack([torch.randn(frames * cfg.n_mels, generator=gens[b]) for b in talkers])
            text = torch.stack([said_so_far[b] for b in talkers]).to(self.device)
            generated = self.net.flow.sample(cond[talkers], text, noise.to(self.device), cfg.flow_steps)
            mel[talkers] = generated.half().float().cpu()  # fp16 values, so the context record is exact
        out_bins = quantize(mel)
        wave = self._vocode(sessions, mel, talkers)

        outputs = []
        for b, (s, t) in enumerate(zip(sessions, turns, strict=True)):
            s.pending = self.layout.model_side(control[b], caption[b], out_bins[b])
            s.heard = self.layout.heard_next(s.heard, bins[b])
            if s.trace is not None:
                s.trace.runs.append(runs[b])
                s.trace.sampled.append(torch.tensor([control[b], *caption[b]]))
                s.trace.logits.append(torch.stack([step_logits[b] for step_logits in logits]).cpu())
                s.trace.flow_cond.append(cond[b].cpu())
                s.trace.flow_text.append(said_so_far[b])
            record = TurnRecord(t.index, texts[b][0], texts[b][1], video[b], bins[b], control[b], caption[b],
                                mel[b] if speaking[b] else None)
            context = record.encode(s.link)
            s.link = TurnRecord.link_of(context)
            said, requests = s.requests.feed(s.captions.feed(caption[b]))  # a reserved span asks for a task
            events = tuple(OutputEvent("background_request", {"request": r}) for r in requests)
            outputs.append(MicroTurnOutput(t.session_id, t.index, wave[b], said, events,
                                           context=context))
        return outputs

    def _said(self, s: Session, caption: list[int]) -> torch.Tensor:
        """The caption ids the flow head sees this micro-turn (:func:`~inference.flow_head.caption_context`): the
        session's last ones and ``caption``; keeps them for the next micro-turn."""
        ids = torch.tensor([caption])
        context = caption_context(ids, self.cfg.flow_text_turns, s.said)[0]
        s.said = torch.cat([s.said, ids])[1:] if len(s.said) else s.said
        return context

    def _advance(self, sessions: list[Session], runs: list[Tokens]) -> torch.Tensor:
        """Append each run to its session's cache; the hidden state of each run's last token: (B, d)."""
        tokens = Tokens.cat(runs).to(self.device)
        plan = AttentionPlan.cached(self.pool, [s.slot for s in sessions], [len(r) for r in runs])
        h, routings = self.net(self.net.embed(tokens), plan)
        self.expert_load += torch.stack([r.load for r in routings]).cpu()
        ends = torch.tensor([len(r) for r in runs]).cumsum(0) - 1
        return h[ends]

    def _decide(self, sessions: list[Session], logits: torch.Tensor, gens: list[torch.Generator]) -> list[int]:
        """Each session's ``SPEAK``/``SILENT`` token, sampled at ``decision_temperature``; a session that was
        silent in its last micro-turn starts only when ``p(SPEAK)`` reaches ``start_threshold``."""
        choice = (tokenizer.SPEAK, tokenizer.SILENT)
        control = self._sample(logits, gens, choice, self.cfg.decision_temperature)
        if self.cfg.start_threshold <= 0:
            return control
        p_speak = F.softmax(logits[:, torch.tensor(choice, device=logits.device)].float(), dim=-1)[:, 0].cpu()
        silent = [int(s.pending.text[0]) != tokenizer.SPEAK for s in sessions]
        return [tokenizer.SILENT if quiet and float(p) < self.cfg.start_threshold else c
                for c, quiet, p in zip(control, silent, p_speak, strict=True)]

    def _sample(self, logits: torch.Tensor, gens: list[torch.Generator], allowed: tuple[int, ...], temperature: float
                ) -> list[int]:
        sub = logits[:, torch.tensor(allowed, device=logits.device)].float().cpu()  # (B, len(allowed))
        if temperature <= 0:
            return [allowed[int(i)] for i in sub.argmax(dim=-1)]
        cdf = F.softmax(sub / temperature, dim=-1).cumsum(dim=-1)
        draws = torch.stack([torch.rand((), generator=g) for g in gens])  # one uniform per session
        picked = (cdf < draws[:, None]).sum(dim=-1).clamp_max(len(allowed) - 1)  # inverse CDF
        return [allowed[int(i)] for i in picked]

    def _take_text(self, s: Session, turn: MicroTurn) -> tuple[list[int], list[int]]:
        """The ids this micro-turn's text slots carry, and the ids that joined the session's queue."""
        new: list[int] = []
        for text in turn.text:
            new += tokenizer.encode(text, tokenizer.USER)
        for text in turn.background:  # the background input stream: results of background tasks
            new += tokenizer.encode(text, tokenizer.TOOL)
        for event in turn.events:
            if event.name == "background_result":
                new += tokenizer.encode(str(event.data.get("text", "")), tokenizer.TOOL)
            else:
                new += tokenizer.encode(event.name, tokenizer.EVENT)
        room = max(0, MAX_TEXT_BACKLOG - len(s.text_backlog))
        if len(new) > room:
            log.warning("session %s: text backlog full, dropping %d tokens", turn.session_id, len(new) - room)
        return self._consume_text(s, new[:room]), new[:room]

    def _consume_text(self, s: Session, new: list[int]) -> list[int]:
        s.text_backlog.extend(new)
        return [s.text_backlog.popleft() for _ in range(min(self.cfg.text_in, len(s.text_backlog)))]

    def _video(self, turns: list[MicroTurn]) -> list[torch.Tensor | None]:
        """Each micro-turn's video slots through the patch stem, (video_slots, d) fp16; None without a camera.

        One micro-turn at a time: the features go into the session's context record, and must not depend on which
        sessions shared the step (a matmul's kernel, and so the order it sums in, can change with the batch's
        size; on some CPUs that flips the last fp16 bit)."""
        out: list[torch.Tensor | None] = [None] * len(turns)
        for b, turn in enumerate(turns):
            if turn.video is None:
                continue
            frame = fit_frame(turn.video, self.cfg.video_height, self.cfg.video_width)
            pixels, places = patches_at(frame, self.layout.video_patches(turn.index, self.cfg.patches).tolist())
            out[b] = self.net.stem(pixels.to(self.device), places.to(self.device)).half().cpu()
        return out

    def _vocode(self, sessions: list[Session], mel: torch.Tensor, talkers: list[int]) -> list[np.ndarray]:
        """Each session's 3200 output samples, :data:`SEAM` samples late: the vocoder for speaking sessions,
        silence for the others, each micro-turn's head cross-faded with the last one's held-back tail."""
        ctx, hop = self.cfg.vocoder_context, self.cfg.hop
        n = MICRO_TURN_SAMPLES
        audio = torch.zeros(len(sessions), ctx * hop + n)  # samples [start - ctx·hop, start + 3200)
        if talkers:
            prev = torch.stack([sessions[b].voice_context for b in talkers])
            audio[talkers] = self.vocoder(torch.cat([prev, mel[talkers]], dim=1))[:, -(ctx * hop + n):]
        head = audio[:, -n - SEAM:-n]  # the last micro-turn's tail, synthesised again from the context frames
        body = audio[:, -n:-SEAM]
        fade = torch.linspace(0.0, 1.0, SEAM)
        out = []
        for b, s in enumerate(sessions):
            joined = torch.cat([s.voice_tail * (1 - fade) + head[b] * fade, body[b]])
            out.append(joined.numpy().astype(np.float32))
            s.voice_tail = audio[b, -SEAM:].clone()
            s.voice_context = mel[b, -ctx:].clone()
        return out

    # baselines and diagnostics

    def reprefill(self, session_id: str) -> None:
        """Rebuild a recording session's cache from its whole history (the no-KV-reuse baseline)."""
        s = self.sessions[session_id]
        if s.trace is None:
            raise ValueError("reprefill needs a model made with record=True")
        self._prefill(s.slot, Tokens.cat(s.trace.runs))

    def _prefill(self, slot: int, history: Tokens, chunk: int = 256) -> None:
        """Fill pool ``slot`` with the keys of a whole sequence, in long chunks through a scratch slot."""
        self._prefill_parts(slot, [(0, history, self.cfg.n_layers)], chunk)

    def _prefill_parts(self, slot: int, parts: list[tuple[int, Tokens, int]], chunk: int = 256) -> None:
        """Fill pool ``slot`` with the keys of runs ``(position, tokens, depth)``: each run starts at its
        position (increasing; positions between runs are left out) and goes through the first ``depth`` layers
        only (the deeper layers' keys of its positions stay unset). Long chunks, through a scratch slot; the
        slot's next position is the end of the last run."""
        c = self.cfg
        scratch = KVPool(c.n_layers, c.n_kv_heads, c.head_dim, c.n_sink, c.window, chunk, slots=1,
                         device=self.device)
        scratch.alloc()
        with torch.inference_mode():
            for position, run, depth in parts:
                if position < scratch.length[0]:
                    raise ValueError("prefill runs must not overlap")
                scratch.length[0] = position
                for start in range(0, len(run), chunk):
                    part = run.rows(start, min(start + chunk, len(run))).to(self.device)
                    plan = AttentionPlan.cached(scratch, [0], [len(part)])
                    x, rope = self.net.embed(part), rope_tables(plan.positions, c.head_dim, c.rope_base)
                    for block in self.net.blocks[:depth]:
                        x, _ = block(x, rope, plan)
        self.pool.load(slot, scratch, 0)

    @property
    def record_shape(self) -> RecordShape:
        c = self.cfg
        return RecordShape(c.text_in, c.text_out, c.frames_per_turn, c.n_mels, c.video_slots, c.d_model,
                           c.vocab_size)

    def rebuild_plan(self, length: int) -> list[tuple[int, int, int]]:
        """What a cache of ``length`` tokens is rebuilt from: ``(start, end, depth)`` spans of positions, each
        to go through its first ``depth`` layers.

        Why that is exact: a layer's keys at position p are a function of that layer's input at p, which
        attends to the sinks and to positions ``(p − window, p]`` of the layer below. The next query (position
        ``length``) sees positions from ``length − window + 1`` on, so layer ``l``'s keys are needed there, which
        need layer ``l − 1``'s keys ``window − 1`` further back, and so on: with ``W = window − 1`` and ``cut =
        length − n_layers · W``, layer ``l`` (0-based) is needed exactly at positions ``≥ cut + l · W``. So the
        sinks go through every layer, band ``j`` = ``[cut + j · W, cut + (j + 1) · W)`` through layers ``0 … j``
        (the last band ends at ``length``), and nothing before ``cut`` at all: what lies there no longer reaches
        any key a later micro-turn can see. For ``tiny`` that is the sinks plus 2,044 tokens (≈ 157 micro-turns)
        at 10/16 of a full forward's layer work, whatever the length of the session."""
        c = self.cfg
        sinks = min(c.n_sink, length)
        spans = [(0, sinks, c.n_layers)] if sinks else []
        reach = c.window - 1
        cut = length - c.n_layers * reach
        for j in range(c.n_layers):
            start = max(sinks, cut + j * reach)
            end = length if j == c.n_layers - 1 else min(length, cut + (j + 1) * reach)
            if end > start:
                spans.append((start, end, j + 1))
        return spans

    def restore(self, session_id: str, seed: int, history: list[bytes]) -> None:
        """Open a session rebuilt from the ``context`` records of all its micro-turns so far, in order.

        Cost does not grow with the history beyond reading it: every record is checked (chain link, sizes,
        fields) and its text ids and captions replayed into the text queue and the caption decoder, but only
        the sinks and the last ``n_layers · (window − 1)`` tokens go through the trunk (one chunked forward at
        their original positions, deeper layers for later tokens only: see :meth:`rebuild_plan` for why that
        is exact), and only the last two records' mel through the vocoder. A bad history raises
        :class:`ValueError` and opens nothing."""
        shape, n_turn = self.record_shape, self.cfg.turn_tokens
        records: list[TurnRecord] = []
        link = first_link(seed)
        for data in history:
            r = TurnRecord.decode(data, shape, link, payload=False)
            if records and r.index != records[-1].index + 1:
                raise ValueError(f"context record {r.index} follows record {records[-1].index}")
            records.append(r)
            link = TurnRecord.link_of(data)
        self.open(session_id, seed)
        s = self.sessions[session_id]
        try:
            for r in records:
                if self._consume_text(s, r.new_text) != r.text_slots:
                    raise ValueError(f"context record {r.index} does not follow from the ones before it")
                s.requests.feed(s.captions.feed(r.caption))
                self._said(s, r.caption)
            s.link = link
            n = len(records)
            if n == 0:
                return
            full: dict[int, TurnRecord] = {}

            def record(k: int) -> TurnRecord:  # with its payload (only the records the rebuild reads)
                if k not in full:
                    previous = TurnRecord.link_of(history[k - 1]) if k else first_link(seed)
                    full[k] = TurnRecord.decode(history[k], shape, previous)
                return full[k]

            def heard_before(k: int) -> torch.Tensor:  # the audio_context input frames before micro-turn k
                back = -(-self.cfg.audio_context // self.cfg.frames_per_turn)
                heard = torch.zeros(self.cfg.audio_context, self.cfg.n_mels, dtype=torch.long)
                for j in range(max(0, k - back), k):
                    heard = self.layout.heard_next(heard, record(j).audio_bins)
                return heard

            def tokens(start: int, end: int) -> Tokens:  # positions [start, end): micro-turn k's run is k·13 …
                first, last = start // n_turn, -(-end // n_turn)
                run = self._turn_tokens([record(k) for k in range(first, last)], record(first - 1) if first else None,
                                        heard_before(first))
                return run.rows(start - first * n_turn, end - first * n_turn)

            length = n * n_turn
            self._prefill_parts(s.slot, [(start, tokens(start, end), depth)
                                         for start, end, depth in self.rebuild_plan(length)])
            if s.trace is not None:
                whole = tokens(0, length)
                s.trace.runs.extend(whole.rows(k * n_turn, (k + 1) * n_turn) for k in range(n))
                s.trace.sampled.extend(torch.tensor([r.control, *r.caption]) for r in records)
            final = record(n - 1)
            s.pending = self._model_side(final)
            s.heard = heard_before(n)
            self._restore_voice(s, [self._mel(record(k)) for k in range(max(0, n - 2), n)], final.spoke)
        except Exception:
            self.close(session_id)
            raise

    def _mel(self, r: TurnRecord) -> torch.Tensor:
        """The output mel a micro-turn's record stands for: its mel when it spoke, silence otherwise."""
        if r.mel is None:
            return torch.full((self.cfg.frames_per_turn, self.cfg.n_mels), LOG_MIN)
        return r.mel.float()

    def _model_side(self, r: TurnRecord) -> Tokens:
        return self.layout.model_side(r.control, r.caption, quantize(self._mel(r)))

    def _turn_tokens(self, records: list[TurnRecord], before: TurnRecord | None, heard: torch.Tensor) -> Tokens:
        """The tokens consecutive micro-turns ``records`` fed the trunk — each one's run is the model side of the
        micro-turn before it (``before`` for the first; None: the session's initial silent model side), then
        its user side, whose audio the ``audio_context`` frames ``heard`` preceded — built at once: the same tokens
        as :meth:`TurnLayout.model_side` and :meth:`TurnLayout.user_side` run by run
        (``tests/test_reference_restore.py`` checks it)."""
        c = self.cfg
        n_audio, pad = c.audio_tokens, tokenizer.PAD
        silent = torch.zeros(c.frames_per_turn, c.n_mels, dtype=torch.long)
        kinds: list[int] = []
        ids: list[int] = []
        audio: list[torch.Tensor] = []
        features: list[torch.Tensor] = []
        for prev, r in zip([before, *records[:-1]], records, strict=True):
            if prev is None:
                kinds += [TEXT] * (1 + c.text_out) + [AUDIO_OUT] * n_audio
                ids += [tokenizer.SILENT] + [pad] * c.text_out + [0] * n_audio
                audio.append(silent)
            else:
                kinds += [TEXT] * (1 + c.text_out) + [AUDIO_OUT] * n_audio
                ids += [prev.control, *prev.caption] + [0] * n_audio
                audio.append(silent if prev.mel is None else quantize(prev.mel.float()))
            if len(r.text_slots) > c.text_in:
                raise ValueError(f"context record {r.index}: {len(r.text_slots)} text slots")
            ids += r.text_slots + [pad] * (c.text_in - len(r.text_slots))
            kinds += [TEXT] * c.text_in
            if r.video is None:
                kinds += [TEXT] * c.video_slots
                ids += [tokenizer.NO_VIDEO] * c.video_slots
            else:
                kinds += [FEATURE] * c.video_slots
                ids += [0] * c.video_slots
                features.append(r.video)
            kinds += [AUDIO_IN] * n_audio
            ids += [0] * n_audio
            audio.append(r.audio_bins)
        empty = Tokens.empty(c.frames_per_token, c.n_mels)
        stream = torch.cat([heard, *(r.audio_bins for r in records)])  # the user's frames, audio_context early
        starts = [k * c.frames_per_turn + j * c.frames_per_token for k in range(len(records)) for j in range(n_audio)]
        return Tokens(torch.tensor(kinds), torch.tensor(ids),
                      torch.stack(audio).reshape(-1, c.frames_per_token, c.n_mels), empty.patches, empty.grid,
                      torch.cat(features).float() if features else empty.features,
                      torch.stack([stream[i:i + c.audio_context] for i in starts]))

    def _restore_voice(self, s: Session, mels: list[torch.Tensor], spoke: bool) -> None:
        """The vocoder state after the last restored micro-turn: its last frames and its held-back tail."""
        ctx, n = self.cfg.vocoder_context, MICRO_TURN_SAMPLES
        if not mels:
            return
        previous = mels[-2][-ctx:] if len(mels) == 2 else torch.full((ctx, self.cfg.n_mels), LOG_MIN)
        if spoke:
            with torch.inference_mode():
                audio = self.vocoder(torch.cat([previous, mels[-1]])[None])[0, -(ctx * self.cfg.hop + n):]
            s.voice_tail = audio[-SEAM:].clone()
        s.voice_context = mels[-1][-ctx:].clone()
