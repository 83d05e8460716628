"""A few hundred training steps on the tone task ("say the tone you heard one micro-turn later") drive the
text and flow losses clearly down, through the same modules the engine runs, and the flow head's samples then
match the tone it should say."""

from __future__ import annotations

import pytest
import torch

from inference import tokenizer
from inference.config import preset
from inference.flow_head import caption_context
from inference.kv_cache import AttentionPlan
from inference.layout import TurnLayout
from inference.model import ReferenceNet
from inference.train import TrainBatch, compute_losses, teacher_forced, tone_task, train_step
from tests._reference_helpers import narrow_config


@pytest.mark.usefixtures("one_thread")
def test_tone_task_losses_go_down() -> None:
    torch.manual_seed(0)
    cfg = narrow_config(96, 2, 128, 2)
    net = ReferenceNet(cfg)
    layout = TurnLayout.of(cfg)
    gen = torch.Generator().manual_seed(0)
    held_out = tone_task(layout, batch=8, turns=6, generator=torch.Generator().manual_seed(123))

    def evaluate() -> tuple[float, float]:
        net.eval()
        with torch.no_grad():
            losses, _ = compute_losses(net, held_out, torch.Generator().manual_seed(1))
        return float(losses.text), float(losses.flow)

    text0, flow0 = evaluate()
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(200):
        train_step(net, optimizer, tone_task(layout, batch=8, turns=5, generator=gen), gen)
    text1, flow1 = evaluate()
    assert text1 < 0.2 * text0, (text0, text1)
    assert flow1 < 0.6 * flow0, (flow0, flow1)
    assert any(float(b.moe.router.balance_bias.abs().sum()) > 0 for b in net.blocks)

    sampled, target = _sampled_mel(net, held_out)
    error = float(((sampled - target) ** 2).mean())
    spread = float(((target - target.mean(0)) ** 2).mean())  # the error of always saying the average tone
    assert error < 0.25 * spread, (error, spread)


def _sampled_mel(net: ReferenceNet, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The flow head's samples (as the engine draws them) and the targets, for the micro-turns that speak."""
    net.eval()
    with torch.no_grad():
        cond = teacher_forced(net, batch).cond
        speaking = batch.text_targets[:, 0] == tokenizer.SPEAK
        noise = torch.randn(int(speaking.sum()), net.cfg.frames_per_turn * net.cfg.n_mels,
                            generator=torch.Generator().manual_seed(2))
        text = batch.flow_text(net.cfg.flow_text_turns)[speaking]
        return net.flow.sample(cond[speaking], text, noise, net.cfg.flow_steps), batch.mel_targets[speaking]


@pytest.mark.usefixtures("one_thread")
def test_decision_loss_weighs_the_micro_turns_where_the_model_starts_or_stops() -> None:
    torch.manual_seed(0)
    cfg = narrow_config(64, 1, 64, 1)
    net = ReferenceNet(cfg).eval()
    batch = tone_task(TurnLayout.of(cfg), batch=3, turns=6, generator=torch.Generator().manual_seed(5))
    controls = batch.text_targets[:, 0].view(3, 6)
    before = torch.cat([torch.full((3, 1), tokenizer.SILENT), controls[:, :-1]], dim=1)  # each sequence starts silent
    assert torch.equal(batch.changes.view(3, 6), controls != before)
    assert 0 < int(batch.changes.sum()) < 18

    with torch.no_grad():
        plain, _ = compute_losses(net, batch, torch.Generator().manual_seed(1))
        weighted, _ = compute_losses(net, batch, torch.Generator().manual_seed(1), decision_weight=0.5)
        h, _ = net(net.embed(batch.tokens), AttentionPlan.full(batch.lengths, cfg.window, cfg.n_sink, "cpu"))
        logits, _ = net.teacher_forced(h[batch.rows], batch.text_targets)
    ce = torch.nn.functional.cross_entropy(logits[:, 0], batch.text_targets[:, 0], reduction="none")
    w = torch.where(batch.changes, 4.0, 1.0)
    assert abs(float(weighted.text - plain.text) - 0.5 * float((w * ce).sum() / w.sum())) < 1e-5


def test_caption_context_holds_the_last_micro_turns_captions_oldest_first() -> None:
    pad = tokenizer.PAD
    captions = torch.tensor([[1, 2], [3, 4], [5, 6]])  # three micro-turns of two caption ids
    assert caption_context(captions, 2).tolist() == [[pad, pad, 1, 2], [1, 2, 3, 4], [3, 4, 5, 6]]
    before = torch.tensor([[7, 8]])
    assert caption_context(captions[:1], 2, before).tolist() == [[7, 8, 1, 2]]
    assert caption_context(captions, 0).shape == (3, 0)


def test_a_batch_gives_each_sequence_its_own_caption_context() -> None:
    cfg = preset("tiny")
    batch = tone_task(TurnLayout.of(cfg), batch=2, turns=5, generator=torch.Generator().manual_seed(3))
    text = batch.flow_text(2)  # (10, 2 · text_out)
    captions = batch.text_targets[:, 1:]
    assert torch.equal(text[5, :cfg.text_out], torch.full((cfg.text_out,), tokenizer.PAD))  # a new sequence
    assert torch.equal(text[6], torch.cat([captions[5], captions[6]]))
