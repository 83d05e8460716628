"""Training on synthetic conversations: examples laid out as the engine lays out a live session, exact resume."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from inference import tokenizer
from inference.card_probe import NAMES, shown
from inference.checkpoint import load_checkpoint
from inference.config import preset
from inference.context import TurnRecord, first_link
from inference.conversation import LATE_TURNS, Conversation, answers, examples, late_replies
from inference.layout import TurnLayout
from inference.listen import heard
from inference.model import ReferenceNet
from inference.reference import ReferenceModel
from inference.train import CHANGE_WEIGHT, TrainBatch, TurnExample, build_batch, compute_losses, teacher_forced
from inference.trainer import Trainer, TrainSettings, Window
from inference.video import THUMBNAIL
from microturn.cli import build_parser
from microturn.contracts import MicroTurn

TURNS = 12


def write_conversation(folder: Path, name: str, seed: int) -> Path:
    """A small conversation in the format of ``microturn data synth``: tones for speech, a card on the camera."""
    rng = np.random.default_rng(seed)
    t = np.arange(TURNS * 3200) / 16_000
    user = np.where((t > 0.2) & (t < 1.0), 0.3 * np.sin(2 * np.pi * 300 * t), 0.0) + 0.001 * rng.standard_normal(t.size)
    model = np.where((t > 1.4) & (t < 2.2), 0.3 * np.sin(2 * np.pi * 500 * t), 0.0)
    speaks = [bool(1.4 <= k * 0.2 < 2.2) for k in range(TURNS)]
    video = np.zeros((TURNS, 120, 160, 3), np.uint8)
    video[:, :, :, 0] = 200
    camera = np.array([k < 6 for k in range(TURNS)])
    user_text: list[list[str]] = [[] for _ in range(TURNS)]
    user_text[2] = ["what colour is this?"]
    background: list[list[str]] = [[] for _ in range(TURNS)]
    background[5] = ["red"]
    model_text = ["" for _ in range(TURNS)]
    model_text[7], model_text[8] = "it is ", "red"
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / f"{name}.npz", user_audio=user.astype(np.float32), model_audio=model.astype(np.float32),
             video=video, camera=camera)
    meta = {"id": name, "turns": TURNS, "user_text": user_text, "background": background, "model_text": model_text,
            "model_speaks": speaks, "scenario": "test", "user_speech": [[int(0.2 * 16_000), int(1.0 * 16_000)]],
            "user_speech_text": ["what colour is this"],
            "model_speech": [[int(1.4 * 16_000), int(2.2 * 16_000)]], "pauses": [], "overlaps": [],
            "questions": [{"kind": "visual", "end": int(1.0 * 16_000), "answer": "red",
                           "answer_start": int(1.4 * 16_000)}]}
    (folder / f"{name}.json").write_text(json.dumps(meta))
    return folder / f"{name}.npz"


def write_data_set(folder: Path, train: int) -> Path:
    """A data set folder of ``train`` train conversations and one validation conversation."""
    for i in range(train):
        write_conversation(folder / "train", f"t{i}", i)
    write_conversation(folder / "validation", "v0", 9)
    return folder


def assert_same_weights(a: list[torch.nn.Module], b: list[torch.nn.Module]) -> None:
    """Every tensor of modules ``a`` (a model and its probes) equals the one of ``b`` in the same place."""
    for (name, x), (_, y) in zip([kv for m in a for kv in m.state_dict().items()],
                                 [kv for m in b for kv in m.state_dict().items()], strict=True):
        assert torch.equal(x, y), name


@pytest.mark.parametrize(("audio_context", "thumbnail"), [(0, False), (12, False), (0, True)])
def test_examples_lay_out_a_conversation_as_the_engine_does(tmp_path: Path, audio_context: int,
                                                            thumbnail: bool) -> None:
    path = write_conversation(tmp_path, "c0", 0)
    conv = Conversation.load(path)
    cfg = dataclasses.replace(preset("tiny"), audio_context=audio_context, video_thumbnail=thumbnail)
    got = examples(conv, cfg)
    assert len(got) == TURNS
    torch.manual_seed(0)
    model = ReferenceModel(ReferenceNet(cfg).eval(), record=True)
    model.open("s", 7)
    contexts = []
    for k in range(TURNS):  # the same micro-turns, live through the engine's model
        span = slice(k * 3200, (k + 1) * 3200)
        turn = MicroTurn("s", k, conv.user_audio[span], conv.video[k] if conv.camera[k] else None,
                         tuple(conv.meta["user_text"][k]), background=tuple(conv.meta["background"][k]))
        contexts.append(model.step([turn])[0].context)
    link = first_link(7)
    for k, (context, example) in enumerate(zip(contexts, got, strict=True)):
        record = TurnRecord.decode(context, model.record_shape, link)
        link = TurnRecord.link_of(context)
        text_rows = example.user.text[: cfg.text_in].tolist()
        assert [i for i in text_rows if i != tokenizer.PAD] == record.text_slots, k
        assert torch.equal(example.user.dmel.reshape(-1, cfg.n_mels), record.audio_bins.long()), k
        assert (record.video is not None) == bool(conv.camera[k])
        if record.video is not None:  # the same patches (and thumbnail) in the same slots
            with torch.inference_mode():
                seen = model.net.stem(example.user.patches, example.user.grid).half()
            torch.testing.assert_close(seen, record.video, atol=2e-3, rtol=0)
            assert (tuple(example.user.grid[0].tolist()) == THUMBNAIL) == thumbnail
    # what the audio encoder hears before each audio-in token: the engine's live frames, from any window start
    trace = model.sessions["s"].trace
    assert trace is not None
    assert all(torch.equal(run.before, e.user.before) for run, e in zip(trace.runs, got, strict=True))
    assert got[3].user.before.shape == (cfg.audio_tokens, audio_context, cfg.n_mels)
    if audio_context:
        assert int(got[3].user.before.sum()) > 0 and int(got[0].user.before[0].sum()) == 0  # silence before the call
    window = examples(conv, cfg, 5, 4)
    assert all(torch.equal(a.user.before, b.user.before) and torch.equal(a.user.dmel, b.user.dmel)
               for a, b in zip(window, got[5:9], strict=True))
    # the targets: speak while the model audio plays, its caption bytes in order, the floor mel when silent
    controls = [e.control for e in got]
    assert controls == [tokenizer.SPEAK if s else tokenizer.SILENT for s in conv.meta["model_speaks"]]
    said = bytes(i for e in got for i in e.caption if i != tokenizer.PAD).decode()
    assert said == "it is red"[: len(said)] and len(said) >= 6
    assert all(float(e.mel.max()) <= -4.9 for e, s in zip(got, conv.meta["model_speaks"], strict=True) if not s)


def test_training_resumes_to_the_same_state(tmp_path: Path) -> None:
    data = write_data_set(tmp_path / "data", 3)

    def settings(out: Path, steps: int, seed: int = 3) -> TrainSettings:
        return TrainSettings(data=data, out=out, steps=steps, batch=2, window=6, val_every=2, save_every=2,
                             val_windows=1, warmup=2, seed=seed)

    straight = Trainer(settings(tmp_path / "a", 4))
    straight.run()
    first = Trainer(settings(tmp_path / "b", 2))
    first.run()
    resumed = Trainer(settings(tmp_path / "b", 4))
    assert resumed.step == 2
    result = resumed.run()
    assert result["steps"] == 4 and result["steps_this_run"] == 2 and result["micro_turns_per_s"] > 0
    assert_same_weights([straight.net], [resumed.net])
    assert straight.history.train == resumed.history.train
    assert (tmp_path / "b" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "b" / "checkpoint" / "config.json").exists()
    other = Trainer(settings(tmp_path / "c", 4, seed=4))
    other.run()
    assert not torch.equal(other.net.text_head.weight, straight.net.text_head.weight)  # the seed matters


def test_a_listening_run_resumes_with_its_probe_and_ships_the_model_alone(tmp_path: Path) -> None:
    data = write_data_set(tmp_path / "data", 3)

    def settings(out: str, steps: int, listen_weight: float = 0.5) -> TrainSettings:
        return TrainSettings(data=data, out=tmp_path / out, steps=steps, batch=2, window=6, val_every=2,
                             save_every=2, val_windows=1, warmup=2, seed=3, listen_weight=listen_weight)

    straight = Trainer(settings("a", 4))
    straight.run()
    assert json.loads((tmp_path / "a" / "listen_vocab.json").read_text()) == ["colour", "is", "this", "what"]
    assert straight.probe is not None and straight.probe.head.weight.any()  # it learnt from the words heard
    total, listening = straight.validate()
    assert listening > 0 and total == pytest.approx(straight.history.val[-1][1])
    probe, straight.probe = straight.probe, None
    assert straight.validate() == (pytest.approx(total), 0.0)  # the validation loss is the model's losses alone
    straight.probe = probe
    Trainer(settings("b", 2)).run()
    resumed = Trainer(settings("b", 4))
    resumed.run()
    assert resumed.probe is not None
    assert_same_weights([straight.net, straight.probe], [resumed.net, resumed.probe])
    shipped = load_checkpoint(tmp_path / "b" / "checkpoint").state_dict()
    assert shipped.keys() == ReferenceNet(straight.cfg).state_dict().keys()  # no probe in the checkpoint
    with pytest.raises(ValueError, match="started with --listen-weight"):
        Trainer(settings("b", 6, listen_weight=0.0))
    with pytest.raises(ValueError, match="started without --listen-weight"):
        Trainer(settings("plain", 2, listen_weight=0.0)).run()
        Trainer(settings("plain", 4))
    assert not (tmp_path / "plain" / "listen_vocab.json").exists()  # a refused resume leaves the folder as it was
    with pytest.raises(ValueError, match="listen-weight"):
        Trainer(TrainSettings(data=data, out=tmp_path / "c", parts="flow", listen_weight=0.5))


def test_a_listening_run_with_a_span_holds_each_word_and_resumes_only_with_that_span(tmp_path: Path) -> None:
    data = write_data_set(tmp_path / "data", 3)

    def settings(out: str, steps: int, span: int, **more: Any) -> TrainSettings:
        return TrainSettings(data=data, out=tmp_path / out, steps=steps, batch=2, window=6, val_every=2,
                             save_every=2, val_windows=1, warmup=2, seed=3, listen_weight=0.5, listen_span=span,
                             **more)

    one, four = Trainer(settings("one", 2, 1)), Trainer(settings("four", 2, 4))
    assert one.probe is not None and four.probe is not None
    conv = one._conversation(one.train_files[0])
    words_one = one._windows([Window(conv, 0, conv.turns)]).heard
    words_four = four._windows([Window(conv, 0, conv.turns)]).heard
    assert words_one is not None and words_four is not None
    assert torch.equal(words_four, heard(conv.meta, four.probe.vocab, 0, conv.turns, span=4))
    assert words_four.sum() > words_one.sum() and bool((words_four >= words_one).all())
    four.run()
    with pytest.raises(ValueError, match="listen-span"):
        Trainer(settings("four", 4, 2))
    Trainer(settings("four", 4, 4)).run()  # the same span resumes
    with pytest.raises(ValueError, match="listen-span"):
        Trainer(settings("x", 2, 0))
    with pytest.raises(ValueError, match="listen-at trunk"):
        Trainer(settings("x", 2, 2, listen_at="encoder", audio_context=12))


def edited_examples(tmp_path: Path, edit: Callable[[dict[str, Any]], None]
                    ) -> tuple[list[TurnExample], TrainBatch, ReferenceNet]:
    """The test conversation with ``edit`` applied to its labels: its examples (no audio encoder), their batch, and
    a seeded untrained model to compute losses with."""
    path = write_conversation(tmp_path, "c0", 0)
    meta = json.loads(path.with_suffix(".json").read_text())
    edit(meta)
    path.with_suffix(".json").write_text(json.dumps(meta))
    cfg = dataclasses.replace(preset("tiny"), audio_context=0)
    got = examples(Conversation.load(path), cfg)
    torch.manual_seed(0)
    return got, build_batch(TurnLayout.of(cfg), [got]), ReferenceNet(cfg).eval()


def test_the_micro_turns_of_a_mid_question_pause_weigh_more_in_the_decision_loss(tmp_path: Path) -> None:
    def pause(meta: dict[str, Any]) -> None:
        meta["pauses"] = [[int(0.5 * 16_000), int(0.9 * 16_000)]]  # samples 8000–14399: micro-turns 2, 3 and 4

    got, batch, net = edited_examples(tmp_path, pause)
    assert [e.pause for e in got] == [k in (2, 3, 4) for k in range(TURNS)]
    assert batch.pauses.tolist() == [e.pause for e in got]
    with torch.no_grad():
        plain, _ = compute_losses(net, batch, torch.Generator().manual_seed(1))
        even, _ = compute_losses(net, batch, torch.Generator().manual_seed(1), decision_weight=1.0)
        paused, _ = compute_losses(net, batch, torch.Generator().manual_seed(1), decision_weight=1.0, pause_weight=5.0)
        ce = torch.nn.functional.cross_entropy(teacher_forced(net, batch).logits[:, 0], batch.text_targets[:, 0],
                                               reduction="none")
    w = torch.where(batch.changes, CHANGE_WEIGHT, 1.0)
    assert abs(float(even.text - plain.text) - float((w * ce).sum() / w.sum())) < 1e-5
    w = w + 4.0 * batch.pauses.float()
    assert abs(float(paused.text - plain.text) - float((w * ce).sum() / w.sum())) < 1e-5

    data = write_data_set(tmp_path / "data", 1)
    for weight, decision in ((3.0, 0.0), (0.0, 1.0)):
        with pytest.raises(ValueError, match="--pause-weight"):
            Trainer(TrainSettings(data=data, out=tmp_path / "x", steps=1, pause_weight=weight,
                                  decision_weight=decision))


def test_the_micro_turns_that_say_an_answer_weigh_more_in_the_caption_loss(tmp_path: Path) -> None:
    def longer_answer(meta: dict[str, Any]) -> None:
        meta["questions"][0]["answer"] = "it is red"  # 9 bytes from 1.4 s: the captions of micro-turns 7, 8 and 9

    got, batch, net = edited_examples(tmp_path, longer_answer)
    assert [e.answer for e in got] == [k in (7, 8, 9) for k in range(TURNS)]
    assert bytes(b for e in got if e.answer for b in e.caption if b < 256).decode() == "it is red"
    assert batch.answers.tolist() == [e.answer for e in got]
    with torch.no_grad():
        plain, _ = compute_losses(net, batch, torch.Generator().manual_seed(1))
        even, _ = compute_losses(net, batch, torch.Generator().manual_seed(1), answer_weight=1.0)
        weighed, _ = compute_losses(net, batch, torch.Generator().manual_seed(1), answer_weight=5.0)
        logits = teacher_forced(net, batch).logits
    speaking = batch.text_targets[:, 0] == tokenizer.SPEAK
    ce = torch.nn.functional.cross_entropy(logits[speaking, 1:].transpose(1, 2), batch.text_targets[speaking, 1:],
                                           reduction="none").mean(1)  # (speaking micro-turns,)
    assert float(even.text) == float(plain.text)
    w = 1.0 + 4.0 * batch.answers[speaking].float()
    assert abs(float(weighed.text - plain.text) - float((w * ce).sum() / w.sum() - ce.mean())) < 1e-5

    with pytest.raises(ValueError, match="--answer-weight"):
        Trainer(TrainSettings(data=write_data_set(tmp_path / "data", 1), out=tmp_path / "x", steps=1,
                              answer_weight=0.0))


def test_answer_windows_place_windows_around_answers(tmp_path: Path) -> None:
    data = write_data_set(tmp_path / "data", 3)  # 12 micro-turns each; the answer starts in micro-turn 7

    def answered(share: float, kinds: tuple[str, ...] = ()) -> list[bool]:
        trainer = Trainer(TrainSettings(data=data, out=tmp_path / f"{share}{kinds}", steps=1, batch=2, window=6,
                                        answer_windows=share, answer_kinds=kinds))
        batches = [trainer._batch() for _ in range(8)]
        return [bool(a.any()) for b in batches for a in b.answers.split(b.turns)]

    assert all(answered(1.0))
    assert all(answered(1.0, ("visual", "background")))
    assert not all(answered(0.0))  # a window of 6 at a random place often misses it
    with pytest.raises(ValueError, match="none to arithmetic questions"):
        answered(1.0, ("arithmetic",))  # the set's only question is a visual one
    with pytest.raises(ValueError, match="--answer-kinds"):
        answered(0.0, ("visual",))
    meta = {"questions": [{"kind": "visual", "answer": "red", "answer_start": 3200 * 7},
                          {"kind": "arithmetic", "answer": "four", "answer_start": 3200 * 20}]}
    assert answers(meta) == [(7, "red"), (20, "four")] and answers(meta, ["arithmetic"]) == [(20, "four")]
    for share in (-0.1, 1.5):
        with pytest.raises(ValueError, match="--answer-windows"):
            Trainer(TrainSettings(data=data, out=tmp_path / "x", steps=1, answer_windows=share))


def test_pause_windows_place_windows_around_the_users_pauses(tmp_path: Path) -> None:
    data = write_data_set(tmp_path / "data", 3)
    with pytest.raises(ValueError, match="--pause-windows needs pauses"):
        Trainer(TrainSettings(data=data, out=tmp_path / "none", steps=1, pause_windows=0.5))
    for path in (data / "train").glob("*.json"):  # a pause in micro-turns 9 and 10, then the user goes on
        meta = json.loads(path.read_text())
        meta["pauses"] = [[int(1.9 * 16_000), int(2.2 * 16_000)]]
        path.write_text(json.dumps(meta))

    def paused(share: float, answer_share: float = 0.0) -> list[bool]:
        trainer = Trainer(TrainSettings(data=data, out=tmp_path / f"{share}-{answer_share}", steps=1, batch=2,
                                        window=4, pause_windows=share, answer_windows=answer_share))
        batches = [trainer._batch() for _ in range(8)]
        return [p.tolist() == [False, True, True, False] for b in batches for p in b.pauses.split(b.turns)]

    assert all(paused(1.0))  # micro-turns 8–11: what came before, the pause, and the micro-turn after it
    assert not any(paused(0.0, 1.0))  # all around the answer (micro-turn 7) instead
    assert not all(paused(0.0))  # a window of 4 at a random place mostly misses it
    for share, answer_share in ((-0.1, 0.0), (0.7, 0.4)):
        with pytest.raises(ValueError, match="--pause-windows"):
            Trainer(TrainSettings(data=data, out=tmp_path / "x", steps=1, pause_windows=share,
                                  answer_windows=answer_share))


def padded(conv: Conversation, turns: int) -> Conversation:
    """``conv`` with silent micro-turns added at its end, up to ``turns``."""
    more, meta = turns - conv.turns, dict(conv.meta)
    for key in ("user_text", "background"):
        meta[key] = meta[key] + [[] for _ in range(more)]
    meta["model_text"], meta["model_speaks"] = meta["model_text"] + [""] * more, meta["model_speaks"] + [False] * more
    meta["turns"] = turns
    return Conversation(meta, np.pad(conv.user_audio, (0, more * 3200)), np.pad(conv.model_audio, (0, more * 3200)),
                        np.pad(conv.video, ((0, more), (0, 0), (0, 0), (0, 0))), np.pad(conv.camera, (0, more)))


def test_late_replies_say_a_reply_whole_one_or_two_micro_turns_late_and_leave_its_lost_start_unscored(
        tmp_path: Path) -> None:
    base = Conversation.load(write_conversation(tmp_path, "c0", 0))  # the reply: micro-turns 7–10 of 12
    conv = padded(base, 16)
    cfg = dataclasses.replace(preset("tiny"), audio_context=0)
    seen = set()
    for seed in range(8):
        late, unscored = late_replies(conv, 1.0, torch.Generator().manual_seed(seed))
        moved = (np.flatnonzero(late.model_audio)[0] - np.flatnonzero(conv.model_audio)[0]) // 3200
        seen.add(moved)
        assert np.array_equal(late.model_audio, np.roll(conv.model_audio, moved * 3200))  # the same audio, later
        assert late.meta["model_speaks"] == [7 + moved <= k <= 10 + moved for k in range(16)]
        assert late.meta["model_text"][7 + moved:9 + moved] == ["it is ", "red"]
        assert late.meta["model_speech"] == [[(7 + moved) * 3200, (11 + moved) * 3200]]
        assert answers(late.meta) == [(7 + moved, "red")]
        assert unscored == set(range(7, 7 + moved))  # where it should have started
        got = examples(late, cfg, 6, 8, unscored)
        assert [e.scored for e in got] == [k not in unscored for k in range(6, 14)]
        assert [e.control == tokenizer.SPEAK for e in got] == late.meta["model_speaks"][6:14]
        assert [e.answer for e in got] == [k == 7 + moved for k in range(6, 14)]
    assert seen == set(range(1, LATE_TURNS + 1))
    assert conv.meta["model_speaks"][7] and conv.model_audio[7 * 3200 + 1] != 0  # the original is left alone
    kept, none = late_replies(conv, 0.0, torch.Generator().manual_seed(0))
    assert none == set() and kept.model_audio is conv.model_audio  # nothing moved: the audio is not copied

    def stays(edit: Callable[[dict[str, Any]], None], turns: int = 16) -> bool:
        meta = json.loads(json.dumps(base.meta))
        edit(meta)
        edited = padded(dataclasses.replace(base, meta=meta), turns)
        return all(not {7, 8} & late_replies(edited, 1.0, torch.Generator().manual_seed(seed))[1] for seed in range(8))

    assert not stays(lambda meta: None)
    assert stays(lambda meta: meta["user_speech"].append([12 * 3200, 13 * 3200]))  # the user speaks right after it
    assert stays(lambda meta: meta["overlaps"].append([10 * 3200, 11 * 3200]))  # the user talked over it
    assert stays(lambda meta: meta["user_text"][11].append("hi"))  # a typed text arrives in its way
    assert stays(lambda meta: meta["background"][8].append("42"))  # a background result arrives while it is said
    assert stays(lambda meta: meta["model_speech"].append([12 * 3200, 13 * 3200]))  # the model's next utterance
    assert stays(lambda meta: None, turns=12)  # no room: the conversation ends a micro-turn after the reply


def test_unscored_decisions_count_in_no_loss_and_late_replies_are_drawn_for_training_windows_only(
        tmp_path: Path) -> None:
    got, batch, net = edited_examples(tmp_path, lambda meta: None)
    skipped = build_batch(TurnLayout.of(net.cfg), [[dataclasses.replace(e, scored=k not in (7, 8))
                                                     for k, e in enumerate(got)]])
    assert batch.scored.all() and skipped.scored.tolist() == [k not in (7, 8) for k in range(TURNS)]
    with torch.no_grad():
        plain, _ = compute_losses(net, batch, torch.Generator().manual_seed(1), decision_weight=1.0)
        less, _ = compute_losses(net, skipped, torch.Generator().manual_seed(1), decision_weight=1.0)
        logits = teacher_forced(net, batch).logits
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.text_targets, reduction="none")  # (M, 1+n)
    kept = torch.ones_like(ce, dtype=torch.bool)
    kept[7:9, 0] = False
    changes = torch.where(batch.changes, CHANGE_WEIGHT, 1.0)
    w = changes * skipped.scored.float()
    expected = (ce[kept].mean() - ce.mean() + (w * ce[:, 0]).sum() / w.sum()
                - (changes * ce[:, 0]).sum() / changes.sum())
    assert abs(float(less.text - plain.text) - float(expected)) < 1e-5
    assert float(less.flow) == float(plain.flow)  # the audio and captions the model says still count

    data = write_data_set(tmp_path / "data", 3)
    for path in data.glob("*/*.npz"):  # room after the reply to say it late
        conv = padded(Conversation.load(path), 16)
        np.savez(path, user_audio=conv.user_audio, model_audio=conv.model_audio, video=conv.video, camera=conv.camera)
        path.with_suffix(".json").write_text(json.dumps(conv.meta))
    trainer = Trainer(TrainSettings(data=data, out=tmp_path / "late", steps=1, batch=4, window=12,
                                    late_replies=1.0, val_windows=2))
    assert any(not b.scored.all() for b in (trainer._batch() for _ in range(4)))
    plain_run = Trainer(TrainSettings(data=data, out=tmp_path / "plain", steps=1, window=12, val_windows=2))
    assert trainer.validate()[0] == plain_run.validate()[0]  # validation windows are as they are
    assert build_parser().parse_args(["train", "--data", "d", "--late-replies", "0.5"]).late_replies == 0.5
    for share in (-0.1, 1.5):
        with pytest.raises(ValueError, match="--late-replies"):
            Trainer(TrainSettings(data=data, out=tmp_path / "x", steps=1, late_replies=share))


def test_a_flow_run_starts_from_a_checkpoint_and_trains_only_the_flow_head(tmp_path: Path) -> None:
    data = write_data_set(tmp_path / "data", 2)
    base: dict[str, Any] = dict(data=data, steps=3, batch=2, window=6, val_every=3, save_every=3, val_windows=1,
                                warmup=1)
    Trainer(TrainSettings(out=tmp_path / "a", flow_text_turns=0, **base)).run()  # a head without caption context
    start = load_checkpoint(tmp_path / "a" / "checkpoint").state_dict()
    assert not any(k.startswith("flow.text") for k in start)

    def flow_run(out: str, steps: int) -> Trainer:
        return Trainer(TrainSettings(out=tmp_path / out, init=tmp_path / "a" / "checkpoint", parts="flow",
                                     flow_text_turns=2, **{**base, "steps": steps}))

    flow = flow_run("b", 3)
    assert all(torch.equal(v, start[k]) for k, v in flow.net.state_dict().items() if k in start)  # starts from it
    # one row per micro-turn in which the model speaks (4 in each conversation), with two micro-turns of captions
    pairs = flow.pairs["train"]
    assert pairs.cond.shape == (8, flow.cfg.d_model) and pairs.text.shape == (8, 2 * flow.cfg.text_out)
    said = pairs.text[:4, -flow.cfg.text_out:].flatten().tolist()  # this micro-turn's captions, in order
    assert bytes(i for i in said if i != tokenizer.PAD) == b"it is red"
    flow.run()
    same_noise = torch.Generator().manual_seed(12345)
    with torch.no_grad():  # a flow run validates on its validation pairs alone
        expected = float(flow._flow_loss(flow.pairs["validation"], same_noise))
    assert flow.validate() == (pytest.approx(expected), 0.0)
    after = load_checkpoint(tmp_path / "b" / "checkpoint").state_dict()
    assert load_checkpoint(tmp_path / "b" / "checkpoint").cfg.flow_text_turns == 2
    changed = {k for k, v in after.items() if k not in start or not torch.equal(v, start[k])}
    assert changed and all(k.startswith("flow.") for k in changed), changed  # router biases stay too
    assert {"flow.text.weight", "flow.text_emb.weight"} <= changed
    assert (tmp_path / "b" / "flow_pairs.pt").exists()
    flow_run("c", 2).run()  # stopped after 2 steps, resumed to 3: the same weights as straight through
    resumed = flow_run("c", 3)
    assert resumed.step == 2
    resumed.run()
    assert_same_weights([flow.net], [resumed.net])
    with pytest.raises(ValueError, match="parts"):
        Trainer(TrainSettings(out=tmp_path / "c", parts="trunk", **base))


def test_a_stem_run_teaches_the_stem_alone_to_name_cards_and_resumes_to_the_same_state(tmp_path: Path) -> None:
    data = write_data_set(tmp_path / "data", 1)
    base: dict[str, Any] = dict(data=data, steps=3, batch=2, window=6, val_every=3, save_every=3, val_windows=1,
                                warmup=1)
    Trainer(TrainSettings(out=tmp_path / "a", video_thumbnail=False, **base)).run()  # a model without a thumbnail
    start = load_checkpoint(tmp_path / "a" / "checkpoint").state_dict()

    def stem_run(out: str, steps: int) -> Trainer:
        return Trainer(TrainSettings(out=tmp_path / out, init=tmp_path / "a" / "checkpoint", parts="stem",
                                     video_thumbnail=True, **{**base, "steps": steps, "batch": 32, "lr": 3e-3,
                                                              "warmup": 5, "val_every": steps,
                                                              "save_every": 2 if steps < 10 else steps}))

    stem = stem_run("b", 120)
    _, named_before = stem.validate()
    result = stem.run()
    assert "cards_per_s" in result and "micro_turns_per_s" not in result  # a stem run trains on cards
    _, named_after = stem.validate()
    assert named_before < 0.2 and named_after > 0.6, (named_before, named_after)  # 22 names: chance is 0.05
    shipped = load_checkpoint(tmp_path / "b" / "checkpoint")
    assert shipped.cfg.video_thumbnail and shipped.state_dict().keys() == start.keys()  # no probe shipped
    changed = {k for k, v in shipped.state_dict().items() if not torch.equal(v, start[k])}
    assert changed and all(k.startswith("stem.") for k in changed), changed
    stem_run("c", 2).run()  # stopped after 2 steps, resumed to 4: the same stem and probe as straight through
    resumed = stem_run("c", 4)
    assert resumed.step == 2
    resumed.run()
    straight = stem_run("d", 4)
    straight.run()
    assert straight.stem_cards is not None and resumed.stem_cards is not None
    assert_same_weights([straight.net, straight.stem_cards], [resumed.net, resumed.stem_cards])
    with pytest.raises(ValueError, match="--video-thumbnail"):
        Trainer(TrainSettings(out=tmp_path / "e", parts="stem", video_thumbnail=False, **base))
    assert Trainer(TrainSettings(out=tmp_path / "f", **base)).cfg.video_thumbnail  # the tiny preset has one
    parse = build_parser().parse_args
    assert [parse(["train", "--data", "d", *flag]).video_thumbnail
            for flag in ([], ["--video-thumbnail"], ["--no-video-thumbnail"])] == [None, True, False]
    with pytest.raises(ValueError, match="listen-weight"):
        Trainer(TrainSettings(out=tmp_path / "e", parts="stem", video_thumbnail=True, listen_weight=0.5, **base))
    with pytest.raises(ValueError, match="another --parts"):
        Trainer(TrainSettings(out=tmp_path / "c", init=tmp_path / "a" / "checkpoint", video_thumbnail=True,
                              **{**base, "steps": 6}))


def test_the_card_probe_learns_from_the_micro_turns_a_questioned_card_shows_and_resumes_with_the_run(
        tmp_path: Path) -> None:
    data = write_data_set(tmp_path / "data", 2)  # the camera shows a card in micro-turns 0–5, asked "what colour"
    conv = Conversation.load(data / "train" / "t0.npz")
    red = NAMES.index("red")
    assert shown(conv.meta, conv.camera, 0, TURNS).tolist() == [red] * 6 + [-1] * 6
    assert shown(conv.meta, conv.camera, 4, 5).tolist() == [red, red, -1, -1, -1]
    assert shown({"questions": []}, conv.camera, 0, 4).tolist() == [-1] * 4  # a card nobody asks about: unknown

    def settings(out: str, steps: int, card_weight: float = 0.5) -> TrainSettings:
        return TrainSettings(data=data, out=tmp_path / out, steps=steps, batch=2, window=6, val_every=2,
                             save_every=2, val_windows=1, warmup=2, seed=3, card_weight=card_weight)

    straight = Trainer(settings("a", 4))
    batch = straight._windows([Window(conv, 3, 6)])
    assert batch.cards is not None and batch.cards.tolist() == [red] * 3 + [-1] * 3
    with torch.no_grad():  # the card loss: the probe on the trunk's state of the labelled micro-turns only
        losses, _ = compute_losses(straight.net, batch, torch.Generator().manual_seed(0), cards=straight.trunk_cards)
        state = teacher_forced(straight.net, batch).state
        assert straight.trunk_cards is not None
        expected = straight.trunk_cards.loss(state[:3], batch.cards[:3])
    torch.testing.assert_close(losses.cards, expected)
    straight.run()
    assert straight.trunk_cards is not None and straight.trunk_cards.head.weight.grad is not None
    Trainer(settings("b", 2)).run()
    resumed = Trainer(settings("b", 4))
    resumed.run()
    assert resumed.trunk_cards is not None
    assert_same_weights([straight.net, straight.trunk_cards], [resumed.net, resumed.trunk_cards])
    shipped = load_checkpoint(tmp_path / "b" / "checkpoint").state_dict()
    assert shipped.keys() == ReferenceNet(straight.cfg).state_dict().keys()  # no probe in the checkpoint
    with pytest.raises(ValueError, match="another --card-weight"):
        Trainer(settings("b", 6, card_weight=0.0))
    with pytest.raises(ValueError, match="--card-weight"):
        Trainer(TrainSettings(data=data, out=tmp_path / "c", parts="flow", card_weight=0.5))
