"""The timeline of one conversation: utterances, typed text, background results and camera frames placed at exact
samples of the 16 kHz timeline, and every label that follows from where they were placed.

Timing rules (all in samples; micro-turn ``k`` is samples ``[3200 k, 3200 (k + 1))``):

- the model's response to a cue starts at the first sample of micro-turn ``cue + LATENCY_TURNS`` (1): the cue is the
  micro-turn holding the user's last speech sample, or the micro-turn in which a typed text or background result has
  been read in full at :data:`TEXT_BYTES_PER_TURN` bytes a micro-turn (its marker byte included);
- a model utterance that the user talks over stops at the first sample of micro-turn ``onset + STOP_TURNS`` (1),
  where ``onset`` is the micro-turn holding the user's first speech sample, after a 20 ms fade-out; the rest of it
  was never said.

Both are one micro-turn because the path adds one more: the model writes micro-turn ``k``'s output after hearing
micro-turn ``k`` in full, and the gateway plays it during micro-turn ``k + 1``. A model that says its targets exactly
is therefore heard 200–400 ms after the user's end (p50 about 0.3 s) and goes quiet 200–400 ms after the user's
onset; with two micro-turns in the targets it could do no better than 400–600 ms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from inference.synth.captions import caption_pieces
from inference.synth.noise import LEVEL_DBFS, Noise, utterance_gain
from inference.synth.speech import speak
from inference.synth.voices import MODEL_VOICE, Voice
from microturn.contracts import MICRO_TURN_SAMPLES, SAMPLE_RATE, VIDEO_HEIGHT, VIDEO_WIDTH

LATENCY_TURNS = 1
TEXT_BYTES_PER_TURN = 4
"""How fast the model reads text input: the ``tiny`` preset's text slots per micro-turn (the fewest of any preset)."""
STOP_TURNS = 1
FADE = SAMPLE_RATE // 50  # 20 ms
MIN_TURNS = 25  # a conversation lasts at least 5 s
MODEL_PEAK = 0.5  # the model's speech level (−6 dBFS peak)

Span = tuple[int, int]


def turn_of(sample: int) -> int:
    """The micro-turn that holds ``sample``."""
    return sample // MICRO_TURN_SAMPLES


def speech_cue(span: Span) -> int:
    """The cue of a user utterance: the micro-turn holding its last sample."""
    return turn_of(span[1] - 1)


def text_cue(turn: int, text: str) -> int:
    """The cue of a text that arrives in micro-turn ``turn``: the micro-turn in which its last byte is read."""
    return turn + -(-(len(text.encode()) + 1) // TEXT_BYTES_PER_TURN) - 1


@dataclass(frozen=True)
class Question:
    """A question the model answers, for the evaluator."""

    kind: str  # arithmetic | counting | visual | typed | background | greeting
    end: int  # sample where the user's question ends (a typed text: the start of its micro-turn)
    answer: str  # canonical answer; the model's answer utterance starts with it
    answer_start: int  # sample where the model's answer speech starts
    interrupted: bool = False  # the user talked over the answer, which was cut short
    request: str = ""  # background questions: the request the model writes in its caption


@dataclass
class _Utterance:
    start: int
    audio: np.ndarray
    text: str
    request: str
    length: int  # samples of the full rendering (the audio may have been cut shorter)


@dataclass
class Episode:
    """One rendered conversation: the media streams and their labels (see :mod:`inference.synth` for the format)."""

    id: str
    split: str
    scenario: str
    voice: Voice
    noise: Noise
    phrasing: list[str]
    user_audio: np.ndarray  # (T·3200,) float32
    model_audio: np.ndarray  # (T·3200,) float32
    video: np.ndarray  # (T, 120, 160, 3) uint8
    camera: np.ndarray  # (T,) bool
    user_text: list[list[str]]
    background: list[list[str]]
    model_text: list[str]
    model_speaks: list[bool]
    user_speech: list[Span]
    user_speech_text: list[str]
    model_speech: list[Span]
    pauses: list[Span]
    overlaps: list[Span]
    questions: list[Question]

    @property
    def turns(self) -> int:
        return len(self.camera)

    @property
    def seconds(self) -> float:
        return len(self.user_audio) / SAMPLE_RATE


@dataclass
class Timeline:
    """A conversation under construction; ``cursor`` is where the user's next action goes."""

    rng: np.random.Generator
    voice: Voice
    noise: Noise
    cursor: int = 0
    pauses: list[Span] = field(default_factory=list)
    overlaps: list[Span] = field(default_factory=list)
    questions: list[Question] = field(default_factory=list)
    _level_db: float = 0.0
    _user: list[tuple[int, np.ndarray, str]] = field(default_factory=list)
    _model: list[_Utterance] = field(default_factory=list)
    _typed: dict[int, list[str]] = field(default_factory=dict)
    _background: dict[int, list[str]] = field(default_factory=dict)
    _camera: list[tuple[int, int, np.ndarray]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._level_db = float(self.rng.uniform(*LEVEL_DBFS))

    def wait(self, low: float, high: float) -> None:
        """Move the cursor on by ``low``–``high`` seconds."""
        self.cursor += int(self.rng.uniform(low, high) * SAMPLE_RATE)

    def say(self, text: str, continuing: bool = False) -> Span:
        """The user says ``text`` from the cursor; the cursor moves to its end. ``continuing``: the user goes on
        after a pause, and ``text`` ends as an unfinished clause does (:func:`speak`)."""
        audio = speak(self.voice, text, continuing) * utterance_gain(self.rng, self._level_db)
        span = (self.cursor, self.cursor + len(audio))
        self._user.append((self.cursor, audio, text))
        self.cursor = span[1]
        return span

    def pause(self, low: float, high: float) -> Span:
        """The user pauses mid-turn for ``low``–``high`` seconds (labelled: the model must stay silent)."""
        start = self.cursor
        self.wait(low, high)
        self.pauses.append((start, self.cursor))
        return start, self.cursor

    def type(self, text: str) -> int:
        """The user types ``text``: it arrives in the first micro-turn that starts at or after the cursor, whose
        start the cursor moves to. Returns that micro-turn."""
        turn = -(-self.cursor // MICRO_TURN_SAMPLES)
        self._typed.setdefault(turn, []).append(text)
        self.cursor = turn * MICRO_TURN_SAMPLES
        return turn

    def deliver(self, turn: int, result: str) -> None:
        """A background result arrives as input in micro-turn ``turn``."""
        self._background.setdefault(turn, []).append(result)

    def reply(self, cue: int, text: str, request: str = "") -> Span:
        """The model says ``text`` in response to ``cue`` (writing ``request`` as a background request span in its
        caption); the cursor moves past its end if it is not there yet."""
        start = (cue + LATENCY_TURNS) * MICRO_TURN_SAMPLES
        if self._model and start < self._model[-1].start + len(self._model[-1].audio):
            raise ValueError("a model utterance may not start before the previous one ends")
        audio = speak(MODEL_VOICE, text) * MODEL_PEAK
        self._model.append(_Utterance(start, audio, text, request, len(audio)))
        self.cursor = max(self.cursor, start + len(audio))
        return start, start + len(audio)

    def interrupt(self, onset: int) -> int:
        """The user starts speaking at ``onset`` while the model speaks: its utterance stops ``STOP_TURNS``
        micro-turns on (faded out). Returns the sample where it stops."""
        said = self._model[-1]
        stop = (turn_of(onset) + STOP_TURNS) * MICRO_TURN_SAMPLES
        if not said.start <= onset < stop < said.start + len(said.audio):
            raise ValueError("interrupt() needs a user onset well inside the model's last utterance")
        audio = said.audio[:stop - said.start].copy()
        audio[-FADE:] *= np.linspace(1.0, 0.0, FADE, endpoint=False, dtype=np.float32)
        said.audio = audio
        self.overlaps.append((onset, stop))
        return stop

    def show(self, frame: np.ndarray, start: int, end: int) -> None:
        """The camera shows ``frame`` in the micro-turns that hold samples ``[start, end)``."""
        self._camera.append((turn_of(start), turn_of(end - 1) + 1, frame))

    def finish(self, id: str, split: str, scenario: str, phrasing: list[str], tail: float) -> Episode:
        """The conversation, ``tail`` seconds of silence after the cursor (at least :data:`MIN_TURNS`)."""
        ends = [self.cursor, *(u.start + len(u.audio) for u in self._model)]
        turns = max(-(-(max(ends) + int(tail * SAMPLE_RATE)) // MICRO_TURN_SAMPLES), MIN_TURNS,
                    *(last for _, last, _ in self._camera), *(t + 1 for t in [*self._typed, *self._background]))
        n = turns * MICRO_TURN_SAMPLES
        user = self.noise.render(self.rng, n)
        for start, audio, _ in self._user:
            user[start:start + len(audio)] += audio
        model = np.zeros(n, np.float32)
        model_text = [""] * turns
        for u in self._model:
            model[u.start:u.start + len(u.audio)] = u.audio
            for turn, piece in caption_pieces(u.text, u.start, u.length, u.start + len(u.audio), u.request).items():
                model_text[turn] += piece
        model_speech = [(u.start, u.start + len(u.audio)) for u in self._model]
        video = np.zeros((turns, VIDEO_HEIGHT, VIDEO_WIDTH, 3), np.uint8)
        camera = np.zeros(turns, bool)
        for first, last, frame in self._camera:
            video[first:last] = frame
            camera[first:last] = True
        return Episode(
            id=id, split=split, scenario=scenario, voice=self.voice, noise=self.noise, phrasing=phrasing,
            user_audio=np.clip(user, -1.0, 1.0).astype(np.float32), model_audio=model, video=video, camera=camera,
            user_text=[self._typed.get(k, []) for k in range(turns)],
            background=[self._background.get(k, []) for k in range(turns)],
            model_text=model_text,
            model_speaks=[any(s < (k + 1) * MICRO_TURN_SAMPLES and e > k * MICRO_TURN_SAMPLES
                              for s, e in model_speech) for k in range(turns)],
            user_speech=[(s, s + len(a)) for s, a, _ in self._user], user_speech_text=[t for _, _, t in self._user],
            model_speech=model_speech, pauses=self.pauses, overlaps=self.overlaps, questions=self.questions,
        )
