"""Cumulative histograms for Prometheus, cheap enough to update on the tick and media paths.

A :class:`Histogram` only counts (one ``searchsorted`` per observation); ``/metrics`` turns it into a Prometheus
histogram when scraped. Buckets are fixed per quantity, so that histograms of many processes can be summed.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0)
"""Upper bounds (s) for latencies around one micro-turn (200 ms)."""

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
"""Upper bounds for micro-turns per engine step."""


class Histogram:
    """Counts of observations at or below each upper bound (the last count is +Inf), and their sum."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, cumulative count)`` pairs, the last with ``le="+Inf"``, as Prometheus wants them."""
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        return out
