"""Bad input gets a clear error and never harms a healthy session in the same gateway."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import numpy as np
from aiohttp.test_utils import TestServer
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender
from aiortc.mediastreams import VideoStreamTrack

from microturn.client import RATE, ProbeClient, SignalTrack
from tests.conftest import loopback_settings, start_gateway
from webrtc_gateway.tokens import TokenSigner


async def create(http: aiohttp.ClientSession, base: str) -> dict:
    async with http.post(f"{base}/v1/sessions", json={}) as resp:
        assert resp.status == 201
        return dict(await resp.json())


async def post_offer(http: aiohttp.ClientSession, base: str, sid: str, token: str | None, body: object,
                     raw: bytes | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    kwargs = {"data": raw} if raw is not None else {"json": body}
    async with http.post(f"{base}/v1/sessions/{sid}/offer", headers=headers, **kwargs) as resp:
        return resp.status, dict(await resp.json())


async def video_only_offer() -> str:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(VideoStreamTrack())
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return str(sdp)


async def pcmu_only_offer() -> str:
    """A microphone offered with G.711 only: the gateway speaks Opus, so it cannot answer."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    transceiver = pc.addTransceiver(SignalTrack(np.zeros(RATE, np.float32)))
    transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("audio").codecs
                                     if c.mimeType == "audio/PCMU"])
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    assert "opus" not in sdp.lower()
    return str(sdp)


async def test_bad_signalling_is_refused_while_a_healthy_session_keeps_working(gateway: TestServer) -> None:
    base = str(gateway.make_url("")).rstrip("/")
    healthy = ProbeClient(base, 0.3 * np.sin(2 * np.pi * 300 * np.arange(6 * RATE) / RATE).astype(np.float32))
    await healthy.connect()
    try:
        async with aiohttp.ClientSession() as http:
            s = await create(http, base)
            sid, token = s["session_id"], s["token"]
            cases = {
                "no token": (await post_offer(http, base, sid, None, {"type": "offer", "sdp": "v=0"}), 401),
                "forged token": (await post_offer(http, base, sid, token[:-4] + "AAAA", {"sdp": "v=0"}), 401),
                "other secret": (await post_offer(http, base, sid, TokenSigner("x").issue(sid, "connect", 60),
                                                  {"sdp": "v=0"}), 401),
                "expired token": (await post_offer(http, base, sid, TokenSigner("test-secret").issue(
                    sid, "connect", -1), {"sdp": "v=0"}), 401),
                "other session's token": (await post_offer(http, base, sid, TokenSigner("test-secret").issue(
                    "someone-else", "connect", 60), {"sdp": "v=0"}), 403),
                "not json": (await post_offer(http, base, sid, token, None, raw=b"\x00garbage"), 400),
                "no sdp": (await post_offer(http, base, sid, token, {"type": "offer"}), 400),
                "answer instead of offer": (await post_offer(http, base, sid, token, {"type": "answer",
                                                                                      "sdp": "v=0"}), 400),
                "oversized sdp": (await post_offer(http, base, sid, token, {"sdp": "a" * 100_000}), 413),
                "unknown session": (await post_offer(http, base, "nope", TokenSigner("test-secret").issue(
                    "nope", "connect", 60), {"sdp": "v=0"}), 404),
            }
            for name, ((status, body), expected) in cases.items():
                assert status == expected, (name, status, body)
                assert body["error"]["message"], name
            # malformed SDP and an offer without audio: each on a fresh session (a refused offer ends the session)
            for sdp, needle in [("v=0\r\nthis is not sdp\r\nm=audio x\r\n", "not valid SDP"),
                                (await video_only_offer(), "no audio"),
                                (await pcmu_only_offer(), "audio needs Opus")]:
                fresh = await create(http, base)
                status, body = await post_offer(http, base, fresh["session_id"], fresh["token"],
                                                {"type": "offer", "sdp": sdp})
                assert status == 400 and needle in body["error"]["message"], body
            async with http.get(f"{base}/v1/sessions/{sid}") as resp:
                assert resp.status == 401
            async with http.post(f"{base}/v1/sessions", data=b"[not json") as resp:
                assert resp.status == 400
        await asyncio.sleep(max(0.0, 3.0 - healthy.now()))
        state = await healthy.state()
        assert state["state"] == "connected"
        assert state["micro_turns"] >= 12
        assert state["late_micro_turns"] == 0
        out = healthy.output(3.0)
        assert np.sqrt(np.mean(out[int(1.0 * RATE):int(2.8 * RATE)] ** 2)) > 0.1  # echo still flowing
    finally:
        await healthy.close()


async def test_garbage_data_channel_messages_get_error_events(gateway: TestServer) -> None:
    base = str(gateway.make_url("")).rstrip("/")
    bad = ProbeClient(base, np.zeros(4 * RATE, np.float32))
    healthy = ProbeClient(base, np.zeros(4 * RATE, np.float32))
    await bad.connect()
    await healthy.connect()
    try:
        bad.channel.send(b"\x00\xffbinary")
        bad.channel.send("{not json")
        bad.channel.send(json.dumps({"type": "text", "text": "x" * 10_000}))
        bad.channel.send(json.dumps({"type": "warp", "speed": 9}))
        bad.channel.send(json.dumps({"type": "control", "name": "rm -rf"}))
        bad.send({"type": "ping", "id": 1})
        healthy.send({"type": "text", "text": "still here"})
        await asyncio.sleep(1.5)
        codes = [m["code"] for _, m in bad.received.messages if m["type"] == "error"]
        assert codes == ["binary_not_supported", "invalid_json", "too_large", "unknown_type", "unknown_control"]
        assert any(m["type"] == "pong" and m["id"] == 1 for _, m in bad.received.messages)
        assert (await bad.state())["state"] == "connected"  # refused messages do not end the session
        assert any("still here" in c["text"] for c in healthy.captions())
        assert healthy.errors == []
    finally:
        await bad.close()
        await healthy.close()


async def test_capacity_and_origin_are_enforced() -> None:
    server = await start_gateway(loopback_settings(max_sessions=1, allowed_origins=("https://shop.example",)))
    base = str(server.make_url("")).rstrip("/")
    try:
        async with aiohttp.ClientSession() as http:
            await create(http, base)
            async with http.post(f"{base}/v1/sessions", json={}) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"]
            async with http.post(f"{base}/v1/sessions", headers={"Origin": "https://evil.example"}) as resp:
                assert resp.status == 403
                assert "origin" in (await resp.json())["error"]["message"]
            async with http.options(f"{base}/v1/sessions", headers={"Origin": "https://shop.example"}) as resp:
                assert resp.status == 204
                assert resp.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    finally:
        await server.close()


async def test_sessions_leave_nothing_behind(gateway: TestServer) -> None:
    base = str(gateway.make_url("")).rstrip("/")
    app_gateway = gateway.app[__import__("webrtc_gateway.api", fromlist=["GATEWAY"]).GATEWAY]
    engine = app_gateway.engine
    before = len(asyncio.all_tasks())
    for _ in range(4):
        client = ProbeClient(base, np.zeros(RATE, np.float32))
        await client.connect()
        await asyncio.sleep(0.5)
        await client.close()
    await asyncio.sleep(0.5)
    assert app_gateway.live == {} and app_gateway.pending == {}
    assert engine.sessions == 0 and engine.backend.sessions == set()  # type: ignore[attr-defined]
    assert len(asyncio.all_tasks()) <= before + 1
    assert app_gateway.totals.sessions_closed == 4
