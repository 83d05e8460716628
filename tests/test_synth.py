"""``microturn data synth``: exact timings, disjoint splits, byte-for-byte determinism, cards that show their answer,
background requests and results where the format says (a tiny set rendered with espeak-ng)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inference.background.tools import Toolbox
from inference.duplex_eval import Played, score, summarise
from inference.synth import splits
from inference.synth.cards import COLOURS, DIGITS, SHAPES, Card
from inference.synth.noise import Noise
from inference.synth.phrasing import EDITIONS, TEMPLATES, number_words
from inference.synth.scenarios import MARKED_PAUSES, SCENARIOS, Director
from inference.synth.speech import speak
from inference.synth.timeline import LATENCY_TURNS, STOP_TURNS, Timeline, text_cue
from inference.synth.voices import MODEL_VOICE, Voice, english_voices
from inference.synth.voices import variants as voice_variants
from inference.tokenizer import REQUEST_CLOSE, REQUEST_OPEN, RequestSpans
from microturn.cli import main
from microturn.eval_duplex import as_the_path_plays

HOURS = 0.04  # ≈ 15 conversations: every scenario, every split
N = 3200


@dataclass
class Conv:
    meta: dict[str, Any]
    user: np.ndarray
    model: np.ndarray
    video: np.ndarray
    camera: np.ndarray


def synth(out: Path, seed: int, workers: int) -> Path:
    assert main(["data", "synth", "--out", str(out), "--hours", str(HOURS), "--seed", str(seed),
                 "--workers", str(workers)]) == 0
    return out


def load(root: Path) -> list[Conv]:
    convs = []
    for path in sorted(root.glob("*/*.json")):
        with np.load(path.with_suffix(".npz")) as data:
            convs.append(Conv(json.loads(path.read_text()), data["user_audio"], data["model_audio"], data["video"],
                              data["camera"]))
    return convs


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth(tmp_path_factory.mktemp("synth") / "data", seed=0, workers=2)


@pytest.fixture(scope="module")
def convs(root: Path) -> list[Conv]:
    return load(root)


@pytest.fixture(scope="module")
def other_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same hours drawn from another seed (the split seed left at 0)."""
    return synth(tmp_path_factory.mktemp("synth") / "other", seed=1, workers=2)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


def within(spans: list[list[int]], n: int) -> np.ndarray:
    """(n,) bool: the samples inside any of ``spans``."""
    inside = np.zeros(n, bool)
    for start, end in spans:
        inside[max(start, 0):end] = True
    return inside


def spans_match(audio: np.ndarray, spans: list[list[int]], noise_rms: float) -> bool:
    """Speech at both ends of every span (its first and last micro-turn's worth), nothing but the noise floor in any
    50 ms outside all spans."""
    inside = within(spans, len(audio))
    for start, end in spans:
        if min(rms(audio[start:start + N]), rms(audio[end - N:end])) <= 4 * noise_rms:
            return False
    blocks = [audio[k:k + 800] for k in range(0, len(audio) - 800, 800) if not inside[k:k + 800].any()]
    return max(rms(b) for b in blocks) <= 2.5 * noise_rms


def overlaps_turn(spans: list[list[int]], k: int) -> bool:
    return any(s < (k + 1) * N and e > k * N for s, e in spans)


def test_the_set_has_every_scenario_and_split_and_the_requested_hours(root: Path, convs: list[Conv]) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    assert all(manifest["scenarios"][s] > 0 for s in SCENARIOS), manifest["scenarios"]
    assert all(manifest["splits"][s]["conversations"] for s in ("train", "validation", "test"))
    seconds = [len(c.user) / 16_000 for c in convs]
    assert manifest["seconds_produced"] == pytest.approx(sum(seconds))
    assert sum(seconds) >= HOURS * 3600 > sum(seconds) - max(seconds)  # the shortest prefix that reaches the hours
    assert manifest["model_voice"]["variant"] == MODEL_VOICE.variant
    for c in convs:
        t = c.meta["turns"]
        assert c.user.shape == c.model.shape == (t * N,) and c.user.dtype == c.model.dtype == np.float32
        assert c.video.shape == (t, 120, 160, 3) and c.video.dtype == np.uint8 and c.camera.shape == (t,)
        assert all(len(c.meta[k]) == t for k in ("user_text", "background", "model_text", "model_speaks"))
        assert 5.0 <= t * N / 16_000 <= 30.0
        assert not c.video[~c.camera].any()  # zeros while the camera is off


def test_user_speech_spans_match_the_audio_exactly(convs: list[Conv]) -> None:
    spoken = [c for c in convs if c.meta["user_speech"]]
    assert len(spoken) >= 10
    for c in spoken:
        spans, floor = c.meta["user_speech"], c.meta["noise"]["rms"]
        assert spans_match(c.user, spans, floor), c.meta["id"]
        for shift in (-N, N):  # the check sees a label one micro-turn off
            assert not spans_match(c.user, [[s + shift, e + shift] for s, e in spans], floor), c.meta["id"]


def test_model_speech_spans_match_the_model_audio_exactly(convs: list[Conv]) -> None:
    for c in convs:
        spans = c.meta["model_speech"]
        inside = np.zeros(len(c.model), bool)
        for start, end in spans:
            inside[start:end] = True
            assert start % N == 0 and c.model[start] != 0 and np.count_nonzero(c.model[start:end]) > 0.5 * (end - start)
        assert not c.model[~inside].any(), c.meta["id"]
        assert c.meta["model_speaks"] == [overlaps_turn(spans, k) for k in range(c.meta["turns"])]
        assert all(speaks for text, speaks in zip(c.meta["model_text"], c.meta["model_speaks"], strict=True) if text)


def test_the_model_answers_a_fixed_latency_after_the_cue(convs: list[Conv]) -> None:
    checked = 0
    for c in convs:
        typed = {k: texts[0] for k, texts in enumerate(c.meta["user_text"]) if texts}
        for q in c.meta["questions"]:
            if q["kind"] == "typed":
                cue = text_cue(q["end"] // N, typed[q["end"] // N])
            elif q["kind"] == "background":
                continue  # its answer follows the result (test_background_request_then_result)
            else:
                cue = (q["end"] - 1) // N
                assert q["end"] in [e for _, e in c.meta["user_speech"]]
            assert q["answer_start"] == (cue + LATENCY_TURNS) * N, (c.meta["id"], q)
            assert q["answer_start"] in [s for s, _ in c.meta["model_speech"]]
            said = "".join(c.meta["model_text"][q["answer_start"] // N:])
            assert said.startswith(q["answer"]) or q["interrupted"]
            checked += 1
    assert checked >= 10


def test_a_model_that_says_its_targets_meets_the_timing_targets_as_the_path_plays_it(convs: list[Conv]) -> None:
    """The targets leave the path its micro-turn: played one micro-turn late (as the gateway plays a model's output),
    a model that says exactly its targets answers and goes quiet within the issue's 0.40 s (p50), each stop within
    about 200–400 ms of the user's onset. (With two micro-turns in the targets this fails: on the first 300 test
    conversations of a 15 h set made that way, 0.51 s and 0.50 s.)"""
    scores = [score(c.meta, as_the_path_plays(Played(c.model, {}))) for c in convs]
    result = summarise(scores)
    assert result["turn_tor"] == 1.0 and result["pause_tor"] == 0.0 and result["interrupt_tor"] == 1.0
    latencies = [t for sc in scores for t in sc.turn_latencies]
    stops = [t for sc in scores for t in sc.interrupt_stops]
    assert latencies and stops
    assert result["turn_latency_s"]["p50"] <= 0.40 and result["interrupt_stop_s"]["p50"] <= 0.40
    assert all(0.15 <= t <= 0.42 for t in stops), stops


def test_the_model_stops_at_the_start_of_the_micro_turn_after_the_users_onset(convs: list[Conv]) -> None:
    talked_over = [c for c in convs if c.meta["scenario"] == "interruption"]
    assert talked_over
    for c in talked_over:
        assert c.meta["overlaps"]
        for onset, stop in c.meta["overlaps"]:
            assert onset in [s for s, _ in c.meta["user_speech"]]
            cut = next((s, e) for s, e in c.meta["model_speech"] if s <= onset < e)
            assert cut[1] == stop == (onset // N + STOP_TURNS) * N and 0 < stop - onset <= STOP_TURNS * N
            assert not c.model[stop:stop + 2 * N].any()
            asked_end = next(e for s, e in c.meta["user_speech"] if s == onset)
            assert any(s > asked_end for s, _ in c.meta["model_speech"])  # then it answers the new question
        interrupted = [q for q in c.meta["questions"] if q["interrupted"]]
        assert len(interrupted) == 1
        said = "".join(c.meta["model_text"])
        assert said.startswith("one") and interrupted[0]["answer"] not in said  # what it never said is not captioned


def test_pauses_hold_no_speech(convs: list[Conv]) -> None:
    paused = [c for c in convs if c.meta["scenario"] == "pause"]
    assert paused and all(c.meta["pauses"] for c in paused)
    for c in convs:
        for start, end in c.meta["pauses"]:
            assert end - start >= 0.25 * 16_000
            if c.meta["scenario"] == "pause":
                assert 0.6 * 16_000 <= end - start <= 1.2 * 16_000
            assert not any(s < end and e > start for s, e in c.meta["user_speech"])
            assert not c.model[start:end].any()
            assert rms(c.user[start:end]) <= 1.5 * c.meta["noise"]["rms"]
            assert not any(start <= q["answer_start"] < end for q in c.meta["questions"])


def test_mid_question_pauses_fall_at_the_wordings_mark_and_after_other_words() -> None:
    templates = {t.id: t for kind in TEMPLATES.values() for t in kind}
    at_mark, elsewhere = 0, 0
    for seed in range(30):
        director = Director(Timeline(np.random.default_rng(seed), MODEL_VOICE, Noise("none", 0.0)), TEMPLATES)
        director.run("pause")
        episode = director.tl.finish("c", "train", "pause", director.phrasing, tail=0.5)
        assert len(episode.pauses) == len(director.phrasing)
        for (start, _), template_id in zip(episode.pauses, director.phrasing, strict=True):
            i = next(k for k, span in enumerate(episode.user_speech) if span[1] == start)
            head, tail = episode.user_speech_text[i].split(), episode.user_speech_text[i + 1].split()
            template = templates[template_id]  # its placeholders fill with one word each here
            assert head and tail and len(head) + len(tail) == len(template.text.replace("|", " ").split())
            if len(head) == len(template.text.split("|")[0].split()):
                at_mark += 1
            else:
                elsewhere += 1
    assert at_mark >= 0.5 * MARKED_PAUSES * (at_mark + elsewhere) and elsewhere >= 10


def test_speech_the_user_goes_on_from_after_a_pause_is_rendered_as_an_unfinished_clause(convs: list[Conv]) -> None:
    checked = 0
    for c in convs:
        voice = Voice(**c.meta["voice"])
        pause_starts = {start for start, _ in c.meta["pauses"]}
        for (start, end), text in zip(c.meta["user_speech"], c.meta["user_speech_text"], strict=True):
            goes_on = end in pause_starts
            assert end - start == len(speak(voice, text, continuing=goes_on)), (c.meta["id"], text)
            checked += goes_on
    assert checked >= 3


def end_pitch(audio: np.ndarray) -> float:
    """log(F0 of the last 50 ms voiced / the median F0), F0 by autocorrelation every 10 ms (octave errors, beyond
    1.5× the median either way, left out)."""
    n, found = 640, []
    for k in range(0, len(audio) - n, 160):
        frame = audio[k:k + n] - audio[k:k + n].mean()
        if rms(frame) < 0.05:
            continue
        ac = np.correlate(frame, frame, "full")[n - 1:]
        lag = 35 + int(np.argmax(ac[35:267]))  # 60–450 Hz
        if ac[lag] > 0.4 * ac[0]:
            found.append(16_000 / lag)
    pitches = np.array(found)
    median = np.median(pitches)
    pitches = pitches[(pitches > median / 1.5) & (pitches < median * 1.5)]
    return float(np.log(np.median(pitches[-5:]) / median))


def test_an_unfinished_clause_ends_higher_in_pitch_than_a_finished_one() -> None:
    texts = ("what is six plus", "count to", "what colour is this", "how much is seven")
    voices = [Voice(name, variant, rate, pitch) for name, variant, rate, pitch in (
        ("en-us", "m1", 130, 20), ("en-gb", "f1", 200, 80), ("en-us", "m3", 165, 50), ("en-gb-scotland", "f4", 130, 50),
        ("en-us", "klatt", 200, 20), ("en-gb-x-rp", "m2", 165, 80))]
    rises = np.array([end_pitch(speak(v, t, continuing=True)) - end_pitch(speak(v, t)) for v in voices for t in texts])
    assert (rises > 0).mean() >= 0.6 and np.median(rises) >= 0.05, np.round(rises, 2)


def test_splits_share_no_voice_and_no_phrasing(root: Path, convs: list[Conv]) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    used: dict[str, tuple[set[str], set[str]]] = {s: (set(), set()) for s in ("train", "validation", "test")}
    for c in convs:
        voice = f"{c.meta['voice']['name']}+{c.meta['voice']['variant']}"
        split = manifest["splits"][c.meta["split"]]
        assert voice in split["voices"] and set(c.meta["phrasing"]) <= set(split["phrasings"])
        assert c.meta["id"] in split["conversations"]
        used[c.meta["split"]][0].add(voice)
        used[c.meta["split"]][1].update(c.meta["phrasing"])
    for held_out in ("validation", "test"):
        for other in {"validation", "test"} - {held_out} | {"train"}:
            assert not used[held_out][0] & used[other][0] and not used[held_out][1] & used[other][1]
            pools = manifest["splits"][held_out], manifest["splits"][other]
            assert not set(pools[0]["voices"]) & set(pools[1]["voices"])
            assert not set(pools[0]["phrasings"]) & set(pools[1]["phrasings"])
    variants = {s: {v.split("+")[1] for v in manifest["splits"][s]["voices"]} for s in manifest["splits"]}
    assert not variants["test"] & variants["train"] and MODEL_VOICE.variant not in set.union(*variants.values())
    assert all(used[s][1] for s in used)


def test_the_same_seed_gives_the_same_bytes_and_another_seed_does_not(root: Path, other_root: Path,
                                                                      tmp_path: Path) -> None:
    again = synth(tmp_path / "again", seed=0, workers=1)
    names = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((root / n).read_bytes() == (again / n).read_bytes() for n in names)
    assert (other_root / "manifest.json").read_bytes() != (root / "manifest.json").read_bytes()
    first = next(other_root.glob("*/c000000.npz"))
    assert first.read_bytes() != next(root.glob("*/c000000.npz")).read_bytes()


def test_another_seed_keeps_the_held_out_voices_and_phrasings_unless_the_split_seed_changes(
        root: Path, other_root: Path, tmp_path: Path) -> None:
    def pools(manifest_dir: Path) -> dict[str, tuple[list[str], list[str]]]:
        splits = json.loads((manifest_dir / "manifest.json").read_text())["splits"]
        return {s: (splits[s]["voices"], splits[s]["phrasings"]) for s in splits}

    held_out = pools(root)
    assert json.loads((other_root / "manifest.json").read_text())["split_seed"] == 0
    assert pools(other_root) == held_out
    for c in load(other_root):  # new conversations, drawn from the same pools
        voices, phrasings = held_out[c.meta["split"]]
        assert f"{c.meta['voice']['name']}+{c.meta['voice']['variant']}" in voices
        assert set(c.meta["phrasing"]) <= set(phrasings)
    assert main(["data", "synth", "--out", str(tmp_path / "split1"), "--hours", "0.004", "--seed", "0",
                 "--split-seed", "1"]) == 0
    assert json.loads((tmp_path / "split1" / "manifest.json").read_text())["split_seed"] == 1
    moved = pools(tmp_path / "split1")
    assert moved["test"][0] != held_out["test"][0] and moved["test"][1] != held_out["test"][1]


def _seven_segments(mask: np.ndarray) -> str:
    """Read a seven-segment digit off its pixels: the segments lit at their centres."""
    ys, xs = np.nonzero(mask)
    top, bottom, right = ys.min(), ys.max(), xs.max()
    h = bottom - top + 1
    left, t = right - 0.6 * h, h / 7
    mid_x, mid_y = (left + right) / 2, (top + bottom) / 2
    centres = {"a": (top + t / 2, mid_x), "g": (mid_y, mid_x), "d": (bottom - t / 2, mid_x),
               "f": (top + h / 4, left + t / 2), "b": (top + h / 4, right - t / 2),
               "e": (top + 3 * h / 4, left + t / 2), "c": (top + 3 * h / 4, right - t / 2)}
    lit = "".join(sorted(seg for seg, (y, x) in centres.items() if mask[int(y), int(x)]))
    digits = {"abcdef": 0, "bc": 1, "abdeg": 2, "abcdg": 3, "bcfg": 4, "acdfg": 5, "acdefg": 6, "abc": 7,
              "abcdefg": 8, "abcdfg": 9}
    return DIGITS[digits[lit]] if lit in digits else f"unreadable {lit}"


def shows(frame: np.ndarray, answer: str) -> bool:
    """Whether a card frame shows ``answer``: its majority colour, its shape (how much of its bounding box the
    figure fills), or its digit (the lit segments)."""
    packed = (frame.astype(np.int32) << np.array([16, 8, 0])).sum(axis=2)
    values, counts = np.unique(packed, return_counts=True)
    majority = int(values[counts.argmax()])
    if answer in COLOURS:
        return (majority >> 16, majority >> 8 & 255, majority & 255) == COLOURS[answer]
    mask = packed != majority
    if answer in DIGITS:
        return _seven_segments(mask) == answer
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    low, high = {"square": (0.95, 1.0), "circle": (0.72, 0.85), "triangle": (0.44, 0.56), "star": (0.3, 0.43)}[answer]
    return bool(low <= fill <= high)


def test_every_card_shows_its_answer() -> None:
    rng = np.random.default_rng(0)
    answers = set()
    for _ in range(150):
        for kind in ("colour", "shape", "number"):
            card = Card.draw(rng, kind)
            assert shows(card.frame(), card.answer), card
            answers.add(card.answer)
    assert answers == set(COLOURS) | set(SHAPES) | set(DIGITS)


def test_the_camera_shows_the_card_around_a_visual_question(convs: list[Conv]) -> None:
    visual = [(c, q) for c in convs for q in c.meta["questions"] if q["kind"] == "visual"]
    assert visual
    for c, q in visual:
        assert not c.camera[0] and not c.camera[-1]  # on around the question only
        for k in range((q["end"] - 1) // N, q["answer_start"] // N + 1):  # the question's end to the answer
            assert c.camera[k] and shows(c.video[k], q["answer"]), (c.meta["id"], k)


def test_background_request_then_result_then_answer(convs: list[Conv]) -> None:
    asked = [(c, q) for c in convs for q in c.meta["questions"] if q["kind"] == "background"]
    assert asked
    tools = Toolbox()
    for c, q in asked:
        span = REQUEST_OPEN + q["request"] + REQUEST_CLOSE
        at = next(k for k, text in enumerate(c.meta["model_text"]) if span in text)
        assert c.meta["model_speaks"][at] and at * N >= q["end"]
        arrived = next(k for k, results in enumerate(c.meta["background"]) if results)
        assert c.meta["background"][arrived] == [q["answer"]] and arrived > at
        assert not c.meta["model_speaks"][arrived - 1] and not c.meta["model_speaks"][arrived]  # quiet, waiting
        assert q["answer_start"] > arrived * N and c.meta["model_text"][q["answer_start"] // N].startswith(q["answer"])
        _, requests = RequestSpans().feed("".join(c.meta["model_text"]))
        assert requests == [q["request"]]
        assert tools.call("calculator", {"expression": q["request"]}).text == q["answer"]  # what it would answer


def test_templates_and_number_words() -> None:
    texts = [t.text for kind in TEMPLATES.values() for t in kind]
    assert len(texts) == len(set(texts)) and all(len(kind) >= 3 for kind in TEMPLATES.values())
    for kind in TEMPLATES.values():  # not even the same words with the pause elsewhere
        said = [t.fill(a="six", op="plus", b="four", sym="+", n="five") for t in kind]
        assert len(said) == len(set(said))
    ids = [t.id for kind in TEMPLATES.values() for t in kind]
    assert len(ids) == len(set(ids)) and all(t.id.startswith(f"{t.kind}.") for k in TEMPLATES.values() for t in k)
    assert [number_words(n) for n in (0, 12, 42, 100, 144)] == [
        "zero", "twelve", "forty two", "one hundred", "one hundred forty four"]


def test_added_wordings_leave_every_earlier_template_in_its_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """A later edition of the wordings is dealt apart: every first-edition template stays in the split it had
    before there were later editions, so models trained on earlier sets stay held out from the test split (at split
    seed 0 these are the held-out wordings of every measurement in inference/README.md)."""
    names, variants = english_voices(), voice_variants()
    full = splits.Assignment.draw(0, names, variants)
    monkeypatch.setattr(splits, "EDITIONS", EDITIONS[:1])
    first = splits.Assignment.draw(0, names, variants)
    first_ids = {t.id for kind in EDITIONS[0].values() for t in kind}
    assert len(EDITIONS) > 1 and full.voices == first.voices
    for split in splits.SPLITS:
        assert set(full.phrasings(split)) & first_ids == set(first.phrasings(split))
    held_out = {t.id for kind in full.templates["test"].values() for t in kind}
    assert {"arithmetic.06", "counting.00", "statement.10", "statement.14"} <= held_out
    added = {t.id for kind in EDITIONS[1].values() for t in kind}
    for split in splits.SPLITS:  # each added kind has wordings of its own in every split
        for kind in EDITIONS[1]:
            assert any(t.id in added for t in full.templates[split][kind]), (split, kind)


def test_synth_wants_an_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(FileExistsError):
        main(["data", "synth", "--out", str(tmp_path), "--hours", "0.001"])


def test_some_microphones_send_digital_silence(convs: list[Conv]) -> None:
    """A share of conversations has no noise floor: outside the user's speech its samples are exactly zero, as a
    browser's fake or noise-suppressed microphone sends them; the others never do."""
    for c in convs:
        outside = ~within(c.meta["user_speech"], len(c.user))
        if c.meta["noise"]["colour"] == "none":
            assert c.meta["noise"]["rms"] == 0.0 and not c.user[outside].any(), c.meta["id"]
        else:
            assert np.count_nonzero(c.user[outside]) > 0.99 * np.count_nonzero(outside), c.meta["id"]
    assert any(c.meta["noise"]["colour"] == "none" for c in convs)
