"""One browser's session inside a gateway, and its single teardown path.

A session is composed of small parts, each owning one job (see DESIGN.md, "the path of one micro-turn"):

- the peer connection (aiortc) with one inbound audio track, an optional inbound video track, the outbound
  :class:`~webrtc_gateway.playout.PlayoutTrack` (encoded by :class:`~webrtc_gateway.opus.OpusTrack`), and the
  ``microturn`` data channel;
- ingest (:mod:`webrtc_gateway.ingest`, fed by :mod:`webrtc_gateway.jitter` as packets arrive) onto the input
  timeline, and the micro-turn clock
  (:mod:`webrtc_gateway.dispatch`) that submits each due micro-turn to the engine;
- egress: outputs, awaited in micro-turn order, go to the playout buffer (audio) and the data channel (captions and
  events).

:meth:`GatewaySession.close` is the one way a session ends — client hang-up, failed connection, idle timeout, DELETE,
or gateway shutdown — and it frees all of it here: tasks, tracks, peer connection, the engine's state. The session's
stored state stays for a resume unless the browser ended it (``keep_state=False``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.exceptions import OperationError
from aiortc.mediastreams import MediaStreamTrack
from aiortc.rtcdatachannel import RTCDataChannel

from inference.background.tasks import BackgroundItem, Task
from microturn import logs
from microturn.config import Settings
from microturn.contracts import (
    MICRO_TURN_MS,
    MICRO_TURN_SAMPLES,
    ControlEvent,
    MicroTurn,
    MicroTurnEngine,
    MicroTurnOutput,
    SessionClosed,
    TurnNotStepped,
)
from microturn.histogram import Histogram
from webrtc_gateway import messages, peer_stats
from webrtc_gateway.background import SessionBackground
from webrtc_gateway.conversation_log import ConversationLog
from webrtc_gateway.dispatch import MicroTurnClock
from webrtc_gateway.ingest import AudioIngest, Inbox, VideoIngest
from webrtc_gateway.jitter import DecodingJitterBuffer, replace_jitter_buffer
from webrtc_gateway.opus import OpusTrack, prefer_opus, with_packet_time
from webrtc_gateway.playout import PlayoutTrack
from webrtc_gateway.store import LogEntry
from webrtc_gateway.timeline import InputTimeline, MediaClock

log = logging.getLogger(__name__)

PEER_STATS_INTERVAL_S = 5.0


class OfferError(Exception):
    """The browser's offer cannot be accepted; the message says why."""


@dataclass
class ResumePlan:
    """How a session that moved here picks up where it was.

    The engine rebuilds the model's context from ``history`` (the context records of micro-turns ``0 …
    first_turn − 1``). The time the session was away is represented as ``gap_turns`` silent micro-turns, stepped
    (and logged) before live input resumes, so live micro-turn indices go on from ``first_turn + gap_turns``.
    ``missed`` are captions and events the old gateway produced and logged but may not have delivered.
    ``tasks`` are the session's background tasks and ``delivered`` how many items of each its context has had;
    ``said`` is every caption and event logged so far (the conversation text a background task is given).
    """

    history: list[bytes]
    first_turn: int
    gap_turns: int
    missed: list[dict[str, Any]]
    tasks: list[Task] = field(default_factory=list)
    delivered: dict[str, int] = field(default_factory=dict)
    said: list[dict[str, Any]] = field(default_factory=list)


def model_task_id(turn: int, k: int) -> str:
    """The id of the task the model asked for with the ``k``-th request of micro-turn ``turn``: known from the log
    alone, so that a resume can tell whether that task was recorded."""
    return f"model-{turn}-{k}"


def ice_configuration(settings: Settings) -> RTCConfiguration:
    return RTCConfiguration(iceServers=[RTCIceServer(urls=url) for url in settings.ice_servers])


class GatewaySession:
    """Peer connection, ingest, micro-turn clock, playout and data channel of one session."""

    def __init__(self, session_id: str, seed: int, settings: Settings, engine: MicroTurnEngine, log: ConversationLog,
                 on_closed: Callable[[GatewaySession], Awaitable[None]], background: SessionBackground,
                 turn_latency: Histogram) -> None:
        self.session_id = session_id
        self.background = background
        self.seed = seed
        self.settings = settings
        self.engine = engine
        self.log = log
        self.keep_state = True  # whether closing leaves the session's state for a resume
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
        self.turns_not_stepped = 0
        self.peer: peer_stats.PeerStats | None = None  # inbound audio quality, sampled for /metrics
        self.turn_latency = turn_latency  # the gateway's: micro-turn submitted → output back, all sessions
        self.errors_sent = 0
        self.messages_received = 0
        self._on_closed = on_closed
        self._outputs: asyncio.Queue[tuple[int, float, asyncio.Future[MicroTurnOutput]]] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._engine_open = False
        self._audio_seen = False
        self._missed: list[dict[str, Any]] = []
        self._woven: dict[int, list[BackgroundItem]] = {}  # micro-turn index → background items it carries
        self._typed: dict[int, tuple[str, ...]] = {}  # micro-turn index → user text it carries

    # -- setup ------------------------------------------------------------------------------------------------

    async def accept(self, offer_sdp: str, plan: ResumePlan | None = None) -> str:
        """Apply the browser's offer and return the answer SDP; with ``plan``, pick up a session that moved."""
        if "m=audio" not in offer_sdp:
            raise OfferError("the offer has no audio track; microturn needs the microphone")
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("connectionstatechange", self._on_connection_state)
        # the offer's first audio m-line takes this transceiver, which negotiates Opus only (what OpusTrack sends)
        prefer_opus(self.pc.addTransceiver(OpusTrack(self.playout), direction="sendrecv"))
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except OperationError as exc:  # no codec in common for some m-line
            raise OfferError(f"no codec in the offer is supported (audio needs Opus): {exc}") from exc
        except Exception as exc:  # aiortc's parser raises assorted errors (even AssertionError) on bad SDP
            raise OfferError(f"the offer is not valid SDP: {type(exc).__name__} {exc}".strip()) from exc
        audio = [t for t in self.pc.getTransceivers() if t.kind == "audio"]
        if not audio or audio[0].receiver.track is None:
            raise OfferError("the offer has no audio track the gateway can receive")
        if plan is None:
            await self.engine.open_session(self.session_id, self.seed)
        else:
            await self._pick_up(plan)
        self._engine_open = True
        self._spawn(self.background.run_writer(), "background-writer")
        try:
            answer = await self.pc.createAnswer()
        except Exception as exc:
            raise OfferError(f"no codec in the offer is supported (audio needs Opus): {exc}") from exc
        await self.pc.setLocalDescription(answer)
        self._spawn(self._watch_connect(), "connect-timeout")
        self._spawn(self._watch_age(), "max-session-length")
        return with_packet_time(str(self.pc.localDescription.sdp))

    async def _pick_up(self, plan: ResumePlan) -> None:
        await self.engine.open_session(self.session_id, self.seed, history=plan.history)
        silence = np.zeros(MICRO_TURN_SAMPLES, np.float32)
        for index in range(plan.first_turn, plan.first_turn + plan.gap_turns):
            output = await self.engine.submit(MicroTurn(self.session_id, index, silence))
            self.log.add(LogEntry(self.session_id, index, output.context))
        self.clock.base = plan.first_turn + plan.gap_turns
        self._missed = [m for m in plan.missed if m.get("type") != "user_text"]  # the browser typed those
        for message in plan.said:
            self._note(message)
        self.background.resume(plan.tasks, plan.delivered)
        self._restart_lost_requests(plan)

    def _restart_lost_requests(self, plan: ResumePlan) -> None:
        """Start the tasks the model asked for whose state never reached the store (the old gateway died between
        logging the request and writing the task): their ids follow from where the request was logged."""
        known = {t.task_id for t in plan.tasks}
        counts: dict[int, int] = {}
        for message in plan.said:
            if message.get("type") == "event" and message.get("name") == "background_request":
                turn = int(message.get("turn", -1))
                k = counts[turn] = counts.get(turn, -1) + 1
                request = str((message.get("data") or {}).get("request", "")).strip()
                task_id = model_task_id(turn, k)
                if request and task_id not in known:
                    log.info("session %s: restarting the model's request of micro-turn %d, whose task was lost",
                             self.session_id, turn)
                    self.background.start_or_fail(request, "model", task_id, plan.delivered.get(task_id, 0))

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        async def bound() -> Any:  # the task's log lines carry the session id
            logs.bind_session(self.session_id)
            return await coro

        task = asyncio.ensure_future(bound())
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
            # packets are decoded and fed to the ingest as they arrive; the track itself never yields a frame
            replace_jitter_buffer(receiver, DecodingJitterBuffer(self.audio.feed))
            self._spawn(self.clock.run(self._submit), "micro-turn-clock")
            self._spawn(self._egress(), "egress")
            self._spawn(self._watch_idle(), "idle")
            self._spawn(self._watch_peer(), "peer-stats")
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
        if channel.readyState == "open":  # aiortc opens a channel the browser made before announcing it
            self._greet()
        else:
            channel.on("open", self._greet)

    def _greet(self) -> None:
        self._send({"type": "session", "session_id": self.session_id, "micro_turn_ms": MICRO_TURN_MS,
                    "first_turn": self.clock.base})
        for message in self._missed:  # produced before the move, perhaps never delivered
            self._send(message)
        self._missed = []

    async def _on_connection_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            await self.close(f"connection {self.pc.connectionState}", keep_state=True)

    async def _watch_connect(self) -> None:
        await asyncio.sleep(self.settings.connect_timeout_s)
        if self.pc.connectionState != "connected":
            await self.close("peer never connected", keep_state=True)

    async def _watch_age(self) -> None:
        await asyncio.sleep(self.settings.max_session_s)
        self.send_error("session_expired", f"sessions last at most {self.settings.max_session_s:.0f} s; "
                                           "start a new one")
        await asyncio.sleep(0.2)  # let the message leave before the peer closes
        await self.close("reached the maximum session length", keep_state=False)

    async def _watch_idle(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            frames = self.audio.frames
            await asyncio.sleep(self.settings.idle_timeout_s)
            if self.audio.frames == frames:
                await self.close("no audio received", keep_state=True)
                return

    async def _watch_peer(self) -> None:
        while True:
            await asyncio.sleep(PEER_STATS_INTERVAL_S)
            self.peer = await peer_stats.sample(self.pc)

    # -- the micro-turn path ----------------------------------------------------------------------------------

    def _submit(self, turn: MicroTurn) -> None:
        if turn.text:
            self._typed[turn.index] = turn.text
        items = self.background.take()
        if items:  # the background input stream: what tasks reported since the last micro-turn
            self._woven[turn.index] = items
            texts = tuple(text for item in items if (text := item.context_text()))
            turn = dataclasses.replace(turn, background=turn.background + texts)
        self._outputs.put_nowait((turn.index, time.perf_counter(), self.engine.submit(turn)))

    async def _egress(self) -> None:
        while True:
            index, submitted, future = await self._outputs.get()
            try:
                output = await future
            except SessionClosed:
                return
            except TurnNotStepped as exc:  # the session goes on; this micro-turn is silent and not in the context
                self.turns_not_stepped += 1
                log.warning("session %s: a micro-turn was not stepped: %s", self.session_id, exc)
                self.background.give_back(self._woven.pop(index, []))
                for text in self._typed.pop(index, ()):  # typed text goes in with the next micro-turn instead
                    self.inbox.put(text)
                continue
            self.turn_latency.observe(time.perf_counter() - submitted)
            self.playout.push(output.audio)
            sent = []
            if output.text:
                self.captions_sent += 1
                sent.append({"type": "caption", "turn": output.index, "text": output.text})
            sent.extend({"type": "event", "turn": output.index, "name": e.name, "data": e.data} for e in output.events)
            delivered = {}
            for item in self._woven.pop(output.index, []):
                sent.append({"type": "event", "turn": output.index, "name": item.event_name,
                             "data": item.event_data()})
                delivered[item.task_id] = item.seq + 1
            for message in sent:
                self._send(message)
                self._note(message)
            typed = [{"type": "user_text", "turn": output.index, "text": t} for t in self._typed.pop(index, ())]
            self.log.add(LogEntry(self.session_id, output.index, output.context, typed + sent, delivered))
            requests = [e for e in output.events if e.name == "background_request"]
            for k, event in enumerate(requests):
                if str(event.data.get("request", "")).strip():
                    self.background.start_or_fail(str(event.data["request"]), "model",
                                                  task_id=model_task_id(output.index, k))

    def _note(self, message: dict[str, Any]) -> None:
        """Add a caption, event or (logged) user text to the conversation text background tasks are given."""
        if message.get("type") == "user_text":
            self.background.transcript.user(str(message.get("text", "")))
        elif message.get("type") == "caption":
            self.background.transcript.model(str(message.get("text", "")))
        elif message.get("type") == "event":
            data = message.get("data") or {}
            detail = data.get("text") or data.get("error") or data.get("request") or data.get("name") or ""
            self.background.transcript.event(f"{message.get('name')} {detail}".strip())

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
            self.background.transcript.user(message.text)
        elif isinstance(message, messages.ControlMessage):
            self.inbox.put(ControlEvent(message.name, message.data))
            self.background.transcript.event(message.name)
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

    async def close(self, reason: str, keep_state: bool = True) -> None:
        """End the session here and free everything it holds. Safe to call more than once.

        ``keep_state`` leaves the session's state in the store, so the browser can resume it (here or on another
        gateway); False (the browser hung up, or never connected) deletes it.
        """
        if self._closing:
            return
        self._closing = True
        self.keep_state = keep_state
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
        await self.background.close()
        if self._engine_open:
            await self.engine.close_session(self.session_id)
        self.playout.stop()
        await self.pc.close()
        await self._on_closed(self)


async def _drain(track: MediaStreamTrack) -> None:
    with contextlib.suppress(Exception):
        while True:
            await track.recv()
