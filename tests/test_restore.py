"""A session rebuilt on another engine from its context records continues exactly as if it had never moved."""

from __future__ import annotations

import numpy as np

from inference.engine import Engine
from inference.tally import TallyModel
from microturn.contracts import MicroTurn, MicroTurnOutput


def inputs(n: int, seed: int = 1) -> list[tuple[np.ndarray, tuple[str, ...]]]:
    rng = np.random.default_rng(seed)
    return [((rng.uniform(-1, 1, 3200) * rng.uniform(0, 0.5)).astype(np.float32),
             ("hello",) if k % 7 == 3 else ()) for k in range(n)]


async def run(engine: Engine, sid: str, start: int, feed: list[tuple[np.ndarray, tuple[str, ...]]]
              ) -> list[MicroTurnOutput]:
    return [await engine.submit(MicroTurn(sid, start + k, audio, text=text)) for k, (audio, text) in enumerate(feed)]


async def test_tally_session_rebuilt_elsewhere_matches_an_uninterrupted_one() -> None:
    before, after = inputs(20), inputs(10, seed=2)
    gap = [(np.zeros(3200, np.float32), ())] * 5  # how a resume represents the time away

    one = Engine(TallyModel())
    await one.start()
    await one.open_session("s", seed=42)
    uninterrupted = await run(one, "s", 0, before + gap + after)

    await one.open_session("t", seed=42)
    first_part = await run(one, "t", 0, before)
    await one.stop()  # the gateway and its engine die

    two = Engine(TallyModel())
    await two.start()
    await two.open_session("t", seed=42, history=[o.context for o in first_part])
    rest = await run(two, "t", 20, gap + after)
    await two.stop()

    assert [o.text for o in first_part + rest] == [o.text for o in uninterrupted]
    for a, b in zip(first_part + rest, uninterrupted, strict=True):
        np.testing.assert_array_equal(a.audio, b.audio)
    # and a record lost or repeated would show
    three = Engine(TallyModel())
    await three.start()
    await three.open_session("u", seed=42, history=[o.context for o in first_part[:-1]])
    lossy = await run(three, "u", 20, gap + after)
    await three.stop()
    assert lossy[-1].text != uninterrupted[-1].text
