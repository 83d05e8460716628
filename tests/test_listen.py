"""The listening probe: its targets say which of the user's words ended in each micro-turn, and its loss trains
the probe and reaches the trunk through the training step."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from inference.layout import TurnLayout
from inference.listen import ListenProbe, heard, vocabulary, words_of
from inference.model import ReferenceNet
from inference.train import TONES, TrainBatch, compute_losses, tone_task, train_step
from microturn.contracts import MICRO_TURN_SAMPLES
from tests._reference_helpers import narrow_config


def test_words_are_letters_and_numbers_in_digits_are_not_words() -> None:
    assert words_of("What's 123 plus FOUR?") == [("what's", 6), ("plus", 15), ("four", 20)]


def test_the_vocabulary_keeps_words_said_often_enough() -> None:
    metas = [{"user_speech_text": ["what is two plus two", "count to two"]}, {"user_speech_text": ["what is six"]}]
    assert vocabulary(metas) == ["is", "two", "what"]
    assert vocabulary(metas, min_count=3) == ["two"]


def test_each_word_is_heard_in_the_micro_turn_where_its_share_of_the_audio_ends() -> None:
    first = 2 * MICRO_TURN_SAMPLES
    meta = {"user_speech": [[first, first + 10 * MICRO_TURN_SAMPLES]],  # 10 micro-turns for 23 characters
            "user_speech_text": ["what is seven plus five"]}
    vocab = ["five", "plus", "seven", "what", "zero"]  # "is" is not a word of this vocabulary
    got = heard(meta, vocab, 0, 14)
    # "what" ends at character 4 of 23: sample first + 10·3200·4/23, in micro-turn 2 + 1.7 → 3; "seven" at 13/23
    # → 7; "plus" 18/23 → 9; "five" at the very end → the utterance's last micro-turn, 11
    expected = {3: "what", 7: "seven", 9: "plus", 11: "five"}
    assert {k: [vocab[i] for i in row.nonzero().flatten()] for k, row in enumerate(got) if row.any()} == \
        {k: [word] for k, word in expected.items()}
    window = heard(meta, vocab, 5, 5)  # micro-turns 5–9 of the same conversation
    assert [k + 5 for k, row in enumerate(window) if row.any()] == [7, 9]


def test_with_a_span_each_word_stays_heard_for_that_many_micro_turns() -> None:
    first = 2 * MICRO_TURN_SAMPLES
    meta = {"user_speech": [[first, first + 10 * MICRO_TURN_SAMPLES]], "user_speech_text": ["what is seven plus five"]}
    vocab = ["five", "plus", "seven", "what"]

    def words(got: torch.Tensor, start: int) -> dict[int, list[str]]:
        return {start + k: [vocab[i] for i in row.nonzero().flatten()] for k, row in enumerate(got) if row.any()}

    # the words end in micro-turns 3, 7, 9 and 11 (the test above); each now holds for 3
    assert words(heard(meta, vocab, 0, 16, span=3), 0) == {
        3: ["what"], 4: ["what"], 5: ["what"], 7: ["seven"], 8: ["seven"], 9: ["plus", "seven"], 10: ["plus"],
        11: ["five", "plus"], 12: ["five"], 13: ["five"]}
    # a window that starts after "seven" ended still hears it while its span lasts, and is cut at its own end
    assert words(heard(meta, vocab, 8, 4, span=3), 8) == {8: ["seven"], 9: ["plus", "seven"], 10: ["plus"],
                                                         11: ["five", "plus"]}
    assert torch.equal(heard(meta, vocab, 0, 16, span=1), heard(meta, vocab, 0, 16))
    with pytest.raises(ValueError, match="at least one micro-turn"):
        heard(meta, vocab, 0, 16, span=0)


@pytest.mark.usefixtures("one_thread")
def test_a_fresh_probe_leaves_a_trained_trunk_alone_and_then_learns() -> None:
    torch.manual_seed(0)
    cfg = narrow_config(64, 1, 64, 1)
    net = ReferenceNet(cfg)
    layout = TurnLayout.of(cfg)
    probe = ListenProbe(cfg.d_model, [letter for letter, _ in TONES])

    def with_words(seed: int) -> TrainBatch:  # the tone heard in each micro-turn is its "word"
        batch = tone_task(layout, batch=8, turns=5, generator=torch.Generator().manual_seed(seed))
        gen = torch.Generator().manual_seed(seed)  # the tones tone_task drew: each sequence's, from the same draws
        heard_tones = torch.stack([torch.randint(0, len(TONES) + 1, (5,), generator=gen) for _ in range(8)])
        words = torch.nn.functional.one_hot(heard_tones.flatten(), len(TONES) + 1)[:, 1:].float()
        return dataclasses.replace(batch, heard=words)

    held_out = with_words(99)
    with torch.no_grad():
        plain, _ = compute_losses(net, held_out, torch.Generator().manual_seed(1))
        probed, _ = compute_losses(net, held_out, torch.Generator().manual_seed(1), probe=probe, listen_weight=0.5)
        no_targets, _ = compute_losses(net, dataclasses.replace(held_out, heard=None), torch.Generator().manual_seed(1),
                                       probe=probe)
    assert float(plain.listen) == 0.0 and float(no_targets.listen) == 0.0
    assert abs(float(probed.total - plain.total) - 0.5 * float(probed.listen)) < 1e-5
    first = float(probed.listen)
    net.zero_grad()
    compute_losses(net, held_out, torch.Generator().manual_seed(1), probe=probe)[0].listen.backward()
    assert all(p.grad is None or not p.grad.any() for p in net.parameters())  # zero weights: the trunk is left alone
    assert probe.head.weight.grad is not None and probe.head.weight.grad.any()

    optimizer = torch.optim.AdamW([*net.parameters(), *probe.parameters()], lr=3e-3, weight_decay=0.0)
    for step in range(60):
        train_step(net, optimizer, with_words(step), torch.Generator().manual_seed(step), probe=probe)
    with torch.no_grad():
        after, _ = compute_losses(net, held_out, torch.Generator().manual_seed(1), probe=probe)
    assert float(after.listen) < 0.3 * first, (first, float(after.listen))
