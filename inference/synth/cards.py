"""Camera cards for visual questions: numpy-drawn 160×120 RGB frames that show a colour, a shape or a digit.

- ``colour``: the whole card in one colour of :data:`COLOURS` inside a thin neutral border (the colour is the
  majority of the pixels);
- ``shape``: a filled circle, square, triangle or five-pointed star in a colour on a neutral backdrop;
- ``number``: one large seven-segment digit in a colour on a neutral backdrop.

A card is drawn from the conversation's generator (which card, where, how big) and :meth:`Card.frame` draws it the
same way every time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inference.synth.phrasing import number_words
from microturn.contracts import VIDEO_HEIGHT, VIDEO_WIDTH

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 70, 220), "yellow": (240, 215, 30),
    "orange": (245, 135, 20), "purple": (130, 50, 170), "pink": (245, 130, 185), "brown": (125, 75, 35),
}
BACKDROPS: tuple[tuple[int, int, int], ...] = ((245, 245, 245), (200, 200, 200), (40, 40, 40))
SHAPES = ("circle", "square", "triangle", "star")
DIGITS = tuple(number_words(d) for d in range(10))
BORDER = 6  # px of backdrop around a colour card

_SEGMENTS = {  # seven-segment digits: a (top), b, c (right, top to bottom), d (bottom), e, f (left), g (middle)
    0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc", 5: "afgcd", 6: "afgedc", 7: "abc", 8: "abcdefg",
    9: "abcdfg",
}


@dataclass(frozen=True)
class Card:
    """One card: its kind, what it shows (the answer) and where it is drawn."""

    kind: str  # colour | shape | number
    answer: str  # a colour name, a shape name, or a digit in words ("seven")
    ground: tuple[int, int, int]  # backdrop (colour cards: the border)
    ink: tuple[int, int, int]  # the colour, the shape's or the digit's colour
    x: int  # centre of the shape or digit, px
    y: int
    size: int  # its height, px

    @classmethod
    def draw(cls, rng: np.random.Generator, kind: str) -> Card:
        colour = str(rng.choice(sorted(COLOURS)))
        ground = BACKDROPS[int(rng.integers(len(BACKDROPS)))]
        x, y = VIDEO_WIDTH // 2 + int(rng.integers(-15, 16)), VIDEO_HEIGHT // 2 + int(rng.integers(-8, 9))
        size = int(rng.integers(60, 91))
        if kind == "colour":
            answer = colour
        elif kind == "shape":
            answer = SHAPES[int(rng.integers(len(SHAPES)))]
        else:
            answer = DIGITS[int(rng.integers(len(DIGITS)))]
        return cls(kind, answer, ground, COLOURS[colour], x, y, size)

    def frame(self) -> np.ndarray:
        """The card as a (120, 160, 3) uint8 RGB frame."""
        frame = np.empty((VIDEO_HEIGHT, VIDEO_WIDTH, 3), np.uint8)
        frame[:] = self.ground
        if self.kind == "colour":
            frame[BORDER:-BORDER, BORDER:-BORDER] = self.ink
        else:
            frame[self._mask()] = self.ink
        return frame

    def _mask(self) -> np.ndarray:
        yy, xx = np.mgrid[0:VIDEO_HEIGHT, 0:VIDEO_WIDTH] + 0.5
        r = self.size / 2
        if self.kind == "number":
            return _digit(xx, yy, self.x, self.y, self.size, DIGITS.index(self.answer))
        if self.answer == "circle":
            return (xx - self.x) ** 2 + (yy - self.y) ** 2 <= r * r
        if self.answer == "square":
            return (np.abs(xx - self.x) <= r) & (np.abs(yy - self.y) <= r)
        corners = 3 if self.answer == "triangle" else 10
        angles = -np.pi / 2 + np.arange(corners) * 2 * np.pi / corners
        radii = np.full(corners, r) if corners == 3 else np.where(np.arange(corners) % 2 == 0, r, 0.42 * r)
        return _polygon(xx, yy, list(zip(self.x + radii * np.cos(angles), self.y + radii * np.sin(angles),
                                         strict=True)))


def _polygon(xx: np.ndarray, yy: np.ndarray, corners: list[tuple[float, float]]) -> np.ndarray:
    """Pixels inside a polygon (even-odd rule: a ray to the left crosses its edges an odd number of times)."""
    inside = np.zeros(xx.shape, bool)
    for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1], strict=True):
        if y0 == y1:
            continue
        crosses = (y0 > yy) != (y1 > yy)
        inside ^= crosses & (xx < x0 + (yy - y0) * (x1 - x0) / (y1 - y0))
    return inside


def _digit(xx: np.ndarray, yy: np.ndarray, x: int, y: int, size: int, digit: int) -> np.ndarray:
    """Pixels of a seven-segment digit ``size`` px high, centred on (x, y)."""
    half_w, half_h, t = 0.3 * size, size / 2, size / 7
    left, right, top, bottom = x - half_w, x + half_w, y - half_h, y + half_h
    bars = {  # segment → (x0, x1, y0, y1)
        "a": (left, right, top, top + t), "g": (left, right, y - t / 2, y + t / 2),
        "d": (left, right, bottom - t, bottom),
        "f": (left, left + t, top, y), "b": (right - t, right, top, y),
        "e": (left, left + t, y, bottom), "c": (right - t, right, y, bottom),
    }
    mask = np.zeros(xx.shape, bool)
    for segment in _SEGMENTS[digit]:
        x0, x1, y0, y1 = bars[segment]
        mask |= (xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)
    return mask
