"""One browser's session inside a gateway, and its single teardown path.

A session is composed of small parts, each owning one job (see DESIGN.md, "the path of one micro-turn"):

- the peer connection (aiortc) with one inbound audio track, an optional inbound video track, the outbound
  :class:`~webrtc_gateway.playout.PlayoutTrack`, and the ``microturn`` data channel;
- ingest (:mod:`webrtc_gateway.ingest`) onto the input timeline, and the micro-turn clock
  (:mod:`webrtc_gateway.dispatch`) that submits each due micro-turn to the engine;
- egress: outputs, awaited in micro-turn order, go to the playout buffer (audio) and the data channel (captions and
  events).

:meth:`GatewaySession.close` is the one way a session ends — client hang-up, failed connection, idle timeout, DELETE,
or gateway shutdown — and it frees all of it: tasks, tracks, peer connection, the engine's state, the store record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from aiortc.rtcdatachannel import RTCDataChannel

from inference.engine import Engine, SessionClosed
from microturn.config import Settings
from microturn.contracts import MICRO_TURN_MS, ControlEvent, MicroTurn, MicroTurnOutput
from webrtc_gateway import messages
from webrtc_gateway.dispatch import MicroTurnClock
from webrtc_gateway.ingest import AudioIngest, Inbox, VideoIngest
from webrtc_gateway.jitter import use_pass_through
from webrtc_gateway.playout import PlayoutTrack
from webrtc_gateway.timeline import InputTimeline, MediaClock

log = logging.getLogger(__name__)


class OfferError(Exception):
    """The browser's offer cannot be accepted; the message says why."""


def ice_configuration(settings: Settings) -> RTCConfiguration:
    return RTCConfiguration(iceServers=[RTCIceServer(urls=url) for url in settings.ice_servers])


class GatewaySession:
    """Peer connection, ingest, micro-turn clock, playout and data channel of one session."""

    def __init__(self, session_id: str, settings: Settings, engine: Engine,
                 on_closed: Callable[[GatewaySession], Awaitable[None]]) -> None:
        self.session_id = session_id
        self.settings = settings
        self.engine = engine
        self.created = time.monotonic()
        self.pc = RTCPeerConnection(ice_configuration(settings))
        self.timeline = InputTimeline()
        self.media_clock = MediaClock()
        self.audio = AudioIngest(self.timeline, self.media_clock)
        self.video = VideoIngest()
        self.inbox = Inbox(self.timeline, self.media_clock)
        self.clock = MicroTurnClock(session_id, self.audio, self.video, self.inbox,
                                    settings.deadline_grace_ms / 1000)
        self.playout = PlayoutTrack()
        self.channel: RTCDataChannel | None = None
        self.captions_sent = 0
        self.errors_sent = 0
        self.messages_received = 0
        self.closed = asyncio.Event()
        self._on_closed = on_closed
        self._outputs: asyncio.Queue[asyncio.Future[MicroTurnOutput]] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._engine_open = False
        self._audio_seen = False

    # -- setup ------------------------------------------------------------------------------------------------

    async def accept(self, offer_sdp: str) -> str:
        """Apply the browser's offer and return the answer SDP."""
        if "m=audio" not in offer_sdp:
            raise OfferError("the offer has no audio track; microturn needs the microphone")
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("connectionstatechange", self._on_connection_state)
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except Exception as exc:  # aiortc's parser raises assorted errors (even AssertionError) on bad SDP
            raise OfferError(f"the offer is not valid SDP: {type(exc).__name__} {exc}".strip()) from exc
        audio = [t for t in self.pc.getTransceivers() if t.kind == "audio"]
        if not audio or audio[0].receiver.track is None:
            raise OfferError("the offer has no audio track the gateway can receive")
        self.pc.addTrack(self.playout)
        await self.engine.open_session(self.session_id, seed=zlib.crc32(self.session_id.encode()))
        self._engine_open = True
        try:
            answer = await self.pc.createAnswer()
        except Exception as exc:
            raise OfferError(f"no codec in the offer is supported (audio needs Opus): {exc}") from exc
        await self.pc.setLocalDescription(answer)
        self._spawn(self._watch_connect(), "connect-timeout")
        return str(self.pc.localDescription.sdp)

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(f"{self.session_id}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("session %s task %s failed", self.session_id, task.get_name(), exc_info=task.exception())
            asyncio.ensure_future(self.close("internal error"))

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and not self._audio_seen:
            self._audio_seen = True
            receiver = next(t.receiver for t in self.pc.getTransceivers() if t.receiver.track is track)
            use_pass_through(receiver)
            self._spawn(self.audio.run(track), "audio-ingest")
            self._spawn(self.clock.run(self._submit), "micro-turn-clock")
            self._spawn(self._egress(), "egress")
            self._spawn(self._watch_idle(), "idle")
        elif track.kind == "video":
            self._spawn(self.video.run(track), "video-ingest")
        else:
            self._spawn(_drain(track), "drain-extra-track")

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label != messages.CHANNEL_LABEL:
            channel.close()
            return
        self.channel = channel
        channel.on("message", self._on_message)
        self._send({"type": "session", "session_id": self.session_id, "micro_turn_ms": MICRO_TURN_MS})

    async def _on_connection_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            await self.close(f"connection {self.pc.connectionState}")

    async def _watch_connect(self) -> None:
        await asyncio.sleep(self.settings.connect_timeout_s)
        if self.pc.connectionState != "connected":
            await self.close("peer never connected")

    async def _watch_idle(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            frames = self.audio.frames
            await asyncio.sleep(self.settings.idle_timeout_s)
            if self.audio.frames == frames:
                await self.close("no audio received")
                return

    # -- the micro-turn path ----------------------------------------------------------------------------------

    def _submit(self, turn: MicroTurn) -> None:
        self._outputs.put_nowait(self.engine.submit(turn))

    async def _egress(self) -> None:
        while True:
            future = await self._outputs.get()
            try:
                output = await future
            except SessionClosed:
                return
            self.playout.push(output.audio)
            if output.text:
                self.captions_sent += 1
                self._send({"type": "caption", "turn": output.index, "text": output.text})
            for event in output.events:
                self._send({"type": "event", "turn": output.index, "name": event.name, "data": event.data})

    def _on_message(self, raw: str | bytes) -> None:
        self.messages_received += 1
        try:
            message = messages.parse_client_message(raw, self.settings.max_message_bytes,
                                                    self.settings.max_text_chars)
        except messages.MessageError as exc:
            self.send_error(exc.code, exc.message)
            return
        if isinstance(message, messages.TextMessage):
            self.inbox.put(message.text)
        elif isinstance(message, messages.ControlMessage):
            self.inbox.put(ControlEvent(message.name, message.data))
        else:
            self._send({"type": "pong", "id": message.id, "server_time": time.time()})

    def send_reconnect(self, reason: str) -> None:
        """Ask the browser to move the session elsewhere (the gateway is going away)."""
        self._send({"type": "reconnect", "reason": reason})

    def send_error(self, code: str, message: str) -> None:
        self.errors_sent += 1
        self._send({"type": "error", "code": code, "message": message})

    def _send(self, message: dict[str, Any]) -> None:
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(messages.encode(message))

    # -- teardown ---------------------------------------------------------------------------------------------

    async def close(self, reason: str) -> None:
        """End the session and free everything it holds. Safe to call more than once."""
        if self._closing:
            return
        self._closing = True
        log.info("session %s closing: %s", self.session_id, reason)
        self.playout.stop_speaking()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        for task in list(self._tasks):
            if task is not current:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._engine_open:
            await self.engine.close_session(self.session_id)
        self.playout.stop()
        await self.pc.close()
        self.closed.set()
        await self._on_closed(self)


async def _drain(track: MediaStreamTrack) -> None:
    with contextlib.suppress(Exception):
        while True:
            await track.recv()
