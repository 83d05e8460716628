"""Shared fixtures: an in-process gateway on loopback, a real redis-server, espeak-ng speech; and the drain check
that a gateway and a multi-process front both pass."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from microturn.client import RATE, ProbeClient
from microturn.config import Settings
from microturn.local import free_port
from microturn.probe import read_audio
from webrtc_gateway.app import create_app

__all__ = ["drains_on_sigterm", "free_port", "loopback_settings", "metric_samples", "scrape_metrics", "start_gateway"]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Small matmuls run faster and far more predictably on one thread when the machine is shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def loopback_settings(**changes: object) -> Settings:
    """Settings of a gateway on loopback; the echo model unless ``changes`` name another."""
    changes.setdefault("model", "echo")
    return Settings(host="127.0.0.1", port=0, ice_host_addresses=("127.0.0.1",), token_secret="test-secret",
                    **changes)  # type: ignore[arg-type]


async def start_gateway(settings: Settings) -> TestServer:
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    return server


def metric_samples(text: str) -> dict[str, float]:
    """Prometheus exposition text, parsed by Prometheus' own parser: ``{"name{label=value,…}": value}`` (labels
    sorted; a sample without labels is keyed by its name alone)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


async def scrape_metrics(url: str) -> dict[str, float]:
    """``GET url/metrics`` as :func:`metric_samples`; it must answer 200 in Prometheus' text format."""
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as resp:
        assert resp.status == 200 and resp.content_type == "text/plain"
        return metric_samples(await resp.text())


async def drains_on_sigterm(url: str, proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the gateway served at ``url`` by ``proc`` (its drain timeout 2 s): it refuses new sessions and is
    not ready, a live session goes on, is told to move when the drain times out, and the process exits 0."""
    client = ProbeClient(url, np.zeros(10 * RATE, np.float32))
    try:
        await client.connect()
        await asyncio.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/readyz") as resp:
                assert resp.status == 503 and (await resp.json())["status"] == "draining"
            async with http.post(f"{url}/v1/sessions", json={}) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"]
                assert (await resp.json())["error"]["code"] == "draining"
            async with http.get(f"{url}/livez") as resp:
                assert resp.status == 200
        assert (await client.state())["state"] == "connected"  # the live session goes on while draining
        await asyncio.sleep(2.5)
        moves = [m for _, m in client.received.messages if m["type"] == "reconnect"]
        assert len(moves) == 1 and "another" in moves[0]["reason"]
        assert await asyncio.to_thread(proc.wait, 15) == 0
    finally:
        await client.close(delete=False)
        if proc.poll() is None:
            proc.kill()


@pytest.fixture
async def gateway() -> AsyncIterator[TestServer]:
    """An echo gateway in this process, media on loopback."""
    server = await start_gateway(loopback_settings())
    yield server
    await server.close()


def gateway_of(server: TestServer) -> web.Application:
    return server.app


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few seconds of espeak-ng speech, 16-bit mono WAV."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run(["espeak-ng", "-s", "150", "-w", str(path),
                    "Hello. This is microturn, listening in micro turns of two hundred milliseconds."],
                   check=True)
    return path


@pytest.fixture(scope="session")
def speech_48k(speech_wav: Path) -> np.ndarray:
    return read_audio(speech_wav)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port, for the whole test session."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(5)
