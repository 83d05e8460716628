"""TURN with per-session REST credentials, against a real coturn (``use-auth-secret``) started by the test.

coturn runs on 127.0.0.1 with relays on 127.0.0.1 too; ``--allow-loopback-peers`` lets it relay to the gateway's
loopback host candidate (coturn refuses loopback peers by default).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aioice import stun
from aioice.turn import create_turn_endpoint
from aiortc import RTCConfiguration, RTCIceServer, RTCIceTransportPolicy, RTCPeerConnection

from microturn.bench_gateway import clicks, returned_at
from microturn.client import RATE, ProbeClient
from tests.conftest import free_port, gateway_of, loopback_settings, start_gateway
from webrtc_gateway import api
from webrtc_gateway.app import create_app
from webrtc_gateway.turn import TurnConfigError, mint_credential, sign

SECRET = "turn-test-secret"
REALM = "microturn.test"


@dataclass
class Coturn:
    port: int
    relay_ports: range
    log: Path

    @property
    def url(self) -> str:
        return f"turn:127.0.0.1:{self.port}?transport=udp"


def _stun_answers(port: int) -> bool:
    """Whether a STUN binding request to 127.0.0.1:port over UDP gets an answer."""
    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        s.sendto(bytes(request), ("127.0.0.1", port))
        try:
            return stun.parse_message(s.recv(2048)).transaction_id == request.transaction_id
        except OSError:
            return False


@pytest.fixture(scope="module")
def coturn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coturn]:
    binary = shutil.which("turnserver")
    if binary is None:
        pytest.skip("coturn (turnserver) is not installed")
    workdir = tmp_path_factory.mktemp("coturn")
    port = free_port()
    low = random.randrange(50_000, 60_000, 2)
    relay_ports = range(low, low + 40)
    log = workdir / "turn.log"
    proc = subprocess.Popen([
        binary, "-n", "--listening-ip", "127.0.0.1", "--listening-port", str(port), "--relay-ip", "127.0.0.1",
        "--min-port", str(relay_ports.start), "--max-port", str(relay_ports.stop - 1),
        "--use-auth-secret", f"--static-auth-secret={SECRET}", "--realm", REALM, "--allow-loopback-peers",
        "--no-tls", "--no-dtls", "--no-cli", "--no-software-attribute", "--verbose",
        "--log-file", str(log), "--simple-log",  # everything coturn writes stays in workdir
        "--pidfile", str(workdir / "turnserver.pid"), "--userdb", str(workdir / "turndb"),
    ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=workdir)
    try:
        deadline = time.monotonic() + 10
        while not _stun_answers(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"coturn did not start: {log.read_text() if log.exists() else 'no log'}")
        yield Coturn(port, relay_ports, log)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def _allocate(coturn: Coturn, username: str, credential: str) -> tuple[str, int]:
    """A TURN allocation with these credentials; returns the relayed address (raises if coturn refuses)."""
    transport, _ = await asyncio.wait_for(create_turn_endpoint(
        asyncio.DatagramProtocol, ("127.0.0.1", coturn.port), username, credential), 5)
    try:
        address: tuple[str, int] = transport.get_extra_info("sockname")
        return address
    finally:
        transport.close()


async def test_a_fresh_credential_allocates_a_relay(coturn: Coturn) -> None:
    username, credential = mint_credential(SECRET, "sid-fresh", 60)
    host, port = await _allocate(coturn, username, credential)
    assert host == "127.0.0.1" and port in coturn.relay_ports


@pytest.mark.parametrize("case", ["expired", "wrong_secret", "tampered_username"])
async def test_coturn_refuses_a_bad_credential_with_401(coturn: Coturn, case: str) -> None:
    if case == "expired":
        username, credential = mint_credential(SECRET, "sid-old", 3600, now=time.time() - 3700)
    elif case == "wrong_secret":
        username, credential = mint_credential("not-the-secret", "sid-forged", 60)
    else:  # a later expiry with the credential of an earlier one
        username, credential = mint_credential(SECRET, "sid-x", 60)
        username = f"{int(time.time()) + 86_400}:sid-x"
    with pytest.raises(stun.TransactionFailed) as refused:
        await _allocate(coturn, username, credential)
    assert refused.value.response.error_code == 401  # asked for auth, then refused the credential


async def test_relay_only_gathering_with_an_expired_credential_yields_no_candidates(coturn: Coturn) -> None:
    username, credential = mint_credential(SECRET, "sid-old", 60, now=time.time() - 120)
    pc = RTCPeerConnection(RTCConfiguration(
        iceServers=[RTCIceServer(urls=[coturn.url], username=username, credential=credential)],
        iceTransportPolicy=RTCIceTransportPolicy.RELAY))
    try:
        pc.createDataChannel("microturn")
        await asyncio.wait_for(pc.setLocalDescription(await pc.createOffer()), 10)
        assert "a=candidate" not in pc.localDescription.sdp  # nothing to connect with: it never connects
    finally:
        await pc.close()


async def test_relay_only_client_round_trips_media_through_coturn(coturn: Coturn) -> None:
    server = await start_gateway(loopback_settings(turn_urls=(coturn.url,), turn_secret=SECRET))
    times = [0.5, 0.9, 1.3, 1.7]
    client = ProbeClient(str(server.make_url("/")), clicks(2.3, times), relay_only=True)
    try:
        await client.connect()
        offer = client.pc.localDescription.sdp
        session = gateway_of(server)[api.GATEWAY].live[client.session_id]
        await asyncio.sleep(max(0.0, 2.3 - client.now()))
        out = client.output(2.3)
        client_pair = client.selected_candidates()
        gateway_pair = session.pc.getSenders()[0].transport.transport._connection._nominated[1]
    finally:
        await client.close()
        await server.close()
    # the client offered only relay candidates, and the pair in use is relay (client) ↔ host (gateway)
    candidates = [line for line in offer.splitlines() if line.startswith("a=candidate")]
    assert candidates and all(" typ relay" in line for line in candidates), candidates
    assert client_pair == ("relay", "host")
    # seen from the gateway, the client's packets come from one of coturn's relay ports
    remote = gateway_pair.remote_candidate
    assert remote.host == "127.0.0.1" and remote.port in coturn.relay_ports, remote
    # the echo came back, one micro-turn later, through the relay
    delays = [returned_at(out, t) for t in times]
    assert all(d is not None for d in delays), delays
    overhead = np.array([d - t - 0.2 for d, t in zip(delays, times, strict=True) if d is not None])
    assert np.all((overhead >= 0) & (overhead < 0.1)), overhead
    # coturn authenticated the allocation with the username the gateway minted for this session
    username = client.ice_servers[0].username
    assert username is not None and username.endswith(f":{client.session_id}")
    assert f"<{username}>" in coturn.log.read_text()


async def test_a_gateway_with_the_wrong_secret_gets_no_relay(coturn: Coturn) -> None:
    server = await start_gateway(loopback_settings(turn_urls=(coturn.url,), turn_secret="not-the-secret"))
    client = ProbeClient(str(server.make_url("/")), np.zeros(RATE, np.float32), relay_only=True)
    try:
        with pytest.raises(RuntimeError, match="no relay candidate"):
            await asyncio.wait_for(client.connect(), 10)
    finally:
        await client.close()
        await server.close()


async def test_the_grant_carries_a_per_session_turn_credential() -> None:
    ttl = 1234
    server = await start_gateway(loopback_settings(
        ice_servers=("stun:stun.example.org:3478",), turn_urls=("turn:turn.example.org:3478?transport=udp",
                                                                "turn:turn.example.org:3478?transport=tcp"),
        turn_secret=SECRET, turn_ttl_s=ttl))
    try:
        async with aiohttp.ClientSession() as http:
            grants = []
            for _ in range(2):
                async with http.post(server.make_url("/v1/sessions"), json={}) as resp:
                    assert resp.status == 201
                    grants.append(await resp.json())
    finally:
        await server.close()
    now = time.time()
    for grant in grants:
        stun_entry, turn_entry = grant["ice_servers"]
        assert stun_entry == {"urls": ["stun:stun.example.org:3478"]}
        assert turn_entry["urls"] == ["turn:turn.example.org:3478?transport=udp",
                                      "turn:turn.example.org:3478?transport=tcp"]
        expiry, _, sid = turn_entry["username"].partition(":")
        assert sid == grant["session_id"]
        assert abs(int(expiry) - (now + ttl)) <= 5
        expected = base64.b64encode(hmac.new(SECRET.encode(), turn_entry["username"].encode(),
                                             hashlib.sha1).digest()).decode()
        assert turn_entry["credential"] == expected == sign(SECRET, turn_entry["username"])
    assert grants[0]["ice_servers"][1]["credential"] != grants[1]["ice_servers"][1]["credential"]


async def test_no_turn_entry_without_turn_urls() -> None:
    server = await start_gateway(loopback_settings(ice_servers=("stun:stun.example.org:3478",), turn_secret=SECRET))
    try:
        async with aiohttp.ClientSession() as http, http.post(server.make_url("/v1/sessions"), json={}) as resp:
            grant = await resp.json()
    finally:
        await server.close()
    assert grant["ice_servers"] == [{"urls": ["stun:stun.example.org:3478"]}]


def test_turn_urls_without_a_secret_refuse_to_start() -> None:
    with pytest.raises(TurnConfigError, match="turn_secret"):
        create_app(loopback_settings(turn_urls=("turn:turn.example.org:3478",)))


async def test_relay_only_without_a_turn_server_fails_clearly() -> None:
    server = await start_gateway(loopback_settings())
    client = ProbeClient(str(server.make_url("/")), np.zeros(RATE, np.float32), relay_only=True)
    try:
        with pytest.raises(RuntimeError, match="TURN"):
            await client.connect()
    finally:
        await client.close()
        await server.close()
