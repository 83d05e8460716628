"""The audio encoder: it hears every frame of its window, the newest included, and nothing after a token; added to
a trained model it changes nothing until trained, then trains with the rest; a run resumes only as it started; a
listening probe at the encoder hears each micro-turn's last audio-in token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from inference import tokenizer
from inference.audio_encoder import AudioEncoder, encoded_length
from inference.checkpoint import load_checkpoint, save_checkpoint
from inference.layout import AUDIO_IN, TurnLayout
from inference.train import TurnExample, build_batch, heard_features, teacher_forced
from inference.trainer import Trainer, TrainSettings
from tests._reference_helpers import make_net, small_config
from tests.test_trainer import write_data_set


@pytest.mark.parametrize("window", [5, 16, 32, 33])
def test_every_frame_of_the_window_is_heard(window: int) -> None:
    torch.manual_seed(0)
    encoder = AudioEncoder(n_mels=80, dmel_bins=16, window=window, dim=16, d_model=8)
    torch.nn.init.normal_(encoder.out.weight)
    bins = torch.randint(0, 16, (1, window, 80))
    heard = encoder(bins)
    assert heard.shape == (1, 8) and encoded_length(window) >= 1
    for frame in range(window):  # the oldest, the newest and all between
        changed = bins.clone()
        changed[0, frame] = (changed[0, frame] + 5) % 16
        assert not torch.allclose(encoder(changed), heard), frame


def test_a_token_hears_the_frames_before_it_and_none_after() -> None:
    cfg = small_config(audio_context=12)
    net, layout = make_net(cfg), TurnLayout.of(cfg)
    bins = torch.randint(1, 16, (cfg.frames_per_turn, cfg.n_mels))
    before = torch.randint(1, 16, (12, cfg.n_mels))

    def heard(bins: torch.Tensor, before: torch.Tensor) -> torch.Tensor:  # the embeddings of the audio-in tokens
        tokens = layout.user_side([], None, bins, before)
        with torch.no_grad():
            return net.embed(tokens)[tokens.kind == AUDIO_IN]

    base = heard(bins, before)
    later = bins.clone()
    later[cfg.frames_per_token:] = 0  # the second token's frames: the first token does not hear them
    assert torch.equal(heard(later, before)[0], base[0]) and not torch.allclose(heard(later, before)[1], base[1])
    oldest = before.clone()
    oldest[:4] = 0  # heard by the first token only: the second's window starts 4 frames later
    assert not torch.allclose(heard(bins, oldest)[0], base[0]) and torch.equal(heard(bins, oldest)[1], base[1])
    with pytest.raises(ValueError, match="12 frames before"):
        layout.user_side([], None, bins, before[:8])


def test_a_new_encoder_changes_nothing_until_trained_and_a_run_resumes_only_as_it_started(tmp_path: Path) -> None:
    data = write_data_set(tmp_path / "data", 2)
    trained = save_checkpoint(make_net(small_config()), tmp_path / "trained")
    base: dict[str, Any] = dict(data=data, batch=2, window=6, val_every=2, save_every=2, val_windows=1, warmup=1,
                                init=trained, audio_context=12)
    run = Trainer(TrainSettings(out=tmp_path / "a", steps=2, **base))
    batch = run._batch()
    with torch.no_grad():
        before = teacher_forced(run.net.eval(), batch).logits
        assert torch.equal(before, teacher_forced(load_checkpoint(trained), batch).logits)
    run.run()
    after = load_checkpoint(tmp_path / "a" / "checkpoint")  # a servable checkpoint with its encoder
    assert after.cfg.audio_context == 12 and after.audio is not None
    assert float(after.audio.out.weight.detach().abs().sum()) > 0
    with torch.no_grad():
        assert not torch.allclose(teacher_forced(after, batch).logits, before)
    with pytest.raises(ValueError, match="audio-context"):
        Trainer(TrainSettings(out=tmp_path / "a", steps=4, **{**base, "audio_context": 20}))
    again = Trainer(TrainSettings(out=tmp_path / "b", steps=2, **{**base, "init": tmp_path / "a" / "checkpoint",
                                                                  "audio_context": None}))
    assert again.net.audio is not None and torch.equal(again.net.audio.out.weight, after.audio.out.weight)


def test_a_probe_at_the_encoder_hears_each_micro_turns_last_audio_token(tmp_path: Path) -> None:
    cfg = small_config(audio_context=12)
    net, layout = make_net(cfg), TurnLayout.of(cfg)
    turns = [torch.randint(0, 16, (cfg.frames_per_turn, cfg.n_mels)) for _ in range(3)]
    examples, before = [], torch.zeros(12, cfg.n_mels, dtype=torch.long)
    for bins in turns:
        examples.append(TurnExample(layout.user_side([], None, bins, before), tokenizer.SILENT,
                                    [tokenizer.PAD] * cfg.text_out, torch.full((8, cfg.n_mels), -5.0)))
        before = layout.heard_next(before, bins)
    batch = build_batch(layout, [examples[:2], examples[2:]])
    with torch.no_grad():
        got = heard_features(net, batch)
        stream = torch.cat([torch.zeros(12, cfg.n_mels, dtype=torch.long), *turns])  # 12 frames of silence first
        want = torch.stack([net.audio.features(stream[None, 8 * k + 4:8 * k + 20])[0] for k in range(3)])
    assert got.shape == (3, net.audio.feature_dim)
    torch.testing.assert_close(got, want)

    data = write_data_set(tmp_path / "data", 2)
    base: dict[str, Any] = dict(data=data, batch=2, window=6, val_every=2, save_every=2, val_windows=1, warmup=1,
                                listen_weight=1.0, listen_at="encoder")
    with pytest.raises(ValueError, match="audio encoder"):  # a model without one
        Trainer(TrainSettings(out=tmp_path / "none", steps=2, audio_context=0, **base))
    run = Trainer(TrainSettings(out=tmp_path / "a", steps=2, audio_context=12, **base))
    assert run.probe is not None and run.probe.at == "encoder"
    run.run()
    with pytest.raises(ValueError, match="listen-at"):
        Trainer(TrainSettings(out=tmp_path / "a", steps=4, audio_context=12, **{**base, "listen_at": "trunk"}))


def test_an_encoder_run_trains_the_encoder_alone_on_its_probe(tmp_path: Path) -> None:
    data = write_data_set(tmp_path / "data", 2)
    trained = save_checkpoint(make_net(small_config()), tmp_path / "trained")
    base: dict[str, Any] = dict(data=data, batch=2, window=6, val_every=3, save_every=3, val_windows=1, warmup=1,
                                init=trained, audio_context=12, parts="encoder", steps=3)
    with pytest.raises(ValueError, match="listen-at encoder"):
        Trainer(TrainSettings(out=tmp_path / "a", listen_weight=1.0, **base))
    run = Trainer(TrainSettings(out=tmp_path / "b", listen_weight=1.0, listen_at="encoder", **base))
    start = {k: v.clone() for k, v in run.net.state_dict().items()}
    result = run.run()
    assert result["validation_loss"] > 0
    after = load_checkpoint(tmp_path / "b" / "checkpoint").state_dict()
    changed = {k for k, v in after.items() if not torch.equal(v, start[k])}
    assert {"audio.frame.weight", "audio.convs.2.weight"} <= changed
    assert all(k.startswith("audio.") and not k.startswith("audio.out") for k in changed), changed
