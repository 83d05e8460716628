"""``microturn eval duplex``: full-duplex behaviour of a model on held-out conversations, in the style of
Full-Duplex-Bench v1 (reimplemented from its paper's definitions; its code is not used).

A conversation of the test split is played to the model — through the real path (gateway + browser-like probe,
time-aligned, ``--via webrtc``) or offline (the engine's model stepped directly, output k placed at micro-turn
k + 1) — and the model's audio and captions are recorded. Speech activity of the model comes from an energy
detector on its audio (20 ms frames above :data:`VAD_DBFS`, gaps shorter than :data:`VAD_HANG_S` bridged); the
user's is the generator's exact labels. Metrics:

- ``pause_tor``: of the user's mid-question pauses, the fraction in which the model takes the turn (starts speaking
  inside the pause). Lower is better.
- ``turn_tor`` and ``turn_latency_s``: of the questions the user finishes speaking, the fraction the model answers
  (starts speaking within :data:`ANSWER_WINDOW_S` of the end and before the user speaks again), and the time from the
  end of the user's speech to the start of the model's. ``typed_tor`` and ``typed_latency_s``: the same for typed
  questions, timed from the micro-turn the text was sent in; they are apart because a typed question has no end of
  speech, and its reply waits for the model to read the text (at most four bytes a micro-turn on ``tiny``).
- ``interrupt_stop_s`` and ``interrupt_tor``: when the user talks over the model, how long the model's speech goes on
  after the user's onset; and the fraction of those interruptions whose new question the model then answers.
- ``answer_acc_audio``: spoken answers recognised by pocketsphinx (en-us, shipped in its wheel), constrained to the
  candidate answers of the test set: one of the model's utterances between the question's end and the user's next
  speech is recognised as the expected answer; ``answer_acc_text``: the captions of the answer
  window contain it; ``visual_acc``: ``answer_acc_audio`` over the visual questions; ``answers_by_kind``: both
  accuracies for each kind of question (arithmetic, counting, visual, …), to tell which ones the model gets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inference.synth.phrasing import espeak_number_words
from microturn.contracts import MICRO_TURN_SAMPLES, SAMPLE_RATE

VAD_DBFS = -45.0
VAD_FRAME = SAMPLE_RATE // 50  # 20 ms
VAD_HANG_S = 0.3  # silences shorter than this inside an utterance do not end it
ANSWER_WINDOW_S = 2.0  # a model that starts later than this after the user's end did not take the turn


@dataclass
class Played:
    """What the model did during one conversation, on the conversation's timeline (sample 0 = its start)."""

    audio: np.ndarray  # (N,) float32 16 kHz, the model's output
    captions: dict[int, str] = field(default_factory=dict)  # micro-turn index → caption text produced for it


def speech_spans(audio: np.ndarray, dbfs: float = VAD_DBFS, hang_s: float = VAD_HANG_S) -> list[tuple[int, int]]:
    """Energy VAD: [start, end) sample spans where the signal speaks."""
    n = len(audio) // VAD_FRAME
    if n == 0:
        return []
    frames = audio[: n * VAD_FRAME].reshape(n, VAD_FRAME).astype(np.float64)
    level = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
    active = level > dbfs
    spans: list[tuple[int, int]] = []
    hang = int(hang_s * 50)
    k = 0
    while k < n:
        if not active[k]:
            k += 1
            continue
        start = k
        end = k + 1
        while end < n:
            if active[end]:
                end += 1
                continue
            gap = end
            while gap < n and not active[gap] and gap - end < hang:
                gap += 1
            if gap < n and active[gap] and gap - end < hang:
                end = gap
            else:
                break
        spans.append((start * VAD_FRAME, end * VAD_FRAME))
        k = end
    return spans


def _onset_in(spans: Sequence[tuple[int, int]], lo: int, hi: int) -> int | None:
    """The first sample in [lo, hi) where a span is active (a span already running at lo counts at lo)."""
    for start, end in spans:
        if end > lo and start < hi:
            return max(start, lo)
    return None


def _active_until(spans: Sequence[tuple[int, int]], at: int) -> int | None:
    """End of the span active at sample ``at``; None if none is."""
    for start, end in spans:
        if start <= at < end:
            return end
    return None


@dataclass
class ConversationScore:
    pauses: int = 0
    pause_takeovers: int = 0
    turns: int = 0
    turn_takeovers: int = 0
    turn_latencies: list[float] = field(default_factory=list)
    typed_turns: int = 0
    typed_takeovers: int = 0
    typed_latencies: list[float] = field(default_factory=list)
    interruptions: int = 0
    interrupt_stops: list[float] = field(default_factory=list)
    interrupt_answers: int = 0
    answers: list[tuple[str, str, bool, bool]] = field(default_factory=list)  # kind, expected, audio ok, text ok


def score(meta: dict[str, Any], played: Played, recognise: Any = None) -> ConversationScore:
    """Score one conversation (its generator labels ``meta``) given what the model did.

    ``recognise(audio) -> str`` turns an answer's audio into one of the candidate answers (None: audio answers are
    not scored, only captions)."""
    s = ConversationScore()
    model = speech_spans(played.audio)
    user = sorted((int(a), int(b)) for a, b in meta["user_speech"])
    user_starts = sorted(start for start, _ in user)

    def next_user_start(after: int) -> int:
        return next((u for u in user_starts if u > after), len(played.audio))

    for start, end in meta.get("pauses", []):
        s.pauses += 1
        if _onset_in(model, start, end) is not None and _active_until(model, start) is None:
            s.pause_takeovers += 1
    for q in meta.get("questions", []):
        end = int(q["end"])
        if q["kind"] == "greeting":
            continue
        typed = q["kind"] == "typed"
        if typed:
            s.typed_turns += 1
        else:
            s.turns += 1
        horizon = min(end + int(ANSWER_WINDOW_S * SAMPLE_RATE), next_user_start(end))
        onset = _onset_in(model, end, horizon)
        if onset is not None and _active_until(model, end) is None:
            if typed:
                s.typed_takeovers += 1
                s.typed_latencies.append((onset - end) / SAMPLE_RATE)
            else:
                s.turn_takeovers += 1
                s.turn_latencies.append((onset - end) / SAMPLE_RATE)
        if q.get("interrupted"):
            continue  # the user cut the answer off: scored as an interruption, not as an answer
        answered_until = next_user_start(end)
        first, last = end // MICRO_TURN_SAMPLES, answered_until // MICRO_TURN_SAMPLES + 1
        caption = "".join(played.captions.get(k, "") for k in range(first, last + 1)).lower()
        expected = str(q["answer"]).lower()
        pad = SAMPLE_RATE // 10  # the detector cuts close; the recogniser wants the edges of the words
        utterances = [played.audio[max(end, a - pad):b + pad] for a, b in model if b > end and a < answered_until]
        audio_ok = recognise is not None and any(recognise(u) == spoken(expected) for u in utterances)
        s.answers.append((str(q["kind"]), expected, audio_ok, expected in caption))
    for onset in meta.get("overlaps", []):
        at = int(onset[0] if isinstance(onset, list | tuple) else onset)
        s.interruptions += 1
        until = _active_until(model, at)
        s.interrupt_stops.append(0.0 if until is None else (until - at) / SAMPLE_RATE)
        asked_end = next((e for st, e in user if st <= at < e or st >= at), None)
        if asked_end is not None:
            later = _onset_in(model, asked_end, min(asked_end + int(ANSWER_WINDOW_S * SAMPLE_RATE),
                                                    next_user_start(asked_end)))
            if later is not None:
                s.interrupt_answers += 1
    return s


def _pct(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None}
    return {"p50": round(float(np.quantile(values, 0.5)), 3), "p90": round(float(np.quantile(values, 0.9)), 3)}


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 3) if den else None


def summarise(scores: list[ConversationScore]) -> dict[str, Any]:
    """The JSON ``microturn eval duplex`` prints."""
    answers = [a for s in scores for a in s.answers]
    by_kind = {kind: [a for a in answers if a[0] == kind] for kind in sorted({a[0] for a in answers})}
    visual = by_kind.get("visual", [])
    return {
        "pause_tor": _ratio(sum(s.pause_takeovers for s in scores), sum(s.pauses for s in scores)),
        "turn_tor": _ratio(sum(s.turn_takeovers for s in scores), sum(s.turns for s in scores)),
        "turn_latency_s": _pct([x for s in scores for x in s.turn_latencies]),
        "typed_tor": _ratio(sum(s.typed_takeovers for s in scores), sum(s.typed_turns for s in scores)),
        "typed_latency_s": _pct([x for s in scores for x in s.typed_latencies]),
        "interrupt_stop_s": _pct([x for s in scores for x in s.interrupt_stops]),
        "interrupt_tor": _ratio(sum(s.interrupt_answers for s in scores), sum(s.interruptions for s in scores)),
        "answer_acc_audio": _ratio(sum(a[2] for a in answers), len(answers)),
        "answer_acc_text": _ratio(sum(a[3] for a in answers), len(answers)),
        "visual_acc": _ratio(sum(a[2] for a in visual), len(visual)),
        "answers_by_kind": {kind: {"n": len(mine), "audio": _ratio(sum(a[2] for a in mine), len(mine)),
                                   "text": _ratio(sum(a[3] for a in mine), len(mine))}
                            for kind, mine in by_kind.items()},
        "n_conversations": len(scores),
    }


class Recogniser:
    """pocketsphinx (en-us, from its wheel) constrained to the candidate answers: which of them an utterance is."""

    def __init__(self, candidates: Sequence[str]) -> None:
        from pocketsphinx import Decoder

        self.decoder = Decoder(samprate=SAMPLE_RATE, lm=None, loglevel="FATAL")
        known = self.decoder.lookup_word
        answers = sorted({c.lower() for c in candidates if c.strip() and all(known(w) for w in c.lower().split())})
        grammar = "#JSGF V1.0;\ngrammar answers;\npublic <answer> = " + " | ".join(answers) + " ;\n"
        self.decoder.add_jsgf_string("answers", grammar.encode())
        self.decoder.activate_search("answers")

    def __call__(self, audio: np.ndarray) -> str:
        pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
        self.decoder.start_utt()
        self.decoder.process_raw(pcm, full_utt=True)
        self.decoder.end_utt()
        hyp = self.decoder.hyp()
        return hyp.hypstr.strip().lower() if hyp is not None else ""


def plot_timelines(items: list[tuple[str, dict[str, Any], Played]], path: Path) -> None:
    """User (labels) and model (detected) speech of a few conversations, one row pair each, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(items), 1, figsize=(10, 1.2 * len(items) + 0.6), dpi=100, squeeze=False)
    for ax, (name, meta, played) in zip(axes[:, 0], items, strict=True):
        for start, end in meta["user_speech"]:
            ax.broken_barh([(start / SAMPLE_RATE, (end - start) / SAMPLE_RATE)], (1, 0.8), color="tab:blue")
        for start, end in speech_spans(played.audio):
            ax.broken_barh([(start / SAMPLE_RATE, (end - start) / SAMPLE_RATE)], (0, 0.8), color="tab:orange")
        ax.set_yticks([0.4, 1.4], ["model", "user"])
        ax.set_title(f"{name} ({meta.get('scenario', '?')})", fontsize=8, loc="left")
        ax.set_xlim(0, len(played.audio) / SAMPLE_RATE)
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def candidates(metas: list[dict[str, Any]]) -> list[str]:
    """Every expected answer of the set, as spoken: what the recogniser may choose from."""
    return sorted({spoken(str(q["answer"]).lower()) for m in metas for q in m.get("questions", [])})


def spoken(answer: str) -> str:
    """An answer as words: digits (e.g. a background result, "1771") as espeak-ng says them ("one thousand seven
    hundred and seventy one"); words unchanged."""
    return espeak_number_words(int(answer)) if answer.isdigit() and len(answer) <= 6 else answer
