"""The reference model served end to end: an aiortc peer talks to a gateway running a (random) tiny checkpoint."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from inference.checkpoint import init_checkpoint
from microturn.client import RATE, ProbeClient
from tests.conftest import loopback_settings, start_gateway
from webrtc_gateway.playout import FRAME_S


async def test_reference_model_serves_a_webrtc_session(tmp_path: Path, speech_48k: np.ndarray) -> None:
    checkpoint = init_checkpoint("tiny", tmp_path / "tiny", seed=0)
    server = await start_gateway(loopback_settings(model="reference", checkpoint=checkpoint))
    client = ProbeClient(str(server.make_url("/")), speech_48k[: 3 * RATE])
    try:
        await client.connect()
        client.send({"type": "text", "text": "hello model"})
        await asyncio.sleep(max(0.0, 3.5 - client.now()))
        state = await client.state()
    finally:
        await client.close()
        await server.close()
    assert state["state"] == "connected"
    assert state["micro_turns"] >= 14
    # timing is the benchmarks' business; here the model's first (warm-up) ticks may let one micro-turn run late
    assert state["late_micro_turns"] <= 2
    assert state["frames_out"] * FRAME_S >= 3.0
    assert max(state["input_levels_dbfs"]) > -40  # the model heard the speech
    out = client.output(3.5)
    assert client.audio_seconds() >= 3.0  # its output track played the whole time
    assert np.all(np.isfinite(out))
    assert client.errors == []
