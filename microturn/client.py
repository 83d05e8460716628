"""An aiortc client that behaves like a browser: the engine of ``microturn probe``, the benchmarks and the tests.

It creates a session over HTTP, sends a microphone track that plays a given 48 kHz mono signal in real time (and
optionally a camera track), opens the ``microturn`` data channel, and records what comes back:

- audio: each packet is kept as it arrives and decoded afterwards (no jitter buffer, no decoding in real time),
  then placed on a timeline whose sample 0 is the moment the first input sample was "captured" (the real-time clock
  of the microphone), using its RTP timestamp plus one playout offset — the 95th percentile of (arrival time −
  media time) over all packets, as a playout buffer that loses 5 % of packets to lateness would choose;
- every data-channel message, with its arrival time on the same clock.

Like a browser, it uses the ICE servers of the gateway's grant (STUN, and TURN with the per-session credential);
``relay_only`` makes it offer only TURN relay candidates (``iceTransportPolicy: "relay"``), as a browser behind a
strict firewall would.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack, VideoStreamTrack
from aiortc.rtp import RtpPacket

from webrtc_gateway.jitter import InboundOpus, replace_jitter_buffer
from webrtc_gateway.opus import OpusEncoder, OpusTrack, prefer_opus
from webrtc_gateway.playout import FRAME_SAMPLES as FRAME
from webrtc_gateway.playout import RATE


class SignalTrack(MediaStreamTrack):
    """A microphone that plays ``signal`` (48 kHz mono float) in real time, then silence.

    Frame ``n`` (samples ``[n*FRAME, (n+1)*FRAME)``, 40 ms like the gateway's) is returned at
    ``start + (n+1) * 40 ms``, when its last sample has been "captured"; ``start`` is the capture time of sample 0.
    With ``encoded``, the whole signal is Opus-coded up front and the track returns packets instead of frames: a
    load generator then spends its time on the network, not on the codec.
    """

    kind = "audio"

    def __init__(self, signal: np.ndarray, start: float | None = None, encoded: bool = False) -> None:
        super().__init__()
        self.signal = signal.astype(np.float32)
        self.start = start  # given: the same microphone, reattached (what it captured meanwhile is lost)
        self.encoded = encoded
        self._n = 0 if start is None else -1
        self._packets: list[av.Packet] = []
        if encoded:
            encoder = OpusEncoder()
            self._packets = [encoder.encode(self._frame(n)) for n in range(-(-len(self.signal) // FRAME) + 1)]

    async def recv(self) -> av.AudioFrame | av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        if self.start is None:
            self.start = time.monotonic()
        if self._n < 0:
            self._n = int((time.monotonic() - self.start) * RATE) // FRAME
        due = self.start + (self._n + 1) * FRAME / RATE
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        n, self._n = self._n, self._n + 1
        if not self.encoded:
            return self._frame(n)
        packet = self._packets[min(n, len(self._packets) - 1)]  # the last one is silence
        packet.pts = n * FRAME
        return packet

    def _frame(self, n: int) -> av.AudioFrame:
        chunk = self.signal[n * FRAME:(n + 1) * FRAME]
        pcm = np.zeros(FRAME, np.int16)
        pcm[:len(chunk)] = (np.clip(chunk, -1, 1) * 32767).astype(np.int16)
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME)
        frame.planes[0].update(pcm.tobytes())
        frame.sample_rate, frame.pts, frame.time_base = RATE, n * FRAME, fractions.Fraction(1, RATE)
        return frame


class StillCameraTrack(VideoStreamTrack):
    """A camera showing a fixed RGB picture at 5 frames per second."""

    def __init__(self, picture: np.ndarray) -> None:
        super().__init__()
        self.picture = picture

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        await asyncio.sleep(0.2 - 1 / 30)  # VideoStreamTrack paces 30 fps; slow it to 5
        frame = av.VideoFrame.from_ndarray(self.picture, format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        return frame


class ScheduledCameraTrack(VideoStreamTrack):
    """A camera that shows ``frames[k]`` during micro-turn ``k`` of the microphone's clock, at 5 frames per second,
    and sends nothing while ``on[k]`` is false (the gateway then drops the stale picture, as when a browser's camera
    is turned off)."""

    def __init__(self, frames: np.ndarray, on: np.ndarray, mic: SignalTrack) -> None:
        super().__init__()
        self.frames, self.shown, self.mic = frames, on, mic

    async def recv(self) -> av.VideoFrame:
        while True:
            pts, time_base = await self.next_timestamp()
            await asyncio.sleep(0.2 - 1 / 30)
            start = self.mic.start
            k = 0 if start is None else int((time.monotonic() - start) / 0.2)
            if k < len(self.frames) and self.shown[k]:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(self.frames[k]), format="rgb24")
                frame.pts, frame.time_base = pts, time_base
                return frame


@dataclass
class Received:
    # (monotonic arrival, packet, connection number)
    packets: list[tuple[float, RtpPacket, int]] = field(default_factory=list)
    messages: list[tuple[float, dict[str, Any]]] = field(default_factory=list)  # (mic-clock arrival, message)


class PacketRecorder:
    """Takes the place of an inbound audio jitter buffer: keeps each packet as it arrives and hands nothing to the
    decoder (aiortc would pass each one to a decoder thread and back). The client decodes afterwards, so one machine
    can run many sessions against a gateway without the clients' own work skewing what is measured."""

    def __init__(self, packets: list[tuple[float, RtpPacket, int]], connection: int) -> None:
        self.packets = packets
        self.connection = connection

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        self.packets.append((time.monotonic(), packet, self.connection))
        return False, None


class ProbeClient:
    """One browser-like session against a gateway at ``base_url``.

    With ``fallback_urls``, the client resumes the session on the next URL when its connection fails (no audio
    for ``stall_s``) or the gateway asks it to move, like the widget does; ``resumes`` and ``resume_gaps`` (s,
    last frame before the failure to the first frame after) say how it went. With ``relay_only``, ICE uses only
    relay candidates from the TURN server the grant names (a grant without one is an error). With ``encoded_mic``,
    the microphone's signal is Opus-coded before the call (see :class:`SignalTrack`).
    """

    def __init__(self, base_url: str, signal: np.ndarray, picture: np.ndarray | None = None,
                 loss: float = 0.0, seed: int = 0, fallback_urls: tuple[str, ...] = (), stall_s: float = 0.6,
                 relay_only: bool = False, camera: tuple[np.ndarray, np.ndarray] | None = None,
                 encoded_mic: bool = False) -> None:
        self.urls = [u.rstrip("/") for u in (base_url, *fallback_urls)]
        self.base_url = self.urls[0]
        self.signal = signal
        self.picture = picture
        self.camera = camera  # (frames (T, H, W, 3), on (T,)): a camera scheduled by micro-turn
        self.mic = SignalTrack(signal, encoded=encoded_mic)
        self.loss = loss
        self.stall_s = stall_s
        self.dropped_packets = 0
        self.session_id = ""
        self.token = ""
        self.resume_token = ""
        self.resumes = 0
        self.resume_gaps: list[float] = []
        self.received = Received()
        self.errors: list[str] = []
        self.relay_only = relay_only
        self.ice_servers: list[RTCIceServer] = []  # from the latest grant
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # replaced once a grant names the ICE servers
        self.channel = self.pc.createDataChannel("microturn")
        self.channel_open = asyncio.Event()
        self._connection = 0
        self._move = asyncio.Event()
        self._rng = random.Random(seed)
        self._tasks: list[asyncio.Task[Any]] = []
        self._http: aiohttp.ClientSession | None = None
        self._decoded: list[tuple[float, int, np.ndarray, int]] = []
        self._replayed = 0  # received packets decoded so far
        self._streams: dict[int, InboundOpus] = {}  # by connection number

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def now(self) -> float:
        """Seconds on the microphone's clock (0 = capture of the first input sample)."""
        start = self.mic.start
        return time.monotonic() - start if start is not None else -1.0

    async def connect(self) -> None:
        self._http = aiohttp.ClientSession()
        async with self._http.post(f"{self.base_url}/v1/sessions", json={}) as resp:
            body = await resp.json()
            if resp.status != 201:
                raise RuntimeError(f"session refused: {resp.status} {body}")
        self._take_grant(body)
        await self._new_peer()
        await self._negotiate()
        if len(self.urls) > 1:
            self._tasks.append(asyncio.ensure_future(self._keep_alive()))

    def _take_grant(self, grant: dict[str, Any]) -> None:
        self.session_id, self.token = grant["session_id"], grant["token"]
        self.resume_token = grant.get("resume_token", "")
        self.ice_servers = [RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential"))
                            for s in grant.get("ice_servers", [])]
        if self.relay_only and not any(str(url).startswith("turn") for s in self.ice_servers
                                       for url in (s.urls if isinstance(s.urls, list) else [s.urls])):
            raise RuntimeError("relay-only ICE needs a TURN server, and the gateway's grant names none (turn_urls)")

    async def _new_peer(self) -> None:
        """Replace the peer connection (and its data channel) with one using the ICE servers of the latest grant."""
        old = self.pc
        policy = RTCIceTransportPolicy.RELAY if self.relay_only else RTCIceTransportPolicy.ALL
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=self.ice_servers, iceTransportPolicy=policy))
        self.channel = self.pc.createDataChannel("microturn")
        self.channel_open = asyncio.Event()
        await old.close()

    def selected_candidates(self) -> tuple[str, str] | None:
        """The candidate types (``host``, ``srflx``, ``relay``, …) of the selected ICE pair: (local, remote)."""
        senders = self.pc.getSenders()
        transport = senders[0].transport if senders else None
        if transport is None:
            return None
        pair = transport.transport._connection._nominated.get(1)  # aioice has no public accessor for it
        return None if pair is None else (pair.local_candidate.type, pair.remote_candidate.type)

    def last_turn(self) -> int:
        """The last micro-turn whose caption or event arrived."""
        return max((m["turn"] for _, m in self.received.messages if "turn" in m), default=-1)

    async def resume(self) -> None:
        """Move the session to the next gateway URL and connect there."""
        assert self._http is not None
        self.base_url = self.urls[(self.urls.index(self.base_url) + 1) % len(self.urls)]
        async with self._http.post(f"{self.base_url}/v1/sessions/{self.session_id}/resume", json={
                "last_turn": self.last_turn()}, headers={"Authorization": f"Bearer {self.resume_token}"}) as resp:
            body = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"resume refused: {resp.status} {body}")
        self._take_grant(body)
        self.mic = SignalTrack(self.signal, start=self.mic.start, encoded=self.mic.encoded)
        self._connection += 1
        await self._new_peer()
        await self._negotiate()
        self.resumes += 1

    async def _keep_alive(self) -> None:
        """Resume elsewhere when audio stalls or the gateway asks the session to move."""
        while True:
            await asyncio.sleep(0.1)
            frames = self.received.packets
            stalled = bool(frames) and time.monotonic() - frames[-1][0] > self.stall_s
            if not (stalled or self._move.is_set()):
                continue
            self._move.clear()
            last = frames[-1][0] if frames else time.monotonic()
            count = len(frames)
            try:
                await self.resume()
            except Exception as exc:  # try the next URL after a pause
                self.errors.append(f"resume failed: {type(exc).__name__}: {exc}")
                await asyncio.sleep(0.5)
                continue
            while len(self.received.packets) == count:
                await asyncio.sleep(0.01)
            self.resume_gaps.append(self.received.packets[count][0] - last)

    async def _negotiate(self) -> None:
        assert self._http is not None
        mic = self.mic if self.mic.encoded else OpusTrack(self.mic)
        prefer_opus(self.pc.addTransceiver(mic, direction="sendrecv"))
        if self.picture is not None:
            self.pc.addTrack(StillCameraTrack(self.picture))
        elif self.camera is not None:
            self.pc.addTrack(ScheduledCameraTrack(*self.camera, self.mic))
        self.pc.on("track", self._on_track)
        self.channel.on("open", self.channel_open.set)
        self.channel.on("message", self._on_message)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        if self.relay_only and "a=candidate" not in self.pc.localDescription.sdp:
            raise RuntimeError("no relay candidate: the TURN server refused the credential or did not answer")
        async with self._http.post(f"{self.base_url}/v1/sessions/{self.session_id}/offer", headers=self.headers,
                                   json={"type": "offer", "sdp": self.pc.localDescription.sdp}) as resp:
            answer = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"offer refused: {resp.status} {answer}")
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        if self.loss > 0:
            self._impair_uplink()
        async with asyncio.timeout(15):
            await self.channel_open.wait()

    def _impair_uplink(self) -> None:
        """Drop a fraction of outgoing audio RTP packets, as a lossy network would."""
        sender = next(t.sender for t in self.pc.getTransceivers() if t.kind == "audio")
        transport = sender.transport
        send = transport._send_rtp
        ssrc = sender._ssrc

        async def lossy_send(data: bytes) -> None:
            packet = RtpPacket.parse(data) if data[1] < 192 or data[1] > 223 else None
            if packet is not None and packet.ssrc == ssrc and self._rng.random() < self.loss:
                self.dropped_packets += 1
                return
            await send(data)

        transport._send_rtp = lossy_send  # type: ignore[method-assign]

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio":  # its packets are recorded as they arrive; the track itself never yields a frame
            receiver = next(t.receiver for t in self.pc.getTransceivers() if t.receiver.track is track)
            replace_jitter_buffer(receiver, PacketRecorder(self.received.packets, self._connection))

    def _on_message(self, raw: str | bytes) -> None:
        try:
            message = json.loads(raw)
        except ValueError:
            self.errors.append(f"unparseable message {raw!r:.80}")
            return
        self.received.messages.append((self.now(), message))
        if message.get("type") == "reconnect":
            self._move.set()
        if message.get("type") == "error":
            self.errors.append(f"{message.get('code')}: {message.get('message')}")

    def send(self, message: dict[str, Any]) -> None:
        self.channel.send(json.dumps(message))

    async def state(self) -> dict[str, Any]:
        assert self._http is not None
        async with self._http.get(f"{self.base_url}/v1/sessions/{self.session_id}", headers=self.headers) as r:
            result: dict[str, Any] = await r.json()
            return result

    async def close(self, delete: bool = True) -> None:
        if delete and self._http is not None and self.session_id:
            with contextlib.suppress(aiohttp.ClientError):
                async with self._http.delete(f"{self.base_url}/v1/sessions/{self.session_id}",
                                             headers=self.headers):
                    pass
        for task in self._tasks:
            task.cancel()
        await self.pc.close()
        if self._http is not None:
            await self._http.close()

    def audio(self) -> list[tuple[float, int, np.ndarray, int]]:
        """Received audio decoded, packet by packet: (monotonic arrival, pts, 48 kHz mono, connection number)."""
        packets = self.received.packets
        for arrival, packet, connection in packets[self._replayed:]:
            if connection not in self._streams:
                self._streams[connection] = InboundOpus()
            pieces = self._streams[connection].decode(packet)
            self._decoded += [(arrival, pts, mono, connection) for pts, mono in pieces]
        self._replayed = len(packets)
        return self._decoded

    def audio_seconds(self) -> float:
        """How much audio has come back."""
        return sum(len(pcm) for _, _, pcm, _ in self.audio()) / RATE

    def output(self, seconds: float) -> np.ndarray:
        """Received audio (48 kHz mono) on the microphone's clock, ``seconds`` long."""
        out = np.zeros(int(seconds * RATE), np.float32)
        frames = self.audio()
        if not frames:
            return out
        start0 = self.mic.start or 0.0
        by_connection: dict[int, list[float]] = {}
        for arrival, pts, _, connection in frames:
            by_connection.setdefault(connection, []).append(arrival - start0 - pts / RATE)
        offsets = {c: float(np.quantile(v, 0.95)) for c, v in by_connection.items()}
        for _, pts, pcm, connection in frames:
            start = int(round((pts / RATE + offsets[connection]) * RATE))
            lo, hi = max(start, 0), min(start + len(pcm), len(out))
            if hi > lo:
                out[lo:hi] = pcm[lo - start:hi - start]
        return out

    def captions(self) -> list[dict[str, Any]]:
        return [m for _, m in self.received.messages if m.get("type") == "caption"]

    def longest_caption_gap(self) -> float:
        """The longest time (s) between two captions arriving; 0 with fewer than two."""
        times = [t for t, m in self.received.messages if m.get("type") == "caption"]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)
