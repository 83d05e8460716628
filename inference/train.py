"""Training: the losses of the reference model, one optimiser step, and a synthetic sanity task.

The training step runs the very modules the engine runs (:meth:`ReferenceNet.embed`,
:meth:`ReferenceNet.forward`, the depth head, the text head and the flow head), on whole sequences laid out
by :class:`~inference.layout.TurnLayout` and attending through :meth:`AttentionPlan.full`, the same
attention mask as streaming. Losses:

- text: cross-entropy of every model-side text token (``SPEAK``/``SILENT`` and the caption tokens), through
  the depth head with teacher forcing, plus the cross-entropy of the caption tokens of the micro-turns in which
  the model speaks on their own: they carry what it says, and are too few to matter in the first mean, which
  silent micro-turns (all ``PAD``) fill. In that second mean the micro-turns that say an answer (the first bytes
  of a reply to a question: a sum, a colour, a count, a background result) can count ``answer_weight`` times:
  they are what the model must get right, and a few in each reply;
- decision (when ``decision_weight`` > 0): the cross-entropy of the ``SPEAK``/``SILENT`` token alone, in which
  the micro-turns where the decision changes (the model starts, or stops) count :data:`CHANGE_WEIGHT` times. They
  are a few in a hundred, yet they are turn-taking: starting late, not at all, or not stopping. The micro-turns of
  the user's mid-question pauses can count ``pause_weight`` times too: a silence there looks like the end of a
  question, and only what was said tells them apart. The micro-turns a reply said late should have started in
  (:func:`inference.conversation.late_replies`) score no decision, in either loss: they show the model silent
  there, not that it should be;
- audio out: flow matching of the output mel of each micro-turn in which the model speaks (the flow head runs for
  no other), conditioned on the depth head's final state and the caption context;
- MoE balance: the routers' Switch balance loss (weighted by ``balance_weight``); after each step the
  routers' selection biases also move towards balance (aux-loss-free balancing);
- listening (when a :class:`~inference.listen.ListenProbe` and the batch's ``heard`` targets are given): the
  training-only probe's loss, which words of the user ended in each micro-turn, weighted by ``listen_weight``.

:func:`tone_task` is the sanity task: "say the tone you heard one micro-turn later". """

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from inference import dmel, tokenizer
from inference.card_probe import CardProbe
from inference.flow_head import caption_context
from inference.kv_cache import AttentionPlan
from inference.layout import Tokens, TurnLayout
from inference.listen import ListenProbe
from inference.model import Block, ReferenceNet
from inference.moe import Routing
from microturn.contracts import MICRO_TURN_SAMPLES, SAMPLE_RATE


@dataclass
class TurnExample:
    """One micro-turn of a training sequence: its user side, and what the model should do."""

    user: Tokens
    control: int  # SPEAK or SILENT
    caption: list[int]  # text_out ids
    mel: torch.Tensor  # (frames_per_turn, n_mels) log10 mel of the output audio (floor when silent)
    pause: bool = False  # the user pauses mid-question here: the model must not take the turn
    answer: bool = False  # its caption bytes say (part of) the answer to a question
    scored: bool = True  # its SPEAK/SILENT decision counts in the losses (see inference.conversation.late_replies)


@dataclass
class TrainBatch:
    """Packed sequences and where their targets are."""

    tokens: Tokens
    lengths: list[int]
    rows: torch.Tensor  # (M,) per micro-turn: the row (last user-side token) the model side is predicted from
    text_targets: torch.Tensor  # (M, 1 + text_out) the model side's text ids
    mel_targets: torch.Tensor  # (M, frames, n_mels) the model side's output mel
    changes: torch.Tensor  # (M,) bool: the SPEAK/SILENT decision differs from the micro-turn before
    pauses: torch.Tensor  # (M,) bool: the micro-turn is in one of the user's mid-question pauses
    answers: torch.Tensor  # (M,) bool: the micro-turn's caption says (part of) an answer
    scored: torch.Tensor  # (M,) bool: the micro-turn's SPEAK/SILENT decision counts in the losses
    turns: list[int]  # micro-turns per sequence
    heard: torch.Tensor | None = None  # (M, V) the user's words that ended in each micro-turn (inference.listen)
    cards: torch.Tensor | None = None  # (M,) the card shown in each micro-turn (inference.card_probe), -1: none known

    def flow_text(self, turns: int) -> torch.Tensor:
        """(M, turns · text_out): the caption ids the flow head sees at each micro-turn (each sequence from PAD)."""
        captions = self.text_targets[:, 1:].split(self.turns)
        return torch.cat([caption_context(c, turns) for c in captions])


def build_batch(layout: TurnLayout, sequences: list[list[TurnExample]]) -> TrainBatch:
    parts, lengths, rows, text_targets, mels, changes, pauses, answers, scored = [], [], [], [], [], [], [], [], []
    offset = 0
    for turns in sequences:
        start = offset
        parts.append(layout.silent_model_side())
        offset += layout.n_model
        previous = tokenizer.SILENT  # each sequence starts after a silent model side
        for turn in turns:
            changes.append(turn.control != previous)
            pauses.append(turn.pause)
            answers.append(turn.answer)
            scored.append(turn.scored)
            previous = turn.control
            model_side = layout.model_side(turn.control, turn.caption, dmel.quantize(turn.mel))
            rows.append(offset + len(turn.user) - 1)
            text_targets.append(torch.tensor([turn.control, *turn.caption]))
            mels.append(turn.mel)
            parts += [turn.user, model_side]
            offset += len(turn.user) + len(model_side)
        lengths.append(offset - start)
    return TrainBatch(Tokens.cat(parts), lengths, torch.tensor(rows), torch.stack(text_targets),
                      torch.stack(mels), torch.tensor(changes), torch.tensor(pauses, dtype=torch.bool),
                      torch.tensor(answers, dtype=torch.bool), torch.tensor(scored, dtype=torch.bool),
                      [len(turns) for turns in sequences])


@dataclass
class Losses:
    text: torch.Tensor
    flow: torch.Tensor
    balance: torch.Tensor
    total: torch.Tensor
    listen: torch.Tensor  # the listening probe's loss (0 without one)
    cards: torch.Tensor  # the card probe's loss (0 without one)

    def detach(self) -> Losses:
        return Losses(*(x.detach() for x in (self.text, self.flow, self.balance, self.total, self.listen,
                                             self.cards)))


CHANGE_WEIGHT = 4.0
"""How much more a micro-turn in which the SPEAK/SILENT decision changes counts in the decision loss."""


@dataclass
class Forced:
    """The trunk and depth head over a batch, teacher-forced."""

    logits: torch.Tensor  # (M, 1 + text_out, vocab) text logits
    cond: torch.Tensor  # (M, d) flow conditioning: the depth head's final state
    state: torch.Tensor  # (M, d) the trunk's state at each micro-turn's row (what the depth head starts from)
    routings: list[Routing]  # the trunk layers'


def teacher_forced(net: ReferenceNet, batch: TrainBatch) -> Forced:
    """The trunk over the batch's sequences and the depth head over its targets."""
    cfg, device = net.cfg, net.text_head.weight.device
    plan = AttentionPlan.full(batch.lengths, cfg.window, cfg.n_sink, device)
    h, routings = net(net.embed(batch.tokens.to(device)), plan)
    state = h[batch.rows.to(device)]
    logits, cond = net.teacher_forced(state, batch.text_targets.to(device))
    return Forced(logits, cond, state, routings)


def compute_losses(net: ReferenceNet, batch: TrainBatch, generator: torch.Generator,
                   balance_weight: float = 0.01, decision_weight: float = 0.0, pause_weight: float = 1.0,
                   probe: ListenProbe | None = None, listen_weight: float = 1.0, answer_weight: float = 1.0,
                   cards: CardProbe | None = None, card_weight: float = 1.0) -> tuple[Losses, torch.Tensor]:
    """The losses (the decision loss is part of ``text``; in it a micro-turn of a mid-question pause counts
    ``pause_weight`` times; in the mean over the spoken captions a micro-turn that says an answer counts
    ``answer_weight`` times), and the per-layer expert load (L, E) of this batch.
    The listening loss counts when ``probe`` is given and the batch has ``heard`` targets (the probe's presence is
    the switch; ``listen_weight`` only weighs it); so does the card probe's, with ``cards``, on the micro-turns whose
    card is known."""
    cfg, device = net.cfg, net.text_head.weight.device
    forced = teacher_forced(net, batch)
    logits, cond, routings = forced.logits, forced.cond, forced.routings
    targets = batch.text_targets.to(device)
    scored = torch.ones_like(targets, dtype=torch.bool)  # (M, 1 + text_out): all but unscored decisions
    scored[:, 0] = batch.scored.to(device)
    text = F.cross_entropy(logits[scored], targets[scored])
    speaking = targets[:, 0] == tokenizer.SPEAK
    if bool(speaking.any()):
        said = F.cross_entropy(logits[speaking, 1:].transpose(1, 2), targets[speaking, 1:], reduction="none")
        weights = 1 + (answer_weight - 1) * batch.answers.to(device)[speaking].float()  # (n,) per micro-turn
        text = text + (weights[:, None] * said).sum() / (weights.sum() * said.shape[1])
    if decision_weight > 0:
        weights = (1 + (CHANGE_WEIGHT - 1) * batch.changes.to(device).float()
                   + (pause_weight - 1) * batch.pauses.to(device).float()) * scored[:, 0].float()
        decision = F.cross_entropy(logits[:, 0], targets[:, 0], reduction="none")
        text = text + decision_weight * (weights * decision).sum() / weights.sum()
    flow = flow_loss(net, cond[speaking], batch.flow_text(cfg.flow_text_turns).to(device)[speaking],
                     batch.mel_targets.to(device)[speaking], generator)
    balance = torch.stack([r.balance_loss for r in routings]).mean()
    listen = torch.zeros((), device=device)
    if probe is not None and batch.heard is not None:
        listen = probe.loss(forced.state if probe.at == "trunk" else heard_features(net, batch), batch.heard.to(device))
    seen = torch.zeros((), device=device)
    if cards is not None and batch.cards is not None and bool((batch.cards >= 0).any()):
        known = batch.cards.to(device) >= 0
        seen = cards.loss(forced.state[known], batch.cards.to(device)[known])
    total = text + flow + balance_weight * balance + listen_weight * listen + card_weight * seen
    return Losses(text, flow, balance, total, listen, seen), torch.stack([r.load for r in routings])


def heard_features(net: ReferenceNet, batch: TrainBatch) -> torch.Tensor:
    """(M, feature_dim): the audio encoder's features of each micro-turn's last audio-in token (see
    :mod:`inference.listen`)."""
    if net.audio is None:
        raise ValueError("this model has no audio encoder to listen at")
    windows = batch.tokens.heard_windows()  # (M · audio_tokens, window, n_mels), each micro-turn's in order
    last = windows[net.cfg.audio_tokens - 1::net.cfg.audio_tokens]
    return net.audio.features(last.to(net.text_head.weight.device))


def flow_loss(net: ReferenceNet, cond: torch.Tensor, text: torch.Tensor, mel: torch.Tensor,
              generator: torch.Generator) -> torch.Tensor:
    """Flow matching of the micro-turns in which the model speaks (the only ones the flow head runs for): their
    conditioning (n, d), caption context (n, ids) and target mel (n, frames, n_mels). Zero when n is 0."""
    n = len(cond)
    noise = torch.randn(n, net.cfg.frames_per_turn * net.cfg.n_mels, generator=generator).to(cond.device)
    t = torch.rand(n, generator=generator).to(cond.device)
    if n == 0:
        return cond.sum() * 0.0
    return net.flow.loss(cond, text, mel, noise, t)


BIAS_RATE = 1e-3
"""How far the routers' selection biases move towards balance after each step."""


def train_step(net: ReferenceNet, optimizer: torch.optim.Optimizer, batch: TrainBatch,
               generator: torch.Generator, bias_rate: float = BIAS_RATE, decision_weight: float = 0.0,
               pause_weight: float = 1.0, probe: ListenProbe | None = None, listen_weight: float = 1.0,
               answer_weight: float = 1.0, cards: CardProbe | None = None, card_weight: float = 1.0) -> Losses:
    """One optimiser step (of ``net``, and of ``probe`` and ``cards`` when given: their parameters must be in
    ``optimizer``); returns the (detached) losses."""
    net.train()
    losses, load = compute_losses(net, batch, generator, decision_weight=decision_weight, pause_weight=pause_weight,
                                  probe=probe, listen_weight=listen_weight, answer_weight=answer_weight, cards=cards,
                                  card_weight=card_weight)
    optimizer.zero_grad(set_to_none=True)
    losses.total.backward()
    probes = [p for head in (probe, cards) if head is not None for p in head.parameters()]
    torch.nn.utils.clip_grad_norm_([*net.parameters(), *probes], 1.0)
    optimizer.step()
    for block, layer_load in zip(net.blocks, load, strict=True):
        assert isinstance(block, Block)
        block.moe.router.update_bias(layer_load, bias_rate)
    return losses.detach()


TONES = (("A", 300.0), ("B", 550.0), ("C", 900.0), ("D", 1500.0))
"""The tone task's tones: caption letter and frequency."""


def tone_task(layout: TurnLayout, batch: int, turns: int, generator: torch.Generator) -> TrainBatch:
    """Sequences of micro-turns that hold one of :data:`TONES` or silence; at micro-turn ``k`` the model must
    speak the tone it heard at ``k - 1`` (``SPEAK``, its letter, its mel), and stay silent after silence."""
    t = torch.arange(MICRO_TURN_SAMPLES) / SAMPLE_RATE
    waves = torch.stack([torch.zeros(MICRO_TURN_SAMPLES)] +
                        [0.3 * torch.sin(2 * torch.pi * f * t) for _, f in TONES])  # (1 + tones, 3200)
    mels = dmel.log_mel(waves)  # (1 + tones, 8, 80)
    bins = dmel.quantize(mels)
    sequences = []
    for _ in range(batch):
        heard = torch.randint(0, len(TONES) + 1, (turns,), generator=generator)  # 0: silence
        examples = []
        before = torch.zeros(layout.audio_context, layout.n_mels, dtype=torch.long)
        for k in range(turns):
            prev = int(heard[k - 1]) if k else 0
            user = layout.user_side([], None, bins[int(heard[k])], before)
            before = layout.heard_next(before, bins[int(heard[k])])
            if prev:
                caption = tokenizer.encode(TONES[prev - 1][0])[: layout.text_out]
                caption += [tokenizer.PAD] * (layout.text_out - len(caption))
                examples.append(TurnExample(user, tokenizer.SPEAK, caption, mels[prev]))
            else:
                examples.append(TurnExample(user, tokenizer.SILENT, [tokenizer.PAD] * layout.text_out,
                                            torch.full_like(mels[0], dmel.LOG_MIN)))
        sequences.append(examples)
    return build_batch(layout, sequences)
