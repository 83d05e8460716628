"""``microturn train``: train the reference model on synthetic conversations, with progress, validation,
checkpoints, exact resume, and a loss curve.

The run folder (``--out``) holds:

- ``state.pt`` — everything needed to go on exactly where the run stopped: weights (with the routers' balance
  biases), optimiser state, step, the data and noise generators' states, the loss history;
- ``checkpoint/`` — the latest weights as a servable checkpoint (``microturn serve --model reference --checkpoint``);
- ``loss.png`` — training and validation loss per step; ``log.jsonl`` — one line per logged step.

Each step samples ``batch`` windows of ``window`` micro-turns (random conversation, random start) from the train
split with the run's own generator (with ``answer_windows`` > 0, that share of the windows is placed around a
micro-turn that starts an answer, drawn from all of the split's answers: the question, and the answer in the window's
second half; with ``pause_windows`` > 0, that share around the end of one of the user's pauses: what was said before
it, and the user going on in the window's second half; with ``late_replies`` > 0, that share of the replies in
them is said one or two micro-turns late, :func:`inference.conversation.late_replies`; with ``audio_shift`` or
``low_pass`` > 0, that share of the windows hears its user audio moved against the micro-turn grid, or low-passed,
as the live path moves and thins it, :mod:`inference.augment`), turns them into examples
laid out as the engine lays out a live session (:mod:`inference.conversation`) and takes one optimiser step
(:func:`inference.train.train_step`: the model code path the engine runs). Validation: the mean loss over fixed
windows of the validation split, as they are. Starting a run in a folder that has ``state.pt`` resumes it: the same
seed, data and settings give the same weights as a run that was never interrupted.

With ``listen_weight`` > 0 the run also trains the listening probe (:mod:`inference.listen`) on the trunk's
states (or, with ``listen_at = "encoder"``, on the audio encoder's features), with targets that hold each word
for ``listen_span`` micro-turns; its vocabulary is the train split's words, kept in the run folder as
``listen_vocab.json``, and its weights are kept in ``state.pt`` only (the served checkpoint is the model alone).
The training loss it logs and plots then includes the probe's weighted loss (logged on its own too); validation
leaves it out, so validation losses compare across runs with and without the probe. ``card_weight`` > 0 does the
same with the card probe (:mod:`inference.card_probe`) on the trunk's state: it names the card shown in each
micro-turn that a visual question asks about.

A run may start from a trained checkpoint (``init``) and train only some of it (``parts``): ``flow`` trains the flow
head (the audio out) on the frozen rest. Since nothing before the flow head changes, what conditions it is computed
once: every train conversation (and ``val_windows`` validation ones) goes through the trunk and the depth head,
teacher-forced, and each micro-turn in which the model speaks gives a :class:`FlowPairs` row (conditioning, caption
context, target mel), kept in the run folder as ``flow_pairs.pt``. A step then samples ``batch`` of those rows, so
the head sees thousands of spoken micro-turns a second instead of the trunk's hundred or so. ``stem`` trains the
patch stem alone to name cards from a frame's thumbnail (:mod:`inference.card_probe`, on cards drawn fresh each
step; ``batch`` is cards per step), so that a model given a thumbnail (``video_thumbnail``) starts out seeing
shapes and digits; the probe is kept in ``state.pt`` only, like the listening probe.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference import tokenizer
from inference.augment import low_passed, shifted
from inference.card_probe import CardProbe, draw_cards, shown
from inference.checkpoint import load_checkpoint, load_config, save_checkpoint
from inference.config import preset as get_preset
from inference.conversation import Conversation, answers, audio_lead, conversations, examples, late_replies, pauses
from inference.layout import TurnLayout
from inference.listen import ListenProbe, heard, vocabulary_of
from inference.model import ReferenceNet
from inference.train import (
    Losses,
    TrainBatch,
    build_batch,
    compute_losses,
    flow_loss,
    heard_features,
    teacher_forced,
    train_step,
)

PARTS = ("all", "flow", "encoder", "stem")
"""What a run trains: the whole model, only the flow head, only the audio encoder (to recognise words), or only the
patch stem (to name cards)."""

VALIDATION_CARDS = 512
"""Cards a ``stem`` run validates on (the same ones every time)."""


@dataclass
class TrainSettings:
    data: Path
    out: Path
    preset: str = "tiny"
    steps: int = 2000
    batch: int = 4  # windows per step
    window: int = 40  # micro-turns per window (8 s)
    lr: float = 1e-3
    warmup: int = 100  # steps of linear warm-up, then cosine decay to lr / 10
    weight_decay: float = 0.01
    val_every: int = 100
    val_windows: int = 8
    save_every: int = 200
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # torch CPU threads; 0: torch's default
    init: Path | None = None  # start from this checkpoint's weights (and config) instead of a random preset
    parts: str = "all"  # all | flow: train only the flow head, the rest frozen (batch: spoken micro-turns)
    decision_weight: float = 0.0  # weight of the SPEAK/SILENT decision loss (see inference.train); 0: none
    pause_weight: float = 1.0  # how many times a micro-turn of a mid-question pause counts in the decision loss
    answer_weight: float = 1.0  # how many times a micro-turn that says an answer counts in the spoken-caption loss
    answer_windows: float = 0.0  # the share of windows placed around an answer (0: all at random places)
    answer_kinds: tuple[str, ...] = ()  # place them around the answers to these kinds of question only (empty: all)
    pause_windows: float = 0.0  # the share of windows placed around the end of a user's pause (0: none)
    late_replies: float = 0.0  # the share of replies said 1-2 micro-turns late (inference.conversation.late_replies)
    audio_shift: float = 0.0  # the share of windows whose user audio is shifted against the grid (inference.augment)
    low_pass: float = 0.0  # the share of windows whose user audio is low-passed at 6-8 kHz (inference.augment)
    flow_text_turns: int | None = None  # give an ``init`` checkpoint's flow head this caption context (new weights)
    audio_context: int | None = None  # give the model an audio encoder hearing this many frames back (new weights)
    video_thumbnail: bool | None = None  # the first video slot: the frame's thumbnail (inference.video); None: as cfg
    card_weight: float = 0.0  # weight of the card probe on the trunk's state (see inference.card_probe); 0: none
    listen_weight: float = 0.0  # weight of the listening probe's loss (see inference.listen); 0: no probe
    listen_at: str = "trunk"  # where the probe listens: trunk | encoder (the audio encoder's features)
    listen_span: int = 1  # micro-turns a word stays in the probe's targets from the one it ends in


@dataclass
class FlowPairs:
    """What the flow head learns from on a frozen trunk, one row per micro-turn in which the model speaks."""

    cond: torch.Tensor  # (n, d_model) the depth head's final state
    text: torch.Tensor  # (n, flow_text_turns · text_out) caption context
    mel: torch.Tensor  # (n, frames, n_mels) target log-mel

    def take(self, index: torch.Tensor) -> FlowPairs:
        return FlowPairs(self.cond[index], self.text[index], self.mel[index])


def flow_pairs(net: ReferenceNet, files: list[Path], label: str) -> FlowPairs:
    """The :class:`FlowPairs` of whole conversations, teacher-forced through ``net`` (which does not change)."""
    cfg = net.cfg
    layout = TurnLayout.of(cfg)
    parts: list[FlowPairs] = []
    net.eval()
    for i, path in enumerate(files):
        batch = build_batch(layout, [examples(Conversation.load(path), cfg)])
        with torch.no_grad():
            cond = teacher_forced(net, batch).cond
        speaking = batch.text_targets[:, 0] == tokenizer.SPEAK
        parts.append(FlowPairs(cond.cpu()[speaking], batch.flow_text(cfg.flow_text_turns)[speaking],
                               batch.mel_targets[speaking]))
        print(f"\rtrain: the flow head's inputs, {label} conversation {i + 1}/{len(files)}", end="",
              file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return FlowPairs(*(torch.cat(x) for x in zip(*((p.cond, p.text, p.mel) for p in parts), strict=True)))


@dataclass
class History:
    train: list[tuple[int, float, float, float]] = field(default_factory=list)  # step, total, text, flow
    val: list[tuple[int, float]] = field(default_factory=list)  # step, total


def _split(data: Path, *names: str) -> list[Path]:
    for name in names:
        if (data / name).is_dir():
            return conversations(data / name)
    raise FileNotFoundError(f"{data}: no {' or '.join(names)} folder; make a data set with `microturn data synth`")


def _lr(s: TrainSettings, step: int) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@dataclass(frozen=True)
class Window:
    """Micro-turns ``[start, start + length)`` of ``conv`` to train or validate on, and those among them whose
    SPEAK/SILENT decision is not scored (see :func:`inference.conversation.late_replies`)."""

    conv: Conversation
    start: int
    length: int
    unscored: frozenset[int] = frozenset()

    def said_late(self, share: float, generator: torch.Generator) -> Window:
        """This window with that share of the conversation's replies said late."""
        conv, unscored = late_replies(self.conv, share, generator)
        return Window(conv, self.start, self.length, frozenset(unscored))

    def heard_live(self, shift: float, low_pass: float, lead: int, generator: torch.Generator) -> Window:
        """This window with its user audio shifted against the micro-turn grid with probability ``shift``, and
        low-passed with probability ``low_pass`` (:mod:`inference.augment`); ``lead``: the micro-turns before the
        window that its audio encoder hears. Draws nothing for a probability of 0."""
        conv = self.conv
        if shift and float(torch.rand((), generator=generator)) < shift:
            conv = shifted(conv, self.start, self.length, lead, generator)
        if low_pass and float(torch.rand((), generator=generator)) < low_pass:
            conv = low_passed(conv, self.start, self.length, lead, generator)
        return dataclasses.replace(self, conv=conv)


def _window(conv: Conversation, window: int, generator: torch.Generator) -> Window:
    length = min(window, conv.turns)
    return Window(conv, int(torch.randint(0, conv.turns - length + 1, (), generator=generator)), length)


def _window_around(conv: Conversation, turn: int, window: int, generator: torch.Generator) -> Window:
    """A window with micro-turn ``turn`` and the next one in its second half, so that what led to them (the
    question) comes before; clipped to the conversation."""
    length = min(window, conv.turns)
    last = conv.turns - length
    low = min(max(0, turn + 2 - length), last)
    high = min(max(low, turn - length // 2), last)
    return Window(conv, low + int(torch.randint(0, high - low + 1, (), generator=generator)), length)


class Trainer:
    """One training run (see the module docstring)."""

    def __init__(self, s: TrainSettings) -> None:
        self.s = s
        if s.threads:
            torch.set_num_threads(s.threads)
        if s.parts not in PARTS:
            raise ValueError(f"--parts must be one of {', '.join(PARTS)}, not {s.parts!r}")
        if s.listen_weight and s.parts == "flow":
            raise ValueError("--listen-weight trains the trunk; it cannot go with --parts flow")
        if s.parts == "encoder" and not (s.listen_weight and s.listen_at == "encoder"):
            raise ValueError("--parts encoder trains the audio encoder on the listening probe alone: give "
                             "--listen-weight and --listen-at encoder")
        if s.listen_weight and s.parts == "stem":
            raise ValueError("--listen-weight trains the trunk; it cannot go with --parts stem")
        if s.card_weight < 0 or (s.card_weight and s.parts != "all"):
            raise ValueError(f"--card-weight weighs a probe on the trunk's state: give a weight of 0 or more, with "
                             f"--parts all, not {s.card_weight} with --parts {s.parts}")
        if s.pause_weight <= 0 or (s.pause_weight != 1 and s.decision_weight <= 0):
            raise ValueError(f"--pause-weight weighs micro-turns of the decision loss: give a weight above 0 and a "
                             f"--decision-weight, not {s.pause_weight} with {s.decision_weight}")
        if s.answer_weight <= 0:
            raise ValueError(f"--answer-weight weighs micro-turns of the caption loss: give a weight above 0, "
                             f"not {s.answer_weight}")
        if not 0.0 <= s.answer_windows <= 1.0:
            raise ValueError(f"--answer-windows is the share of windows placed around an answer, from 0 to 1, "
                             f"not {s.answer_windows}")
        if not 0.0 <= s.pause_windows <= 1.0 - s.answer_windows:
            raise ValueError(f"--pause-windows is the share of windows placed around a pause, from 0 to 1 less the "
                             f"--answer-windows, not {s.pause_windows} with {s.answer_windows}")
        if not 0.0 <= s.late_replies <= 1.0:
            raise ValueError(f"--late-replies is the share of replies said late, from 0 to 1, not {s.late_replies}")
        for name in ("audio_shift", "low_pass"):
            if not 0.0 <= getattr(s, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} is a share of the training windows, from 0 to 1, "
                                 f"not {getattr(s, name)}")
        if s.listen_span < 1:
            raise ValueError(f"--listen-span is a number of micro-turns, at least 1, not {s.listen_span}")
        if s.listen_span > 1 and s.listen_at == "encoder":
            raise ValueError("--listen-span asks for the words of several micro-turns together, which the trunk "
                             "gathers and the audio encoder (one token's window) does not hear: use --listen-at trunk")
        self.cfg = load_config(s.init) if s.init is not None else get_preset(s.preset)
        if s.flow_text_turns is not None:
            self.cfg = dataclasses.replace(self.cfg, flow_text_turns=s.flow_text_turns)
        if s.audio_context is not None:
            self.cfg = dataclasses.replace(self.cfg, audio_context=s.audio_context)
        if s.video_thumbnail is not None:
            self.cfg = dataclasses.replace(self.cfg, video_thumbnail=s.video_thumbnail)
        if s.parts == "stem" and not self.cfg.video_thumbnail:
            raise ValueError("--parts stem trains the stem to name cards from a frame's thumbnail: give "
                             "--video-thumbnail (or --init a checkpoint that has one)")
        self.layout = TurnLayout.of(self.cfg)
        self.train_files = _split(s.data, "train")
        self.val_files = _split(s.data, "validation", "val")
        if s.answer_kinds and not s.answer_windows:
            raise ValueError("--answer-kinds picks which answers --answer-windows are placed around: give both")
        metas = ([(path, json.loads(path.with_suffix(".json").read_text())) for path in self.train_files]
                 if s.answer_windows or s.pause_windows else [])
        # the anchors of the placed windows: (conversation, an answer's first micro-turn or a pause's last)
        self.answers = ([(path, turn) for path, meta in metas for turn, _ in answers(meta, s.answer_kinds)]
                        if s.answer_windows else [])
        if s.answer_windows and not self.answers:
            which = f" to {', '.join(s.answer_kinds)} questions" if s.answer_kinds else ""
            raise ValueError(f"{s.data}: --answer-windows needs answers, and the train split has none{which}")
        self.pauses = [(path, turns[-1]) for path, meta in metas for turns in pauses(meta)] if s.pause_windows else []
        if s.pause_windows and not self.pauses:
            raise ValueError(f"{s.data}: --pause-windows needs pauses, and the train split has none")
        torch.manual_seed(s.seed)
        self.net = ReferenceNet(self.cfg).to(s.device)
        if s.init is not None:
            self._start_from(load_checkpoint(s.init))
        if s.parts == "flow":
            self.net.requires_grad_(False)
            self.net.flow.requires_grad_(True)
        if s.parts == "encoder" and self.net.audio is not None:
            self.net.requires_grad_(False)
            self.net.audio.requires_grad_(True)
        if s.parts == "stem":
            self.net.requires_grad_(False)
            self.net.stem.requires_grad_(True)
        self.probe = self._probe() if s.listen_weight else None
        self.stem_cards = CardProbe(self.cfg.d_model).to(s.device) if s.parts == "stem" else None
        self.trunk_cards = CardProbe(self.cfg.d_model).to(s.device) if s.card_weight else None
        trained = [p for p in self.net.parameters() if p.requires_grad]
        for probe in (self.probe, self.stem_cards, self.trunk_cards):
            if probe is not None:
                trained += list(probe.parameters())
        self.optimizer = torch.optim.AdamW(trained, lr=s.lr, weight_decay=s.weight_decay)
        self.data_gen = torch.Generator().manual_seed(s.seed)
        self.noise_gen = torch.Generator().manual_seed(s.seed + 1)
        self.step = 0
        self.history = History()
        self._cache: dict[Path, Conversation] = {}
        self.pairs: dict[str, FlowPairs] = self._flow_pairs() if s.parts == "flow" else {}
        if (s.out / "state.pt").exists():
            self._load()

    def _start_from(self, init: ReferenceNet) -> None:
        """Copy ``init``'s weights; only the flow head's caption-context weights and the audio encoder's may be
        missing from them (new with ``flow_text_turns`` or ``audio_context``), or be left out (a context of 0)."""
        own, given = self.net.state_dict(), init.state_dict()
        new = {k for k in own if k not in given}
        dropped = {k for k in given if k not in own}
        if any(not k.startswith(("flow.text", "audio.")) for k in new | dropped):
            raise ValueError(f"{self.s.init}: its weights do not fit this model ({sorted(new | dropped)[:4]} …)")
        self.net.load_state_dict({k: v for k, v in given.items() if k in own}, strict=False)

    def _flow_pairs(self) -> dict[str, FlowPairs]:
        """The train and validation :class:`FlowPairs`, made once per run folder."""
        path = self.s.out / "flow_pairs.pt"
        if path.exists():
            saved = torch.load(path, weights_only=False)
            return {name: FlowPairs(**fields) for name, fields in saved.items()}
        pairs = {"train": flow_pairs(self.net, self.train_files, "train"),
                 "validation": flow_pairs(self.net, self.val_files[:self.s.val_windows], "validation")}
        self.s.out.mkdir(parents=True, exist_ok=True)
        torch.save({name: asdict(p) for name, p in pairs.items()}, path)
        return pairs

    def _probe(self) -> ListenProbe:
        """The listening probe, at the trunk's state or at the audio encoder's features."""
        if self.s.listen_at == "encoder":
            if self.net.audio is None:
                raise ValueError("--listen-at encoder needs an audio encoder (--audio-context)")
            return ListenProbe(self.net.audio.feature_dim, self._listen_vocab(), "encoder").to(self.s.device)
        return ListenProbe(self.cfg.d_model, self._listen_vocab(), self.s.listen_at).to(self.s.device)

    def _listen_vocab(self) -> list[str]:
        """The listening probe's vocabulary: the run folder's (saved with the first state), or the train split's."""
        path = self.s.out / "listen_vocab.json"
        if path.exists():
            return list(json.loads(path.read_text()))
        return vocabulary_of(self.train_files)

    def _conversation(self, path: Path) -> Conversation:
        if path not in self._cache:
            if len(self._cache) > 256:
                self._cache.pop(next(iter(self._cache)))
            self._cache[path] = Conversation.load(path)
        return self._cache[path]

    def _batch(self) -> TrainBatch:
        windows = []
        for _ in range(self.s.batch):
            share = float(torch.rand((), generator=self.data_gen)) if self.answers or self.pauses else 1.0
            anchors = (self.answers if share < self.s.answer_windows
                       else self.pauses if share < self.s.answer_windows + self.s.pause_windows else [])
            if anchors:
                path, turn = anchors[int(torch.randint(0, len(anchors), (), generator=self.data_gen))]
                windows.append(_window_around(self._conversation(path), turn, self.s.window, self.data_gen))
                continue
            path = self.train_files[int(torch.randint(0, len(self.train_files), (), generator=self.data_gen))]
            windows.append(_window(self._conversation(path), self.s.window, self.data_gen))
        if self.s.late_replies:
            windows = [w.said_late(self.s.late_replies, self.data_gen) for w in windows]
        if self.s.audio_shift or self.s.low_pass:
            lead = audio_lead(self.cfg)
            windows = [w.heard_live(self.s.audio_shift, self.s.low_pass, lead, self.data_gen) for w in windows]
        return self._windows(windows)

    def _windows(self, windows: list[Window]) -> TrainBatch:
        """A batch of ``windows``; with the listening or the card probe, their targets too."""
        sequences = [examples(w.conv, self.cfg, w.start, w.length, w.unscored) for w in windows]
        batch = build_batch(self.layout, sequences)
        if self.trunk_cards is not None:
            batch = dataclasses.replace(batch, cards=torch.cat([
                shown(w.conv.meta, w.conv.camera, w.start, len(seq))
                for w, seq in zip(windows, sequences, strict=True)]))
        if self.probe is None:
            return batch
        words = [heard(w.conv.meta, self.probe.vocab, w.start, len(seq), self.s.listen_span)
                 for w, seq in zip(windows, sequences, strict=True)]
        return dataclasses.replace(batch, heard=torch.cat(words))

    def _flow_loss(self, rows: FlowPairs, generator: torch.Generator) -> torch.Tensor:
        device = self.s.device
        return flow_loss(self.net, rows.cond.to(device), rows.text.to(device), rows.mel.to(device), generator)

    def _flow_step(self) -> tuple[Losses, int]:
        """One optimiser step of the flow head on ``batch`` random :class:`FlowPairs` rows."""
        n = len(self.pairs["train"].cond)
        rows = self.pairs["train"].take(torch.randint(0, n, (self.s.batch,), generator=self.data_gen))
        self.net.flow.train()
        loss = self._flow_loss(rows, self.noise_gen)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.flow.parameters(), 1.0)
        self.optimizer.step()
        zero = torch.zeros(())
        return Losses(zero, loss.detach(), zero, loss.detach(), zero, zero), self.s.batch

    def _encoder_step(self) -> tuple[Losses, int]:
        """One optimiser step of the audio encoder and the probe listening at it, on ``batch`` windows; the trunk
        and the heads do not run."""
        assert self.probe is not None and self.net.audio is not None
        batch = self._batch()
        self.net.audio.train()
        loss = self._encoder_loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*self.net.audio.parameters(), *self.probe.parameters()], 1.0)
        self.optimizer.step()
        zero = torch.zeros(())
        return Losses(zero, zero, zero, loss.detach(), loss.detach(), zero), len(batch.rows)

    def _encoder_loss(self, batch: TrainBatch) -> torch.Tensor:
        assert self.probe is not None and batch.heard is not None
        return self.probe.loss(heard_features(self.net, batch), batch.heard.to(self.s.device))

    def _cards(self, rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` cards drawn from ``rng``: the stem's tokens for their thumbnails (n, d_model) and their names (n,)."""
        pixels, places, labels = draw_cards(rng, n, self.cfg)
        return self.net.stem(pixels.to(self.s.device), places.to(self.s.device)), labels.to(self.s.device)

    def _stem_step(self) -> tuple[Losses, int]:
        """One optimiser step of the patch stem and the card probe, on ``batch`` cards drawn for this step (from
        the seed and the step, so a resumed run draws the same ones); the trunk and the heads do not run."""
        assert self.stem_cards is not None
        self.net.stem.train()
        loss = self.stem_cards.loss(*self._cards(np.random.default_rng([self.s.seed, self.step]), self.s.batch))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*self.net.stem.parameters(), *self.stem_cards.parameters()], 1.0)
        self.optimizer.step()
        zero = torch.zeros(())
        return Losses(zero, zero, zero, loss.detach(), zero, zero), self.s.batch

    def validate(self) -> tuple[float, float]:
        """Mean total loss over fixed windows of the validation split (the same windows every time; the model's
        own losses, without the listening probe's), and the probe's mean loss on them (0 without one); for a flow
        run, the flow loss of its validation pairs (with the same noise every time); for an encoder run, the
        probe's loss, twice; for a stem run, the card probe's loss on :data:`VALIDATION_CARDS` fixed cards and the
        share of them it names right."""
        gen = torch.Generator().manual_seed(12345)
        self.net.eval()
        if self.stem_cards is not None:
            with torch.no_grad():
                features, labels = self._cards(np.random.default_rng([12345, self.s.seed]), VALIDATION_CARDS)
                return float(self.stem_cards.loss(features, labels)), self.stem_cards.accuracy(features, labels)
        if self.pairs:
            with torch.no_grad():
                return float(self._flow_loss(self.pairs["validation"], gen)), 0.0
        totals, listening = [], []
        with torch.no_grad():
            for i in range(self.s.val_windows):
                conv = self._conversation(self.val_files[i % len(self.val_files)])
                batch = self._windows([_window(conv, self.s.window, gen)])
                if self.s.parts == "encoder":
                    heard_loss = float(self._encoder_loss(batch))
                    totals.append(heard_loss)
                    listening.append(heard_loss)
                    continue
                losses, _ = compute_losses(self.net, batch, gen, probe=self.probe, listen_weight=0.0)
                totals.append(float(losses.total))
                listening.append(float(losses.listen))
        return sum(totals) / len(totals), sum(listening) / len(listening)

    def run(self) -> dict[str, Any]:
        s = self.s
        s.out.mkdir(parents=True, exist_ok=True)
        began, first = time.perf_counter(), self.step
        turns_seen = 0  # micro-turns trained on; cards for a stem run
        unit, rate_key = ("cards", "cards_per_s") if s.parts == "stem" else ("micro-turns", "micro_turns_per_s")
        if self.step:
            print(f"train: resuming {s.out} at step {self.step}", file=sys.stderr)
        while self.step < s.steps:
            for group in self.optimizer.param_groups:
                group["lr"] = _lr(s, self.step)
            if s.parts == "flow":
                losses, turns = self._flow_step()
            elif s.parts == "encoder":
                losses, turns = self._encoder_step()
            elif s.parts == "stem":
                losses, turns = self._stem_step()
            else:
                batch = self._batch()
                losses = train_step(self.net, self.optimizer, batch, self.noise_gen, decision_weight=s.decision_weight,
                                    pause_weight=s.pause_weight, probe=self.probe, listen_weight=s.listen_weight,
                                    answer_weight=s.answer_weight, cards=self.trunk_cards, card_weight=s.card_weight)
                turns = len(batch.rows)
            self.step += 1
            turns_seen += turns
            self.history.train.append((self.step, float(losses.total), float(losses.text), float(losses.flow)))
            rate = turns_seen / max(1e-9, time.perf_counter() - began)
            listening = f", listen {float(losses.listen):.3f}" if self.probe is not None else ""
            if self.trunk_cards is not None:
                listening += f", cards {float(losses.cards):.3f}"
            print(f"\rtrain: step {self.step}/{s.steps}  loss {float(losses.total):.3f} "
                  f"(text {float(losses.text):.3f}, flow {float(losses.flow):.3f}{listening})  "
                  f"{rate:.0f} {unit}/s", end="", file=sys.stderr, flush=True)
            if self.step % s.val_every == 0 or self.step == s.steps:
                val, val_listen = self.validate()
                self.history.val.append((self.step, val))
                listen_note = f" (listening probe {val_listen:.3f})" if self.probe is not None else ""
                if self.stem_cards is not None:
                    listen_note = f" ({val_listen:.1%} of the cards named right)"
                print(f"\ntrain: step {self.step}: validation loss {val:.3f}{listen_note}", file=sys.stderr)
            if self.step % s.save_every == 0 or self.step == s.steps:
                self.save()
            with (s.out / "log.jsonl").open("a") as f:
                f.write(json.dumps({"step": self.step, "loss": float(losses.total), "text": float(losses.text),
                                    "flow": float(losses.flow), "listen": float(losses.listen),
                                    "cards": float(losses.cards),
                                    "lr": _lr(s, self.step - 1)}) + "\n")
        print(file=sys.stderr)
        elapsed = time.perf_counter() - began
        return {"steps": self.step, "steps_this_run": self.step - first, "seconds": round(elapsed, 1),
                rate_key: round(turns_seen / max(1e-9, elapsed), 1),
                "final_loss": self.history.train[-1][1] if self.history.train else None,
                "validation_loss": self.history.val[-1][1] if self.history.val else None,
                "checkpoint": str(s.out / "checkpoint")}

    def save(self) -> None:
        s = self.s
        state = {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                 "data_gen": self.data_gen.get_state(), "noise_gen": self.noise_gen.get_state(),
                 "history": asdict(self.history), "settings": {k: str(v) for k, v in asdict(s).items()},
                 "listen": self.probe.state_dict() if self.probe is not None else None,
                 "stem_cards": self.stem_cards.state_dict() if self.stem_cards is not None else None,
                 "trunk_cards": self.trunk_cards.state_dict() if self.trunk_cards is not None else None}
        if self.probe is not None:
            (s.out / "listen_vocab.json").write_text(json.dumps(self.probe.vocab))
        tmp = s.out / "state.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(s.out / "state.pt")  # a run killed mid-save resumes from the previous state
        save_checkpoint(self.net, s.out / "checkpoint")
        plot_losses(self.history, s.out / "loss.png")

    def _load(self) -> None:
        saved_model = self.s.out / "checkpoint"
        if (saved_model / "config.json").exists() and load_config(saved_model) != self.cfg:
            raise ValueError(f"{self.s.out}: this run trains another model (another --preset, --init, --audio-context, "
                             "--flow-text-turns or --video-thumbnail); resume it the way it was started")
        state = torch.load(self.s.out / "state.pt", map_location=self.s.device, weights_only=False)
        self.net.load_state_dict(state["net"])
        saved = state.get("listen")
        if (saved is None) != (self.probe is None):
            started = "without" if saved is None else "with"
            raise ValueError(f"{self.s.out}: this run was started {started} --listen-weight; resume it the same way")
        if self.probe is not None:
            if state["settings"].get("listen_at", "trunk") != self.s.listen_at:
                raise ValueError(f"{self.s.out}: this run's probe listens at the "
                                 f"{state['settings'].get('listen_at', 'trunk')}; resume it with that --listen-at")
            span = int(state["settings"].get("listen_span", 1))
            if span != self.s.listen_span:
                raise ValueError(f"{self.s.out}: this run's probe hears each word for {span} micro-turns; resume "
                                 "it with that --listen-span")
            self.probe.load_state_dict(saved)
        for name, probe, flag in (("stem_cards", self.stem_cards, "--parts"),
                                  ("trunk_cards", self.trunk_cards, "--card-weight")):
            saved_probe = state.get(name)
            if (saved_probe is None) != (probe is None):
                raise ValueError(f"{self.s.out}: this run was started with another {flag}; resume it the same way")
            if probe is not None:
                probe.load_state_dict(saved_probe)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.data_gen.set_state(state["data_gen"])
        self.noise_gen.set_state(state["noise_gen"])
        h = state["history"]
        self.history = History([(int(a), float(b), float(c), float(d)) for a, b, c, d in h["train"]],
                               [(int(a), float(b)) for a, b in h["val"]])


def plot_losses(history: History, path: Path) -> None:
    """Training (per step) and validation loss, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("train: matplotlib is not installed (pip install 'microturn[train]'); no loss.png", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if history.train:
        steps, total, text, flow = zip(*history.train, strict=True)
        ax.plot(steps, total, lw=0.8, label="train total")
        ax.plot(steps, text, lw=0.6, alpha=0.7, label="train text")
        ax.plot(steps, flow, lw=0.6, alpha=0.7, label="train flow")
    if history.val:
        vsteps, vloss = zip(*history.val, strict=True)
        ax.plot(vsteps, vloss, "o-", label="validation total")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
