"""The gateway's ``/metrics``, parsed by Prometheus' own text parser and checked against what the test did."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from aiohttp.test_utils import TestServer

from microturn.client import RATE, ProbeClient
from tests.conftest import loopback_settings, scrape_metrics, start_gateway
from webrtc_gateway import session as session_module
from webrtc_gateway.playout import FRAME_S


async def scrape(server: TestServer) -> dict[str, float]:
    return await scrape_metrics(str(server.make_url("/")).rstrip("/"))


async def test_metrics_count_what_a_session_did(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_module, "PEER_STATS_INTERVAL_S", 1.0)
    server = await start_gateway(loopback_settings())
    tone = (0.2 * np.sin(2 * np.pi * 300 * np.arange(5 * RATE) / RATE)).astype(np.float32)
    client = ProbeClient(str(server.make_url("/")), tone)
    try:
        before = await scrape(server)
        assert before["microturn_sessions{state=live}"] == 0 and before["microturn_micro_turns_total"] == 0
        await client.connect()
        await asyncio.sleep(max(0.0, 4.5 - client.now()))
        live = await scrape(server)
        state = await client.state()
    finally:
        await client.close()
        await asyncio.sleep(0.3)
    after = await scrape(server)
    await server.close()

    assert live["microturn_sessions{state=live}"] == 1
    assert after["microturn_sessions{state=live}"] == 0  # the session ended; its counts stay in the totals
    turns = after["microturn_micro_turns_total"]
    assert turns >= state["micro_turns"] >= 18  # 4.5 s of audio
    assert after["microturn_engine_ticks_total"] >= 1
    assert after["microturn_engine_batch_size_sum"] == turns  # every dispatched micro-turn was stepped once
    assert after["microturn_micro_turn_seconds_count"] == len(client.captions())  # one output per caption (echo)
    assert after["microturn_micro_turn_seconds_bucket{le=+Inf}"] == after["microturn_micro_turn_seconds_count"]
    assert after["microturn_late_micro_turns_total"] <= 2
    assert after["microturn_turns_not_stepped_total"] == 0
    assert after["microturn_frames_out_total"] * FRAME_S >= 4.0  # frames paced out since the peer connected
    # inbound audio quality from aiortc's RTCP statistics, sampled each second while the session was live
    assert live["microturn_peer_packet_loss_ratio{quantile=0.5}"] == 0.0
    assert 0 <= live["microturn_peer_jitter_seconds{quantile=0.5}"] < 0.05
    assert 0 < live["microturn_peer_rtt_seconds{quantile=0.99}"] < 0.2
    assert live["microturn_peer_packets_lost_total"] == 0
    assert "microturn_workers{state=up}" not in after  # in-process engine: no remote workers
    assert after["microturn_gateway_draining"] == 0
