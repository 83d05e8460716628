"""The scenarios: scripts of two-party conversations, written onto a :class:`~inference.synth.timeline.Timeline`.

=================  ==================================================================================================
``greeting``       the user greets, the model greets back ("hello! how can I help?"); sometimes a question follows
``question``       1–3 spoken questions with checkable answers: small arithmetic, single digits plus or minus
                   ("what is seven plus five" → "twelve"), counting ("count to four" → "one two three four")
``visual``         1–2 cards shown on the camera, each with "what colour / shape / number is this"; the camera is on
                   from 0.4–1.2 s before the question until 0.2–0.8 s after the answer
``pause``          1–2 questions (arithmetic, counting or visual) with a 0.6–1.2 s pause mid-question: at the
                   wording's pause mark or after a word drawn at random (:data:`MARKED_PAUSES`); the part before the
                   pause ends as an unfinished clause does (level or rising pitch: ``speak(continuing)``)
``interruption``   the user asks the model to count to 6–10 and, while it counts, asks an arithmetic question; the
                   model stops at the end of the micro-turn in which the user starts and answers the new question
``long``           a long statement: 2–4 sentences with 0.25–0.6 s pauses, each but the last ending unfinished; the
                   model stays quiet, and half the time acknowledges the end with a backchannel ("mm-hm.")
``typed``          1–2 typed questions (arithmetic with digits, counting); the model answers in speech
``silence``        4–12 s of silence, half the time with a card on the camera and no question; the model stays quiet
``background``     a request for the background model ("can you work out 123 times 4"): the model says a filler with
                   the request in its caption, the result ("492") arrives as background input 0.4–2 s after the
                   filler, and the model says it
=================  ==================================================================================================

Spoken numbers are words ("seven plus five"); the answers are plain lowercase words too ("twelve", "thirty two",
"one two three"), except background results, which the model reads out as they arrive (digits). Every conversation
starts with 0.3–1.5 s of silence, exchanges are 0.5–1.5 s apart, and it ends 0.4–1.2 s after the last thing said.
"""

from __future__ import annotations

from collections.abc import Callable

from inference.synth.cards import Card
from inference.synth.phrasing import Template, number_words
from inference.synth.timeline import MICRO_TURN_SAMPLES, Question, Span, Timeline, speech_cue, text_cue

SCENARIOS = ("greeting", "question", "visual", "pause", "interruption", "long", "typed", "silence", "background")

GREETING_REPLY = "hello! how can I help?"
FILLERS = ("let me check that.", "one moment, let me work it out.", "hold on, I will check.")
BACKCHANNELS = ("mm-hm.", "I see.", "okay.")
MARKED_PAUSES = 0.5
"""The share of mid-question pauses at the wording's pause mark (``|``). The others fall after a word drawn at
random, so what tells a model that a question is unfinished is what has been said, not where each wording pauses
(a held-out wording may pause where no training wording does)."""
_OPS: dict[str, tuple[str, Callable[[int, int], int]]] = {
    "plus": ("+", lambda a, b: a + b), "minus": ("-", lambda a, b: a - b), "times": ("*", lambda a, b: a * b),
}


class Director:
    """Writes one scenario onto a timeline, with templates from one split and draws from one generator."""

    def __init__(self, timeline: Timeline, templates: dict[str, tuple[Template, ...]]) -> None:
        self.tl = timeline
        self.rng = timeline.rng
        self.templates = templates
        self.phrasing: list[str] = []

    def run(self, scenario: str) -> None:
        self.tl.wait(0.3, 1.5)
        getattr(self, scenario)()

    # -- the scenarios ------------------------------------------------------------------------------------------

    def greeting(self) -> None:
        span = self.tl.say(self._pick("greeting").fill())
        reply = self.tl.reply(speech_cue(span), GREETING_REPLY)
        self.tl.questions.append(Question("greeting", span[1], "hello", reply[0]))
        if self.rng.random() < 0.5:
            self._gap()
            self._arithmetic()

    def question(self) -> None:
        for i in range(int(self.rng.integers(1, 4))):
            if i:
                self._gap()
            if self.rng.random() < 0.6:
                self._arithmetic()
            else:
                self._counting()

    def visual(self) -> None:
        for i in range(int(self.rng.integers(1, 3))):
            if i:
                self._gap()
            self._visual(pause=False)

    def pause(self) -> None:
        for i in range(int(self.rng.integers(1, 3))):
            if i:
                self._gap()
            kind = int(self.rng.integers(3))
            if kind == 0:
                self._arithmetic(pause=True)
            elif kind == 1:
                self._counting(pause=True)
            else:
                self._visual(pause=True)

    def interruption(self) -> None:
        n = int(self.rng.integers(6, 11))
        template = self._pick("counting")
        asked = self.tl.say(template.fill(n=number_words(n)))
        answer = " ".join(number_words(i) for i in range(1, n + 1))
        counting = self.tl.reply(speech_cue(asked), answer)
        earliest = counting[0] + MICRO_TURN_SAMPLES
        latest = max(counting[1] - 3 * MICRO_TURN_SAMPLES, earliest + 1)  # the cut falls well inside the count
        onset = self.tl.cursor = int(self.rng.integers(earliest, latest))
        a, op, b, result = self._sum()
        span = self.tl.say(self._pick("arithmetic").fill(a=number_words(a), op=op, b=number_words(b)))
        self.tl.interrupt(onset)
        self.tl.questions.append(Question("counting", asked[1], answer, counting[0], interrupted=True))
        reply = self.tl.reply(speech_cue(span), number_words(result))
        self.tl.questions.append(Question("arithmetic", span[1], number_words(result), reply[0]))

    def long(self) -> None:
        statements = self.templates["statement"]
        chosen = self.rng.choice(len(statements), size=min(len(statements), int(self.rng.integers(2, 5))),
                                 replace=False)
        span: Span = (0, 0)
        for i, index in enumerate(chosen):
            if i:
                self.tl.pause(0.25, 0.6)
            template = statements[int(index)]
            self.phrasing.append(template.id)
            span = self.tl.say(template.fill(), continuing=i < len(chosen) - 1)
        if self.rng.random() < 0.5:
            self.tl.reply(speech_cue(span), BACKCHANNELS[int(self.rng.integers(len(BACKCHANNELS)))])

    def typed(self) -> None:
        for i in range(int(self.rng.integers(1, 3))):
            if i:
                self._gap()
            if self.rng.random() < 0.6:
                a, op, b, total = self._sum()
                result = number_words(total)
                text = self._pick("typed_arithmetic").fill(a=a, sym=_OPS[op][0], b=b)
            else:
                n = int(self.rng.integers(2, 8))
                result = " ".join(number_words(i) for i in range(1, n + 1))
                text = self._pick("typed_counting").fill(n=n)
            turn = self.tl.type(text)
            reply = self.tl.reply(text_cue(turn, text), result)
            self.tl.questions.append(Question("typed", turn * MICRO_TURN_SAMPLES, result, reply[0]))

    def silence(self) -> None:
        start = self.tl.cursor
        self.tl.wait(4.0, 12.0)
        if self.rng.random() < 0.5:
            length = self.tl.cursor - start
            shown = start + int(self.rng.uniform(0.1, 0.4) * length)
            card = Card.draw(self.rng, ("colour", "shape", "number")[int(self.rng.integers(3))])
            self.tl.show(card.frame(), shown, shown + int(self.rng.uniform(0.3, 0.5) * length))

    def background(self) -> None:
        op = ("plus", "minus", "times")[int(self.rng.integers(3))]
        if op == "times":
            a, b = int(self.rng.integers(100, 1000)), int(self.rng.integers(3, 10))
        else:
            a, b = sorted((int(x) for x in self.rng.integers(100, 1000, size=2)), reverse=True)
        sym, compute = _OPS[op]
        result, request = str(compute(a, b)), f"{a}{sym}{b}"
        span = self.tl.say(self._pick("background").fill(a=a, op=op, b=b))
        filler = self.tl.reply(speech_cue(span), FILLERS[int(self.rng.integers(len(FILLERS)))], request=request)
        arrives = (filler[1] - 1) // MICRO_TURN_SAMPLES + int(self.rng.integers(2, 11))
        self.tl.deliver(arrives, result)
        reply = self.tl.reply(text_cue(arrives, result), result)
        self.tl.questions.append(Question("background", span[1], result, reply[0], request=request))

    # -- exchanges ----------------------------------------------------------------------------------------------

    def _arithmetic(self, pause: bool = False) -> None:
        a, op, b, total = self._sum()
        span = self._ask(self._pick("arithmetic"), {"a": number_words(a), "op": op, "b": number_words(b)}, pause)
        result = number_words(total)
        reply = self.tl.reply(speech_cue(span), result)
        self.tl.questions.append(Question("arithmetic", span[1], result, reply[0]))

    def _counting(self, pause: bool = False) -> None:
        n = int(self.rng.integers(2, 8))
        span = self._ask(self._pick("counting"), {"n": number_words(n)}, pause)
        answer = " ".join(number_words(i) for i in range(1, n + 1))
        reply = self.tl.reply(speech_cue(span), answer)
        self.tl.questions.append(Question("counting", span[1], answer, reply[0]))

    def _visual(self, pause: bool) -> None:
        card = Card.draw(self.rng, ("colour", "shape", "number")[int(self.rng.integers(3))])
        on = self.tl.cursor
        self.tl.wait(0.4, 1.2)
        span = self._ask(self._pick(card.kind), {}, pause)
        reply = self.tl.reply(speech_cue(span), card.answer)
        self.tl.questions.append(Question("visual", span[1], card.answer, reply[0]))
        self.tl.wait(0.2, 0.8)
        self.tl.show(card.frame(), on, self.tl.cursor)

    def _ask(self, template: Template, values: dict[str, str], pause: bool) -> Span:
        if not pause:
            return self.tl.say(template.fill(**values))
        head, tail = self._halves(template, values)
        first = self.tl.say(head, continuing=True)
        self.tl.pause(0.6, 1.2)
        return first[0], self.tl.say(tail)[1]

    def _halves(self, template: Template, values: dict[str, str]) -> tuple[str, str]:
        """A question's wording cut where the user pauses: at its mark, or after a word drawn at random."""
        if self.rng.random() < MARKED_PAUSES:
            return template.halves(**values)
        words = template.fill(**values).split()
        after = int(self.rng.integers(1, len(words)))
        return " ".join(words[:after]), " ".join(words[after:])

    def _sum(self) -> tuple[int, str, int, int]:
        """A small arithmetic question: single-digit ``a``, ``op`` (plus, minus), ``b`` and the result (never
        negative). Larger sums are the background model's work (:meth:`background`)."""
        op = ("plus", "minus")[int(self.rng.integers(2))]
        a, b = (int(x) for x in self.rng.integers(0, 10, size=2))
        if op == "minus" and b > a:
            a, b = b, a
        return a, op, b, _OPS[op][1](a, b)

    def _pick(self, kind: str) -> Template:
        choices = self.templates[kind]
        template = choices[int(self.rng.integers(len(choices)))]
        self.phrasing.append(template.id)
        return template

    def _gap(self) -> None:
        self.tl.wait(0.5, 1.5)
