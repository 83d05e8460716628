"""The gateway ↔ worker protocol and one worker in this process: frames, auth, bad input, backpressure, metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient, TestServer

from inference.echo import EchoModel
from inference.worker import WORKER, create_worker_app
from microturn import wire
from microturn.config import Settings
from microturn.contracts import ControlEvent, MicroTurn, MicroTurnOutput, OutputEvent
from tests.conftest import metric_samples


def turn(sid: str, index: int, video: bool = False) -> MicroTurn:
    rng = np.random.default_rng(index)
    return MicroTurn(sid, index, rng.uniform(-1, 1, 3200).astype(np.float32),
                     video=rng.integers(0, 255, (120, 160, 3), dtype=np.uint8) if video else None,
                     text=("hi",), events=(ControlEvent("camera_off", {"why": "test"}),), late=True,
                     background=("result: 42",))


def test_turn_and_output_frames_round_trip() -> None:
    t = turn("s1", 7, video=True)
    back = wire.decode_turn(wire.decode(wire.encode_turn(t)))
    assert (back.session_id, back.index, back.text, back.events, back.late, back.background) == \
        (t.session_id, t.index, t.text, t.events, t.late, t.background)
    assert np.array_equal(back.audio, t.audio) and back.audio.dtype == np.float32
    assert back.video is not None and t.video is not None and np.array_equal(back.video, t.video)
    out = MicroTurnOutput("s1", 7, np.linspace(-1, 1, 1600, dtype=np.float32), "hello",
                          (OutputEvent("background_request", {"request": "weather"}),), context=b"\x00\x01ctx")
    got, worker_s = wire.decode_output(wire.decode(wire.encode_output(out, 0.012)))
    assert (got.session_id, got.index, got.text, got.events, got.context) == \
        (out.session_id, out.index, out.text, out.events, out.context)
    assert np.array_equal(got.audio, out.audio) and worker_s == pytest.approx(0.012)
    opened = wire.decode(wire.encode(wire.Kind.OPEN, {"sid": "s", "seed": 3, "restore": True}, [b"a", b"", b"bc"]))
    assert opened.blobs == [b"a", b"", b"bc"] and opened.header == {"sid": "s", "seed": 3, "restore": True}


@pytest.mark.parametrize(("data", "message"), [
    (b"MT", "shorter than"),
    (b"XX\x01\x05\x00\x00\x00\x00", "bad magic"),
    (b"MT\x02\x05\x02\x00\x00\x00{}", "version 2"),
    (b"MT\x01\x63\x02\x00\x00\x00{}", "unknown frame kind"),
    (b"MT\x01\x05\xff\x00\x00\x00{}", "past the end"),
    (b"MT\x01\x05\x03\x00\x00\x00{x}", "not JSON"),
    (b'MT\x01\x05\x0d\x00\x00\x00{"blobs":[5]}ab', "sum to 5"),
])
def test_bad_frames_are_refused_with_a_reason(data: bytes, message: str) -> None:
    with pytest.raises(wire.WireError, match=message):
        wire.decode(data)


def test_a_turn_frame_with_wrong_audio_is_refused() -> None:
    frame = wire.decode(wire.encode(wire.Kind.TURN, {"sid": "s", "index": 0, "video": None}, [b"\x00" * 400]))
    with pytest.raises(wire.WireError, match="float32"):
        wire.decode_turn(frame)


class SlowEcho(EchoModel):
    """Echo that takes ``delay`` seconds per step, to fill the worker's queue."""

    delay = 0.0

    def step(self, turns: list[MicroTurn]) -> list[MicroTurnOutput]:
        time.sleep(self.delay)
        return super().step(turns)


@pytest.fixture
async def worker_client(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[TestClient]:
    monkeypatch.setattr("inference.worker.load_backend", lambda *a: SlowEcho())
    app = create_worker_app(Settings(model="echo", worker_token="sesame", worker_id="wk-test", worker_capacity=2))
    async with TestClient(TestServer(app)) as client:
        yield client


AUTH = {"Authorization": "Bearer sesame"}


async def frames_until(ws: object, kind: wire.Kind, timeout: float = 5.0) -> wire.Frame:
    deadline = time.monotonic() + timeout
    while True:
        msg = await ws.receive(timeout=max(0.01, deadline - time.monotonic()))  # type: ignore[attr-defined]
        assert msg.type == WSMsgType.BINARY, msg
        frame = wire.decode(msg.data)
        if frame.kind == kind:
            return frame


async def test_worker_refuses_gateways_without_the_token(worker_client: TestClient) -> None:
    resp = await worker_client.get("/v1/worker", headers={"Authorization": "Bearer wrong"})
    assert resp.status == 401 and "Bearer" in (await resp.json())["error"]["message"]


async def test_worker_opens_steps_and_closes_sessions_and_counts_them(worker_client: TestClient) -> None:
    async with worker_client.ws_connect("/v1/worker", headers=AUTH) as ws:
        hello = await frames_until(ws, wire.Kind.HELLO)
        assert hello.header["worker_id"] == "wk-test" and hello.header["capacity"] == 2
        await ws.send_bytes(wire.encode_turn(turn("nobody", 0)))  # not opened: answered, not dropped
        failed = await frames_until(ws, wire.Kind.FAILED)
        assert failed.header["sid"] == "nobody" and "not open" in failed.header["error"]
        for sid in ("a", "b", "c"):
            await ws.send_bytes(wire.encode(wire.Kind.OPEN, {"sid": sid, "seed": 1, "restore": False}))
        answers = [(await frames_until(ws, wire.Kind.OPENED)).header for _ in range(3)]
        errors = {a["sid"]: a.get("error") for a in answers}
        assert errors["a"] is None and errors["b"] is None
        assert "full" in errors["c"]  # capacity 2: first come, first served
        t = turn("a", 0)
        await ws.send_bytes(wire.encode_turn(t))
        out, worker_s = wire.decode_output(await frames_until(ws, wire.Kind.OUTPUT))
        assert out.index == 0 and np.allclose(out.audio, t.audio) and 0 <= worker_s < 1
        metrics = await (await worker_client.get("/metrics")).text()
        values = metric_samples(metrics)
        assert values["microturn_engine_sessions"] == 2
        assert values["microturn_engine_ticks_total"] == 1
        assert values["microturn_engine_tick_seconds_count"] == 1
        assert values["microturn_worker_refused_turns_total"] == 1
        assert (await worker_client.get("/readyz")).status == 503  # full
        await ws.send_bytes(wire.encode(wire.Kind.CLOSE, {"sid": "b"}))
        load = await frames_until(ws, wire.Kind.LOAD)
        assert load.header["sessions"] == 1
        assert (await worker_client.get("/readyz")).status == 200
    await asyncio.sleep(0.1)
    assert worker_client.server.app[WORKER].sessions == 0  # the gateway went away: its sessions were closed


async def test_a_full_queue_is_refused_at_once_and_other_sessions_go_on(worker_client: TestClient) -> None:
    worker = worker_client.server.app[WORKER]
    worker.engine.backend.delay = 0.3  # type: ignore[attr-defined]
    async with worker_client.ws_connect("/v1/worker", headers=AUTH) as ws:
        for sid in ("a", "b"):
            await ws.send_bytes(wire.encode(wire.Kind.OPEN, {"sid": sid, "seed": 1, "restore": False}))
            assert "error" not in (await frames_until(ws, wire.Kind.OPENED)).header
        n = wire.MAX_QUEUED_PER_SESSION + 4
        for i in range(n):
            await ws.send_bytes(wire.encode_turn(turn("a", i)))
        await ws.send_bytes(wire.encode_turn(turn("b", 0)))
        outputs, failed = [], []
        while len(outputs) + len(failed) < n + 1:
            msg = await ws.receive(timeout=10)
            frame = wire.decode(msg.data)
            if frame.kind == wire.Kind.OUTPUT:
                outputs.append((frame.header["sid"], frame.header["index"]))
            elif frame.kind == wire.Kind.FAILED:
                failed.append((frame.header["sid"], frame.header["index"], frame.header["error"]))
    assert [f[:2] for f in failed] == [("a", i) for i in range(wire.MAX_QUEUED_PER_SESSION, n)]
    assert all("overloaded" in f[2] for f in failed)
    assert ("b", 0) in outputs and len(outputs) == wire.MAX_QUEUED_PER_SESSION + 1


async def test_a_bad_frame_closes_only_that_gateways_connection(worker_client: TestClient) -> None:
    async with worker_client.ws_connect("/v1/worker", headers=AUTH) as good, \
            worker_client.ws_connect("/v1/worker", headers=AUTH) as bad:
        await good.send_bytes(wire.encode(wire.Kind.OPEN, {"sid": "g", "seed": 1, "restore": False}))
        assert "error" not in (await frames_until(good, wire.Kind.OPENED)).header
        await bad.send_bytes(b"MT\x01\x05garbage")
        msg = await bad.receive(timeout=5)
        while msg.type == WSMsgType.BINARY:
            msg = await bad.receive(timeout=5)
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
        assert bad.close_code == 1003
        await good.send_bytes(wire.encode_turn(turn("g", 0)))
        out, _ = wire.decode_output(await frames_until(good, wire.Kind.OUTPUT))
        assert out.session_id == "g"
    metrics = await (await worker_client.get("/metrics")).text()
    assert "microturn_worker_frame_errors_total 1.0" in metrics
