"""The duplex evaluator's metrics on hand-built timelines with known answers."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from inference.duplex_eval import ConversationScore, Played, Recogniser, score, speech_spans, spoken, summarise

SR = 16_000


def tone(seconds: float, spans: list[tuple[float, float]], hz: float = 300.0) -> np.ndarray:
    """Silence with a tone in each (start, end) span (seconds)."""
    audio = np.zeros(int(seconds * SR), np.float32)
    for start, end in spans:
        t = np.arange(int(start * SR), int(end * SR))
        audio[t] = 0.3 * np.sin(2 * np.pi * hz * t / SR)
    return audio


def s(seconds: float) -> int:
    return int(seconds * SR)


def test_energy_vad_finds_utterances_and_bridges_short_gaps() -> None:
    audio = tone(5.0, [(0.5, 1.0), (1.1, 1.6), (3.0, 3.5)])  # a 100 ms gap inside the first utterance
    assert speech_spans(audio) == [(s(0.5), s(1.6)), (s(3.0), s(3.5))]
    assert speech_spans(np.zeros(SR, np.float32)) == []


def test_turn_taking_pauses_and_latency() -> None:
    meta = {
        "user_speech": [[s(0.5), s(1.5)], [s(2.3), s(3.0)], [s(5.0), s(6.0)]],
        "pauses": [[s(1.5), s(2.3)]],  # the user pauses mid-question for 0.8 s
        "questions": [{"kind": "arithmetic", "end": s(3.0), "answer": "twelve", "answer_start": s(3.2)},
                      {"kind": "counting", "end": s(6.0), "answer": "four", "answer_start": s(6.2)}],
    }
    # waits through the pause, answers the first question 0.3 s after its end, never answers the second
    played = Played(tone(8.0, [(3.3, 4.0)]), {16: "twel", 17: "ve"})
    got = score(meta, played)
    assert (got.pauses, got.pause_takeovers) == (1, 0)
    assert (got.turns, got.turn_takeovers) == (2, 1)
    assert got.turn_latencies == [pytest.approx(0.3, abs=0.02)]
    assert [a[3] for a in got.answers] == [True, False]  # caption text of the answer window
    impatient = score(meta, Played(tone(8.0, [(1.7, 2.0), (3.3, 4.0)])))  # talks into the pause
    assert impatient.pause_takeovers == 1
    summary = summarise([got, impatient])
    assert summary["pause_tor"] == 0.5 and summary["turn_tor"] == 0.5
    assert summary["n_conversations"] == 2 and summary["answer_acc_text"] == 0.25


def test_typed_questions_are_timed_apart_from_spoken_ones() -> None:
    """A typed question has no end of speech: its reply, which waits for the text to be read, is counted in
    ``typed_tor`` / ``typed_latency_s`` and leaves the spoken turn-taking figures alone."""
    meta = {
        "user_speech": [[s(0.5), s(1.5)]],
        "questions": [{"kind": "arithmetic", "end": s(1.5), "answer": "five", "answer_start": s(1.6)},
                      {"kind": "typed", "end": s(3.0), "answer": "one two", "answer_start": s(4.0)},
                      {"kind": "typed", "end": s(6.0), "answer": "one", "answer_start": s(7.0)}],
    }
    # answers the spoken question 0.3 s after its end, the first typed one 1.2 s after it was sent, not the second
    got = score(meta, Played(tone(9.0, [(1.8, 2.4), (4.2, 4.8)])))
    assert (got.turns, got.turn_takeovers, got.turn_latencies) == (1, 1, [pytest.approx(0.3, abs=0.02)])
    assert (got.typed_turns, got.typed_takeovers, got.typed_latencies) == (2, 1, [pytest.approx(1.2, abs=0.02)])
    summary = summarise([got])
    assert summary["turn_tor"] == 1.0 and summary["turn_latency_s"]["p50"] == pytest.approx(0.3, abs=0.02)
    assert summary["typed_tor"] == 0.5 and summary["typed_latency_s"]["p50"] == pytest.approx(1.2, abs=0.02)
    assert len(got.answers) == 3  # answers are scored whichever way the question came


def test_interruptions_stop_time_and_answer() -> None:
    meta = {
        "user_speech": [[s(0.5), s(1.0)], [s(2.0), s(2.8)]],
        "overlaps": [[s(2.0), s(2.8)]],  # the user starts talking at 2.0 s while the model speaks
        "questions": [],
    }
    stops_and_answers = Played(tone(5.0, [(1.2, 2.3), (3.1, 3.6)]))
    got = score(meta, stops_and_answers)
    assert got.interrupt_stops == [pytest.approx(0.3, abs=0.02)] and got.interrupt_answers == 1
    talks_on = score(meta, Played(tone(5.0, [(1.2, 2.8)])))
    assert talks_on.interrupt_stops == [pytest.approx(0.8, abs=0.02)] and talks_on.interrupt_answers == 0
    summary = summarise([got, talks_on])
    assert summary["interrupt_tor"] == 0.5
    assert summary["interrupt_stop_s"]["p50"] == pytest.approx(0.55, abs=0.02)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_spoken_answers_are_recognised_among_the_candidates(tmp_path: Path) -> None:
    def say(text: str) -> np.ndarray:
        wav = tmp_path / "a.wav"
        subprocess.run(["espeak-ng", "-w", str(wav), text], check=True)
        raw = subprocess.run(["sox", str(wav), "-t", "raw", "-r", "16000", "-c", "1", "-b", "16", "-e", "signed",
                              "-"], check=True, capture_output=True).stdout
        return np.frombuffer(raw, "<i2").astype(np.float32) / 32768

    recognise = Recogniser(["twelve", "four", "red", "circle", "seven"])
    assert recognise(say("twelve")) == "twelve"
    assert recognise(say("red")) == "red"
    meta = {"user_speech": [[s(0.2), s(1.0)]],
            "questions": [{"kind": "visual", "end": s(1.0), "answer": "red", "answer_start": s(1.3)}]}
    answer = say("red")
    audio = np.zeros(s(4.0), np.float32)
    audio[s(1.3): s(1.3) + len(answer)] = answer
    right = score(meta, Played(audio), recognise)
    wrong_audio = np.zeros(s(4.0), np.float32)
    seven = say("seven")
    wrong_audio[s(1.3): s(1.3) + len(seven)] = seven
    wrong = score(meta, Played(wrong_audio), recognise)
    summary = summarise([right, wrong])
    assert summary["answer_acc_audio"] == 0.5 and summary["visual_acc"] == 0.5
    assert summary["answers_by_kind"] == {"visual": {"n": 2, "audio": 0.5, "text": 0.0}}


def test_answers_are_split_by_kind() -> None:
    answers = [("arithmetic", "five", True, True), ("arithmetic", "six", False, True), ("visual", "red", False, False)]
    assert summarise([ConversationScore(answers=answers[:2]), ConversationScore(answers=answers[2:])])[
        "answers_by_kind"] == {"arithmetic": {"n": 2, "audio": 0.5, "text": 1.0},
                               "visual": {"n": 1, "audio": 0.0, "text": 0.0}}


def test_the_runner_kills_its_gateway_when_a_drain_would_hold_its_results() -> None:
    """The runner ends its own gateway with ``microturn.local.stop(kill=True)``: one that drains in time ends on
    SIGTERM; one that does not (a session it still counts as live) is killed, instead of raising and losing a run's
    results. Without ``kill`` the one that does not drain raises, as the tests that check a drain need."""
    from microturn.local import stop

    def started(ignores_sigterm: bool) -> subprocess.Popen[bytes]:
        code = ("import signal, time\n" + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignores_sigterm else "")
                + "print('ready', flush=True)\ntime.sleep(60)")
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        return proc

    drains, held = started(False), started(True)
    stop(drains, timeout=2, kill=True)
    stop(held, timeout=2, kill=True)
    assert drains.returncode == -signal.SIGTERM
    assert held.returncode == -signal.SIGKILL
    held = started(True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            stop(held, timeout=0.5)
    finally:
        held.kill()
        held.wait()


async def test_the_runner_plays_conversations_time_aligned_through_webrtc_and_offline(tmp_path: Path) -> None:
    """With the echo diagnostic the model's speech is the user's one micro-turn later: offline exactly 0.2 s later,
    through the gateway 0.2 s plus the path's overhead, so the runner's clocks line up with the labels."""
    from inference.conversation import Conversation
    from inference.echo import EchoModel
    from microturn.eval_duplex import eval_duplex, play_offline, play_webrtc
    from tests.conftest import loopback_settings, start_gateway
    from tests.test_trainer import write_conversation

    conv = Conversation.load(write_conversation(tmp_path / "test", "c0", 0))
    (user_start, user_end), = conv.meta["user_speech"]
    offline = speech_spans(play_offline(conv, EchoModel()).audio)
    assert offline[0][0] - user_start == pytest.approx(0.2 * SR, abs=0.02 * SR)
    server = await start_gateway(loopback_settings())
    try:
        live = speech_spans((await play_webrtc(conv, str(server.make_url("/")))).audio)
    finally:
        await server.close()
    assert len(live) == 1, live
    delay = (live[0][1] - user_end) / SR  # the end of speech: the start may lose a packet while ICE settles
    assert 0.2 <= delay <= 0.35, delay  # one micro-turn plus the WebRTC path (idle machine: ≈ 0.25 s)

    result = await asyncio.to_thread(eval_duplex, None, tmp_path, "offline", None, tmp_path / "timeline.png",
                                     "cpu", "echo", 0, tmp_path / "scores.jsonl")
    assert set(result) >= {"pause_tor", "turn_tor", "turn_latency_s", "interrupt_stop_s", "interrupt_tor",
                           "answer_acc_audio", "answer_acc_text", "visual_acc", "n_conversations"}
    assert result["n_conversations"] == 1
    assert (tmp_path / "timeline.png").read_bytes()[:4] == b"\x89PNG"
    line, = (json.loads(x) for x in (tmp_path / "scores.jsonl").read_text().splitlines())
    assert line["id"] == "c0" and line["scenario"] == "test" and line["turns"] == 1  # the conversation's own counts
    assert line["turn_takeovers"] / line["turns"] == result["turn_tor"] == 0.0  # the echo still talks at the end
    (kind, expected, audio_ok, text_ok), = line["answers"]
    assert (kind, expected, audio_ok) == ("visual", "red", False) and text_ok == (result["answer_acc_text"] == 1.0)


def test_digit_answers_are_recognised_as_spoken_and_interrupted_answers_are_not_scored() -> None:
    assert spoken("492") == "four hundred and ninety two"
    assert spoken("1771") == "one thousand seven hundred and seventy one"
    assert spoken("40") == "forty" and spoken("7") == "seven" and spoken("twelve") == "twelve"
    meta = {"user_speech": [[s(0.2), s(1.0)], [s(1.8), s(2.4)]], "overlaps": [[s(1.8), s(2.4)]],
            "questions": [{"kind": "arithmetic", "end": s(1.0), "answer": "twelve", "interrupted": True},
                          {"kind": "arithmetic", "end": s(2.4), "answer": "four", "interrupted": False}]}
    got = score(meta, Played(tone(4.0, [(1.3, 1.9), (2.7, 3.0)]), {13: "four"}))
    assert [a[1] for a in got.answers] == ["four"]  # the cut-off answer is not counted as a miss


def test_the_teacher_forced_diagnostic_speaks_exactly_the_target_micro_turns(tmp_path: Path) -> None:
    """``--model teacher-forced``: the shipped audio head speaks where the targets speak, and nowhere else: exact
    silence outside the target's micro-turns, sound in every one of them, and speech from the first. The last is
    the word's fading tail, quieter than the VAD's speech (-45 dBFS; the seventh checkpoint's tail -50, the
    eighth's -57), so it counts as sound, not speech: above -90 dBFS, what a 16-bit stream carries (its
    quantization floor is -96), where a micro-turn the head is not asked to speak is exact zeros and Griffin-Lim of
    the silent mel is near -140."""
    from inference.checkpoint import SHIPPED, load_checkpoint
    from inference.conversation import Conversation
    from microturn.audio import rms_dbfs
    from microturn.contracts import MICRO_TURN_SAMPLES
    from microturn.eval_duplex import play_teacher_forced
    from tests.test_trainer import write_conversation

    conv = Conversation.load(write_conversation(tmp_path, "c0", 0))
    played = play_teacher_forced(conv, load_checkpoint(SHIPPED))
    (start, end), = conv.meta["model_speech"]
    assert not played.audio[:start].any() and not played.audio[end:].any()
    turns = played.audio[start:end].reshape(-1, MICRO_TURN_SAMPLES)
    assert all(rms_dbfs(turn) > -90 for turn in turns), [rms_dbfs(turn) for turn in turns]
    spans = speech_spans(played.audio)
    assert spans and spans[0][0] - start < 0.2 * SR, spans
    assert "".join(played.captions.values()) == "it is red"
