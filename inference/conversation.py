"""Training examples from synthetic conversations: a conversation of ``microturn data synth`` → micro-turn examples.

A conversation (see :mod:`inference.synth` for the format) holds, per micro-turn, the user's audio, camera frame,
typed text and background results, and what the model should do: speak or not, its caption text, its audio. This
module turns a window of micro-turns into :class:`~inference.train.TurnExample` s laid out exactly as the engine lays
out a live session (:class:`~inference.reference.ReferenceModel`):

- user side: the text slots take ``text_in`` ids per micro-turn from a queue that typed text (``USER`` + bytes) and
  background results (``TOOL`` + bytes) join when they arrive; the video slots carry the patches the engine would
  pick for that micro-turn index (``NO_VIDEO`` with the camera off); the audio tokens are the dMel bins of the
  micro-turn's 3,200 samples, framed per micro-turn as the engine frames them;
- model side (the targets): ``SPEAK`` or ``SILENT``; while speaking, ``text_out`` caption bytes per micro-turn from a
  queue its caption text joins (``PAD`` when empty; what is left when an utterance ends is dropped, as a live model
  could not say it either); the log-mel of its target audio (the floor when silent).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference import dmel, tokenizer
from inference.config import ModelConfig
from inference.layout import Tokens, TurnLayout
from inference.reference import MAX_TEXT_BACKLOG
from inference.train import TurnExample
from inference.video import fit_frame, patches_at
from microturn.contracts import MICRO_TURN_SAMPLES


@dataclass
class Conversation:
    """One synthetic conversation, as stored by ``microturn data synth``."""

    meta: dict[str, Any]
    user_audio: np.ndarray  # (T·3200,) float32
    model_audio: np.ndarray  # (T·3200,) float32
    video: np.ndarray  # (T, H, W, 3) uint8
    camera: np.ndarray  # (T,) bool

    @property
    def turns(self) -> int:
        return int(self.meta["turns"])

    @classmethod
    def load(cls, npz: Path) -> Conversation:
        meta = json.loads(npz.with_suffix(".json").read_text())
        with np.load(npz) as data:
            return cls(meta, data["user_audio"], data["model_audio"], data["video"], data["camera"])


def conversations(folder: Path) -> list[Path]:
    """The conversations of one split folder, in a stable order."""
    found = sorted(folder.glob("*.npz"))
    if not found:
        raise FileNotFoundError(f"{folder}: no conversations (*.npz); make some with `microturn data synth`")
    return found


def answers(meta: dict[str, Any], kinds: Collection[str] = ()) -> list[tuple[int, str]]:
    """A conversation's answers: (the micro-turn its reply starts in, the answer the reply starts with); only those
    to questions of these ``kinds`` (``visual``, ``background``, …) when some are given."""
    return [(int(q["answer_start"]) // MICRO_TURN_SAMPLES, str(q["answer"])) for q in meta.get("questions", [])
            if not kinds or q["kind"] in kinds]


def pauses(meta: dict[str, Any]) -> list[range]:
    """A conversation's pauses of the user's (mid-question, or between the sentences of a long statement): the
    micro-turns each one holds a sample of."""
    return [range(first // MICRO_TURN_SAMPLES, (last - 1) // MICRO_TURN_SAMPLES + 1)
            for first, last in meta.get("pauses", [])]


LATE_TURNS = 2
"""The most micro-turns :func:`late_replies` moves a reply by."""


def late_replies(conv: Conversation, share: float, generator: torch.Generator) -> tuple[Conversation, set[int]]:
    """A copy of ``conv`` in which each reply that can be moved is said 1 to :data:`LATE_TURNS` micro-turns late
    with probability ``share``, and the micro-turns it should have started in (whose SPEAK/SILENT decision is not
    to be scored).

    The targets start a reply exactly one micro-turn after the question, and a model that misses that micro-turn
    (sampling, or doubt) has never seen a reply start later: it stays silent, as it was taught to in the user's
    pauses. A late copy shows it a reply that starts after its own silence. A reply can be moved when the user does
    not talk over it, and when nothing arrives (user speech, typed text, a background result, the model's next
    utterance) from its start until a micro-turn after its moved end; the move keeps its audio, caption and answer
    whole."""
    meta, turns = conv.meta, conv.turns
    model_audio = conv.model_audio  # copied before the first move
    speaks, text = list(meta["model_speaks"]), list(meta["model_text"])
    questions = [dict(q) for q in meta.get("questions", [])]
    spans: list[list[int]] = []
    unscored: set[int] = set()
    for a, b in meta["model_speech"]:
        spans.append([a, b])
        if float(torch.rand((), generator=generator)) >= share:
            continue
        late = 1 + int(torch.randint(0, LATE_TURNS, (), generator=generator))
        first, last = a // MICRO_TURN_SAMPLES, (b - 1) // MICRO_TURN_SAMPLES  # the micro-turns it is said in
        free = range(first, last + late + 2)  # must stay clear, the micro-turn after the move too
        if (a % MICRO_TURN_SAMPLES or free.stop > turns
                or any(s < (free.stop * MICRO_TURN_SAMPLES) and e > a for s, e in meta["user_speech"])
                or any(s < b and e > a for s, e in meta.get("overlaps", []))
                or any(a < s < free.stop * MICRO_TURN_SAMPLES for s, _ in meta["model_speech"])
                or any(meta["user_text"][k] or meta["background"][k] for k in free)):
            continue
        shift = late * MICRO_TURN_SAMPLES
        if model_audio is conv.model_audio:
            model_audio = conv.model_audio.copy()
        model_audio[a + shift:b + shift] = conv.model_audio[a:b]
        model_audio[a:a + shift] = 0.0
        speaks[first:last + late + 1] = [False] * late + speaks[first:last + 1]
        text[first:last + late + 1] = [""] * late + text[first:last + 1]
        for q in questions:
            if q["answer_start"] == a:
                q["answer_start"] = a + shift
        spans[-1] = [a + shift, b + shift]
        unscored.update(range(first, first + late))
    meta = {**meta, "model_speaks": speaks, "model_text": text, "model_speech": spans, "questions": questions}
    return Conversation(meta, conv.user_audio, model_audio, conv.video, conv.camera), unscored


def audio_lead(cfg: ModelConfig) -> int:
    """The micro-turns before a window whose audio its first micro-turns' audio encoder hears."""
    return -(-cfg.audio_context // cfg.frames_per_turn)


def examples(conv: Conversation, cfg: ModelConfig, start: int = 0, length: int | None = None,
             unscored: Collection[int] = ()) -> list[TurnExample]:
    """Micro-turns ``[start, start + length)`` of ``conv`` as training examples (the queues run from turn 0); the
    micro-turns in ``unscored`` do not score their SPEAK/SILENT decision (see :func:`late_replies`)."""
    layout = TurnLayout.of(cfg)
    end = conv.turns if length is None else min(conv.turns, start + length)
    lead = min(start, audio_lead(cfg))
    microphone = dmel.DMelStream()  # the engine's own input features (dithered)
    heard = microphone.step(_turns(conv.user_audio[(start - lead) * MICRO_TURN_SAMPLES:end * MICRO_TURN_SAMPLES]))
    before = torch.zeros(cfg.audio_context, cfg.n_mels, dtype=torch.long)  # the silence before the call
    for bins in heard[:lead]:
        before = layout.heard_next(before, bins)
    heard = heard[lead:]  # (n, frames, n_mels)
    said = dmel.micro_turn_log_mel(_turns(conv.model_audio[start * MICRO_TURN_SAMPLES:end * MICRO_TURN_SAMPLES]),
                                   microphone.fb)
    text_in: deque[int] = deque()
    caption: deque[int] = deque()
    pausing = {k for turns in pauses(conv.meta) for k in turns}  # the micro-turns of the user's pauses
    answering: set[int] = set()  # the micro-turns whose caption bytes say an answer (a reply starts with it)
    for first, answer in answers(conv.meta):
        answering.update(range(first, first + -(-len(answer.encode()) // cfg.text_out)))
    out: list[TurnExample] = []
    for k in range(end):
        for text in conv.meta["user_text"][k]:
            text_in.extend(tokenizer.encode(text, tokenizer.USER))
        for text in conv.meta["background"][k]:
            text_in.extend(tokenizer.encode(text, tokenizer.TOOL))
        while len(text_in) > MAX_TEXT_BACKLOG:
            text_in.pop()
        slots = [text_in.popleft() for _ in range(min(cfg.text_in, len(text_in)))]
        speaks = bool(conv.meta["model_speaks"][k])
        caption.extend(conv.meta["model_text"][k].encode())
        if speaks:
            ids = [caption.popleft() for _ in range(min(cfg.text_out, len(caption)))]
            ids += [tokenizer.PAD] * (cfg.text_out - len(ids))
        else:
            caption.clear()
            ids = [tokenizer.PAD] * cfg.text_out
        if k < start:
            continue
        video = None
        if conv.camera[k]:
            frame = fit_frame(conv.video[k], cfg.video_height, cfg.video_width)
            pixels, places = patches_at(frame, layout.video_patches(k, cfg.patches).tolist())
            video = Tokens.of_patches(pixels, places, cfg.frames_per_token, cfg.n_mels)
        mel = said[k - start] if speaks else torch.full_like(said[k - start], dmel.LOG_MIN)
        out.append(TurnExample(layout.user_side(slots, video, heard[k - start], before),
                               tokenizer.SPEAK if speaks else tokenizer.SILENT, ids, mel, k in pausing,
                               speaks and k in answering, k not in unscored))
        before = layout.heard_next(before, heard[k - start])
    return out



def _turns(audio: np.ndarray) -> torch.Tensor:
    """(n·3200,) samples → (n, 3200) micro-turns."""
    return torch.from_numpy(audio.copy()).reshape(-1, MICRO_TURN_SAMPLES)
