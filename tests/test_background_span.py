"""The reference model's reserved request span, end to end: model output tokens → background task → result back in
the model's input tokens, with the events seen by an aiortc peer.

A randomly initialised model never writes the span, so this test forces the ids it samples (and only those): the
model speaks ``REQUEST_OPEN "what is 6*7" REQUEST_CLOSE`` over its first micro-turns. Everything after sampling is
the real path — caption decoding, the ``background_request`` event, the gateway's task, the built-in agent in its
worker process, the result woven into a later micro-turn and tokenised as ``TOOL`` text in the model's context.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from inference import tokenizer
from inference.context import TurnRecord, first_link
from inference.reference import ReferenceModel
from microturn.client import RATE, ProbeClient
from tests._reference_helpers import make_net, small_config
from tests.conftest import loopback_settings, start_gateway
from tests.test_background_gateway import events, until
from webrtc_gateway.app import STORE

SPAN = tokenizer.REQUEST_OPEN + "what is 6*7" + tokenizer.REQUEST_CLOSE


class SpanSpeaker(ReferenceModel):
    """The reference model with its sampled ids overridden until it has said :data:`SPAN`."""

    def __init__(self) -> None:
        super().__init__(make_net(small_config()))
        self.script = list(SPAN.encode())

    def _sample(self, logits: torch.Tensor, gens: list[torch.Generator], allowed: tuple[int, ...], temperature: float
                ) -> list[int]:
        picked = super()._sample(logits, gens, allowed, temperature)
        if not self.script:
            return picked
        if allowed == (tokenizer.SPEAK, tokenizer.SILENT):
            return [tokenizer.SPEAK] * len(picked)
        return [self.script.pop(0) if self.script else tokenizer.PAD for _ in picked]


async def test_the_model_asks_through_its_reserved_span_and_hears_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    model = SpanSpeaker()
    monkeypatch.setattr("webrtc_gateway.app.load_backend", lambda *args: model)
    server = await start_gateway(loopback_settings(model="reference"))
    client = ProbeClient(str(server.make_url("/")), np.zeros(10 * RATE, np.float32))
    try:
        await client.connect()
        await until(lambda: any(e["name"] == "background_result" for e in events(client)), timeout=30)
        await asyncio.sleep(1.0)  # a few more micro-turns: the result enters the model's input
        history, _ = await server.app[STORE].history(client.session_id)
        record = await server.app[STORE].get(client.session_id)
    finally:
        await client.close(delete=False)
        await server.close()

    requests = [m for _, m in client.received.messages if m.get("name") == "background_request"]
    assert [m["data"] for m in requests] == [{"request": "what is 6*7"}]
    named = [(e["name"], e["data"].get("text")) for e in events(client)]
    assert ("background_result", "42") in named
    assert all(tokenizer.REQUEST_OPEN not in c["text"] for c in client.captions())  # the span is not shown

    assert record is not None
    shape, link, joined = model.record_shape, first_link(record.seed), []
    for _, context in history:
        turn = TurnRecord.decode(context, shape, link, payload=False)
        link = TurnRecord.link_of(context)
        joined.append((turn.index, turn.new_text))
    request_turn = next(m["turn"] for m in requests)
    result = tokenizer.encode("42", tokenizer.TOOL)
    heard = [index for index, ids in joined
             if any(ids[i:i + len(result)] == result for i in range(len(ids)))]
    assert heard and heard[0] > request_turn  # the result joined the model's input, after the request
