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
from inference.dmel import LOG_MIN, DMelStream, quantize
from inference.kv_cache import AttentionPlan, KVPool
from inference.layout import Tokens, TurnLayout
from inference.model import ReferenceNet
from inference.video import patch_grid, to_patches
from inference.vocoder import GriffinLim, Vocoder
from microturn.contracts import MICRO_TURN_SAMPLES, MicroTurn, MicroTurnOutput

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
    audio_context: torch.Tensor  # (624,) last input samples
    voice_context: torch.Tensor  # (vocoder_context, 80) last output log-mel frames
    voice_tail: torch.Tensor  # (SEAM,) last output samples, held back for the next cross-fade
    pending: Tokens  # the last micro-turn's model side, not yet in the cache
    text_backlog: deque[int] = field(default_factory=deque)
    captions: tokenizer.CaptionDecoder = field(default_factory=tokenizer.CaptionDecoder)
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
        self.sessions[session_id] = Session(seed, self.pool.alloc(), DMelStream.initial_state(), silence,
                                            torch.zeros(SEAM), self.layout.silent_model_side(),
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
        audio = torch.from_numpy(np.stack([t.audio for t in turns]))
        bins, contexts = self.features.step(audio, torch.stack([s.audio_context for s in sessions]))
        runs = []
        for b, (s, t) in enumerate(zip(sessions, turns, strict=True)):
            s.audio_context = contexts[b]
            user = self.layout.user_side(self._take_text(s, t), *self._video(t), bins[b])
            runs.append(Tokens.cat([s.pending, user]))

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
            mel[talkers] = self.net.flow.sample(cond[talkers], noise.to(self.device), cfg.flow_steps).cpu()
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
            outputs.append(MicroTurnOutput(t.session_id, t.index, wave[b], s.captions.feed(caption[b])))
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
        probs = F.softmax(sub / self.cfg.temperature, dim=-1)
        return [allowed[int(torch.multinomial(p, 1, generator=g))] for p, g in zip(probs, gens, strict=True)]

    def _take_text(self, s: Session, turn: MicroTurn) -> list[int]:
        new: list[int] = []
        for text in turn.text:
            new += tokenizer.encode(text, tokenizer.USER)
        for event in turn.events:
            if event.name == "background_result":
                new += tokenizer.encode(str(event.data.get("text", "")), tokenizer.TOOL)
            else:
                new += tokenizer.encode(event.name, tokenizer.EVENT)
        room = MAX_TEXT_BACKLOG - len(s.text_backlog)
        if len(new) > room:
            log.warning("session %s: text backlog full, dropping %d tokens", turn.session_id, len(new) - room)
        s.text_backlog.extend(new[:max(0, room)])
        n = min(self.cfg.text_in, len(s.text_backlog))
        return [s.text_backlog.popleft() for _ in range(n)]

    def _video(self, turn: MicroTurn) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """This micro-turn's patches of its camera frame and their grid places (None without a camera)."""
        if turn.video is None:
            return None, None
        frame = self._fit_frame(turn.video)
        which = self.layout.video_patches(turn.index, self.cfg.patches)
        return to_patches(frame)[which], patch_grid(frame)[which]

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
        c, chunk = self.cfg, 256
        scratch = KVPool(c.n_layers, c.n_kv_heads, c.head_dim, c.n_sink, c.window, chunk, slots=1,
                         device=self.device)
        scratch.alloc()
        history = Tokens.cat(s.trace.runs)
        with torch.inference_mode():
            for start in range(0, len(history), chunk):
                part = history.rows(start, min(start + chunk, len(history))).to(self.device)
                self.net(self.net.embed(part), AttentionPlan.cached(scratch, [0], [len(part)]))
        self.pool.load(s.slot, scratch, 0)

