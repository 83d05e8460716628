"""``reference``: the reference interaction model as an engine backend (sessions, batched ticks, sampling).

The engine (:mod:`inference.engine`) calls :meth:`ReferenceModel.step` from its tick thread with at most one
micro-turn per session. One step runs one trunk forward for all of them together, over one packed ragged
batch (each session's new tokens: the last micro-turn's model side, then this micro-turn's user side;
concatenated, no padding; each session attends over its own KV slot); then the depth head unrolls each
session's text tokens (``SPEAK``/``SILENT`` and the captions), sampled one after another; then the flow head
(speaking sessions only) and the vocoder. See :mod:`inference.layout` for the token layout. Output audio is
held back 25 ms (:data:`SEAM`) so that each micro-turn's Griffin-Lim chunk is cross-faded into the last one
instead of butting against it; a silent micro-turn is zeros (after fading out speech that just ended).

Session state (:class:`Session`) is created by :meth:`open`, touched only by the tick thread and dropped by
:meth:`close`: its slot of the :class:`~inference.kv_cache.KVPool` (bounded: sinks + sliding window), the
last 624 audio samples (dMel context), the last output mel frames (vocoder context), pending user text
(bounded), the model side not yet in the cache, and the caption decoder. Nothing else grows with the length
of a session.

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
from inference.context import TurnRecord
from inference.dmel import LOG_MIN, DMelStream, quantize
from inference.kv_cache import AttentionPlan, KVPool
from inference.layout import Tokens, TurnLayout
from inference.model import ReferenceNet
from inference.video import patches_at
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


@dataclass
class Session:
    """One session's state between micro-turns (owned by :class:`ReferenceModel`)."""

    seed: int
    slot: int  # its rows in the KV pool
    voice_context: torch.Tensor  # (vocoder_context, 80) last output log-mel frames
    voice_tail: torch.Tensor  # (SEAM,) last output samples, held back for the next cross-fade
    pending: Tokens  # the last micro-turn's model side, not yet in the cache
    text_backlog: deque[int] = field(default_factory=deque)
    captions: tokenizer.CaptionDecoder = field(default_factory=tokenizer.CaptionDecoder)
    requests: tokenizer.RequestSpans = field(default_factory=tokenizer.RequestSpans)  # background requests
    trace: Trace | None = None


class ReferenceModel:
    """The reference model as a :class:`~microturn.contracts.ModelBackend`."""

    name = "reference"

    def __init__(self, net: ReferenceNet, vocoder: Vocoder | None = None, record: bool = False,
                 threads: int | None = None) -> None:
        self.net = net.eval()
        self.cfg = net.cfg
        self.device = next(net.parameters()).device
        if self.device.type == "cpu":
            # the tick thread is the process's only torch user; leave the other cores to the gateway's codecs
            torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) // 2))
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
    def from_checkpoint(cls, path: Path, device: str = "cpu") -> ReferenceModel:
        return cls(load_checkpoint(path, device))

    # sessions

    def open(self, session_id: str, seed: int) -> None:
        if session_id in self.sessions:
            raise ValueError(f"session {session_id} is already open")
        silence = torch.full((self.cfg.vocoder_context, self.cfg.n_mels), LOG_MIN)
        self.sessions[session_id] = Session(seed, self.pool.alloc(), silence, torch.zeros(SEAM),
                                            self.layout.silent_model_side(),
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
            runs.append(Tokens.cat([s.pending, self.layout.user_side(texts[b][0], frame, bins[b])]))

        z = self._advance(sessions, runs)  # (B, d): trunk state at each session's last user-side token
        logits = [self.net.text_logits(z)]
        control = self._sample(logits[-1], gens, allowed=(tokenizer.SPEAK, tokenizer.SILENT))
        speaking = [c == tokenizer.SPEAK for c in control]
        z = self.net.depth.step(z, torch.tensor(control, device=self.device), 0)
        caption: list[list[int]] = [[] for _ in turns]
        for j in range(cfg.text_out):
            logits.append(self.net.text_logits(z))
            sampled = self._sample(logits[-1], gens, allowed=tuple(range(tokenizer.PAD + 1)))
            chosen = [i if talk else tokenizer.PAD for i, talk in zip(sampled, speaking, strict=True)]
            for ids, i in zip(caption, chosen, strict=True):
                ids.append(i)
            z = self.net.depth.step(z, torch.tensor(chosen, device=self.device), j + 1)
        cond = z  # (B, d): the depth state after all of this micro-turn's text

        frames = cfg.frames_per_turn
        mel = torch.full((len(turns), frames, cfg.n_mels), LOG_MIN)
        talkers = [b for b, talk in enumerate(speaking) if talk]
        if talkers:
            noise = torch.stack([torch.randn(frames * cfg.n_mels, generator=gens[b]) for b in talkers])
            generated = self.net.flow.sample(cond[talkers], noise.to(self.device), cfg.flow_steps)
            mel[talkers] = generated.half().float().cpu()  # fp16 values, so the context record is exact
        out_bins = quantize(mel)
        wave = self._vocode(sessions, mel, talkers)

        outputs = []
        for b, (s, t) in enumerate(zip(sessions, turns, strict=True)):
            s.pending = self.layout.model_side(control[b], caption[b], out_bins[b])
            if s.trace is not None:
                s.trace.runs.append(runs[b])
                s.trace.sampled.append(torch.tensor([control[b], *caption[b]]))
                s.trace.logits.append(torch.stack([step_logits[b] for step_logits in logits]).cpu())
                s.trace.flow_cond.append(cond[b].cpu())
            record = TurnRecord(t.index, texts[b][0], texts[b][1], video[b], bins[b], control[b], caption[b],
                                mel[b] if speaking[b] else None)
            said, requests = s.requests.feed(s.captions.feed(caption[b]))  # a reserved span asks for a task
            events = tuple(OutputEvent("background_request", {"request": r}) for r in requests)
            outputs.append(MicroTurnOutput(t.session_id, t.index, wave[b], said, events,
                                           context=record.encode()))
        return outputs

    def _advance(self, sessions: list[Session], runs: list[Tokens]) -> torch.Tensor:
        """Append each run to its session's cache; the hidden state of each run's last token: (B, d)."""
        tokens = Tokens.cat(runs).to(self.device)
        plan = AttentionPlan.cached(self.pool, [s.slot for s in sessions], [len(r) for r in runs])
        h, routings = self.net(self.net.embed(tokens), plan)
        self.expert_load += torch.stack([r.load for r in routings]).cpu()
        ends = torch.tensor([len(r) for r in runs]).cumsum(0) - 1
        return h[ends]

    def _sample(self, logits: torch.Tensor, gens: list[torch.Generator], allowed: tuple[int, ...]
                ) -> list[int]:
        sub = logits[:, torch.tensor(allowed, device=logits.device)].float().cpu()  # (B, len(allowed))
        if self.cfg.temperature <= 0:
            return [allowed[int(i)] for i in sub.argmax(dim=-1)]
        cdf = F.softmax(sub / self.cfg.temperature, dim=-1).cumsum(dim=-1)
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
        """Each micro-turn's video slots through the patch stem, (video_slots, d) fp16; None without a camera."""
        picked = [b for b, t in enumerate(turns) if t.video is not None]
        out: list[torch.Tensor | None] = [None] * len(turns)
        if not picked:
            return out
        patches, grids = [], []
        for b in picked:
            video = turns[b].video
            assert video is not None
            frame = self._fit_frame(video)
            pixels, places = patches_at(frame, self.layout.video_patches(turns[b].index, self.cfg.patches).tolist())
            patches.append(pixels)
            grids.append(places)
        features = self.net.stem(torch.cat(patches).to(self.device), torch.cat(grids).to(self.device))
        for b, f in zip(picked, features.half().cpu().split(self.cfg.video_slots), strict=True):
            out[b] = f
        return out

    def _fit_frame(self, video: np.ndarray) -> np.ndarray:
        size = (self.cfg.video_height, self.cfg.video_width)
        if video.shape[:2] == size:
            return video
        t = torch.from_numpy(np.ascontiguousarray(video)).permute(2, 0, 1)[None].float()
        return F.interpolate(t, size=size, mode="area")[0].permute(1, 2, 0).round().to(torch.uint8).numpy()

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
        c = self.cfg
        scratch = KVPool(c.n_layers, c.n_kv_heads, c.head_dim, c.n_sink, c.window, chunk, slots=1,
                         device=self.device)
        scratch.alloc()
        with torch.inference_mode():
            for start in range(0, len(history), chunk):
                part = history.rows(start, min(start + chunk, len(history))).to(self.device)
                self.net(self.net.embed(part), AttentionPlan.cached(scratch, [0], [len(part)]))
        self.pool.load(slot, scratch, 0)

    def restore(self, session_id: str, seed: int, history: list[bytes]) -> None:
        """Open a session rebuilt from the ``context`` records of all its micro-turns so far, in order."""
        c = self.cfg
        records = [TurnRecord.decode(data, c.text_out, c.frames_per_turn, c.n_mels, c.video_slots, c.d_model)
                   for data in history]
        self.open(session_id, seed)
        s = self.sessions[session_id]
        try:
            runs, silence = [], torch.full((c.frames_per_turn, c.n_mels), LOG_MIN)
            for r in records:
                if self._consume_text(s, r.new_text) != r.text_slots:
                    raise ValueError(f"context record {r.index} does not follow from the ones before it")
                frame = None if r.video is None else Tokens.of_features(r.video, c.frames_per_token, c.n_mels)
                runs.append(Tokens.cat([s.pending, self.layout.user_side(r.text_slots, frame, r.audio_bins)]))
                mel = silence if r.mel is None else r.mel.float()
                s.pending = self.layout.model_side(r.control, r.caption, quantize(mel))
                s.requests.feed(s.captions.feed(r.caption))
                if s.trace is not None:
                    s.trace.runs.append(runs[-1])
                    s.trace.sampled.append(torch.tensor([r.control, *r.caption]))
            if runs:
                self._prefill(s.slot, Tokens.cat(runs))
            self._restore_voice(s, [silence if r.mel is None else r.mel.float() for r in records[-2:]],
                                records[-1].mel is not None if records else False)
        except Exception:
            self.close(session_id)
            raise

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

