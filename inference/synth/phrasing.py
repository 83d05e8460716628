"""Phrasing templates: the wordings a user speaks or types, each with a stable id, and number words.

A template's id is ``KIND.NN`` (e.g. ``arithmetic.03``); :mod:`inference.synth.splits` gives each template to
exactly one split, so a wording heard in test is never heard in training. Wordings come in editions
(:data:`EDITIONS`): a later edition adds templates, numbered on from the earlier ones, and its templates are dealt
to the splits apart from the earlier ones, so adding wordings moves no earlier template to another split (a model
trained on an earlier edition's train split stays held out from the test split). Placeholders: ``{a}``, ``{op}``,
``{b}`` (spoken arithmetic: number words and ``plus``/``minus``/``times``; typed arithmetic: digits and
``{sym}``), ``{n}`` (counting). A ``|`` marks where a user may pause mid-question; it is dropped when the user does
not pause. No two templates of a kind say the same words.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Template:
    """One wording of one kind of user turn."""

    id: str
    kind: str
    text: str

    def fill(self, **values: object) -> str:
        """The wording with its placeholders filled, the pause mark dropped."""
        return " ".join(self.text.replace("|", " ").format(**values).split())

    def halves(self, **values: object) -> tuple[str, str]:
        """The wording cut at its pause mark: what comes before the pause, and after."""
        head, tail = self.text.format(**values).split("|")
        return head.strip(), tail.strip()


_TEXTS: dict[str, tuple[str, ...]] = {
    "greeting": ("hello", "hi there", "hey, hello", "good morning", "hello, can you hear me", "hi, is anybody there",
                 "hey", "good afternoon", "hello again", "hi, how is it going"),
    "arithmetic": ("what is {a} {op} | {b}", "what's {a} {op} | {b}", "how much is {a} | {op} {b}",
                   "tell me {a} {op} | {b}", "{a} {op} {b}, what | does that make",
                   "do you know what {a} {op} | {b} makes",
                   "what do you get for {a} | {op} {b}", "quick question, what is | {a} {op} {b}",
                   "so, {a} {op} | {b} is what", "could you tell me what {a} {op} | {b} is"),
    "counting": ("count to | {n}", "can you count to | {n}", "please count up | to {n}", "count from one | to {n}",
                 "let's hear you count | to {n}", "could you count to | {n} for me", "count up to | {n} please"),
    "colour": ("what colour is | this", "what color is this | card", "which colour | do you see",
               "can you tell me the | colour of this", "what colour am I | showing you",
               "tell me what | colour this is"),
    "shape": ("what shape is | this", "which shape is | on this card", "what shape am I | holding up",
              "can you tell me what | shape this is", "name this | shape", "what shape | do you see"),
    "number": ("what number is | this", "which number is | on this card", "what digit am I | showing",
               "can you read | this number", "what number | do you see", "tell me the number | on this card"),
    "statement": (
        "so yesterday I went to the market to buy some apples",
        "the weather was really nice in the morning so I walked",
        "on the way I met an old friend from school",
        "we talked for a while about our families and work",
        "then it started to rain and we had to find a cafe",
        "the cafe was small but the coffee was very good",
        "after that I went home and cooked a big dinner",
        "my sister called me in the evening to talk about her trip",
        "she is planning to visit the mountains next month",
        "I think I might go with her if I can take some days off",
        "last weekend we repainted the kitchen a light green",
        "it took much longer than we expected",
        "the neighbours have a new dog that barks every morning",
        "I have been reading a long book about the history of ships",
        "tomorrow I need to fix the bicycle and water the garden",
    ),
    "typed_arithmetic": ("what is {a} {sym} {b}?", "{a} {sym} {b} = ?", "{a}{sym}{b}", "how much is {a} {sym} {b}",
                         "calc {a} {sym} {b}", "{a} {sym} {b}?", "quick: {a} {sym} {b}"),
    "typed_counting": ("count to {n}", "pls count to {n}", "can you count to {n}?", "count 1 to {n}",
                       "counting to {n} please", "count up to {n}!"),
    "background": ("can you work out {a} {op} {b}", "could you calculate {a} {op} {b} for me",
                   "I need the result of {a} {op} {b}", "please compute {a} {op} {b}", "what does {a} {op} {b} come to",
                   "figure out {a} {op} {b} for me", "what would {a} {op} {b} be"),
}

_ADDED: dict[str, tuple[str, ...]] = {
    # 2026-12-08: more ways to ask a sum, many pausing after its first number, to count, and more long statements.
    # None contains a held-out wording of the first edition (split seed 0).
    "arithmetic": ("what would {a} {op} | {b} be", "and {a} {op} | {b}?", "what's the answer to {a} | {op} {b}",
                   "I'd like to know {a} | {op} {b}", "if you take {a} | {op} {b}, what is it",
                   "help me with {a} | {op} {b}", "what does {a} {op} {b} | make", "so what is {a} | {op} {b}",
                   "right, {a} {op} | {b} please", "what's {a} | {op} {b} then", "how about {a} {op} | {b}",
                   "tell me the answer to {a} | {op} {b}", "can you do {a} | {op} {b}",
                   "what comes out of {a} | {op} {b}"),
    "counting": ("start counting | up to {n}", "give me a count | up to {n}", "count for me | up to {n}",
                 "I want you to count | up to {n}", "can you do a count | up to {n}", "say the numbers | up to {n}",
                 "count upwards | to {n}", "let me hear the numbers | up to {n}"),
    "statement": (
        "this morning the bus was late again so I had to walk",
        "my brother just bought an old car that needs a lot of work",
        "we have been planting tomatoes and beans in the back garden",
        "the library near my house is closing for a few weeks",
        "I started learning to play the piano last winter",
        "our team lost the match on saturday but it was close",
        "the children spent the whole afternoon building a tree house",
        "I found a really good recipe for lemon cake",
        "there is a new bakery on the corner of our street",
        "my grandmother used to tell us stories about the sea",
        "we are thinking about moving to a smaller flat",
        "the train was so full that I had to stand all the way",
        "I lost my keys twice this week",
        "the concert in the park was much louder than I expected",
        "next year I would like to learn how to swim properly",
        "my phone stopped working after I dropped it in the snow",
    ),
}

EDITIONS: tuple[dict[str, tuple[Template, ...]], ...] = (
    {kind: tuple(Template(f"{kind}.{i:02d}", kind, text) for i, text in enumerate(texts))
     for kind, texts in _TEXTS.items()},
    {kind: tuple(Template(f"{kind}.{i:02d}", kind, text) for i, text in enumerate(texts, start=len(_TEXTS[kind])))
     for kind, texts in _ADDED.items()},
)
"""The templates of each edition, by kind: the first edition, then the wordings added on 2026-12-08."""

TEMPLATES: dict[str, tuple[Template, ...]] = {
    kind: tuple(t for edition in EDITIONS for t in edition.get(kind, ())) for kind in _TEXTS
}
"""Every template, by kind."""

_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_words(n: int) -> str:
    """0 ≤ n < 1000 in plain lowercase words: ``7`` → ``seven``, ``42`` → ``forty two``, ``144`` → ``one hundred
    forty four``."""
    if not 0 <= n < 1000:
        raise ValueError(f"number_words takes 0–999, got {n}")
    return " ".join(_below_thousand(n, said_and=False))


def espeak_number_words(n: int) -> str:
    """0 ≤ n < 1,000,000 in words as espeak-ng says its digits, with "and": ``1771`` → ``one thousand seven hundred
    and seventy one``, ``2005`` → ``two thousand and five``."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"espeak_number_words takes 0–999999, got {n}")
    if n < 1000:
        return " ".join(_below_thousand(n, said_and=True))
    rest = n % 1000
    words = _below_thousand(n // 1000, said_and=True) + ["thousand"]
    if rest:
        words += (["and"] if rest < 100 else []) + _below_thousand(rest, said_and=True)
    return " ".join(words)


def _below_thousand(n: int, said_and: bool) -> list[str]:
    """The words of 0 ≤ n < 1000; ``said_and``: "one hundred and forty four" rather than "one hundred forty four"."""
    words = []
    if n >= 100:
        words += [_ONES[n // 100], "hundred"] + (["and"] if said_and and n % 100 else [])
        n %= 100
    if n >= 20:
        words += [_TENS[n // 10]] + ([_ONES[n % 10]] if n % 10 else [])
    elif n or not words:
        words.append(_ONES[n])
    return words
