"""``echo``: a diagnostic model that returns each micro-turn's input audio as that micro-turn's output.

Its caption is the input level, so a person (or a test) can see that the gateway hears them; typed text and
background results are echoed back in the caption too. Typed text that starts with ``/bg `` is a diagnostic
trigger: the model asks for a background task with the rest as its request (a ``background_request`` event, as
the reference model's reserved span does). It keeps no state beyond a set of open sessions.
"""

from __future__ import annotations

from microturn.audio import rms_dbfs
from microturn.contracts import MicroTurn, MicroTurnOutput, OutputEvent


class EchoModel:
    """A :class:`~microturn.contracts.ModelBackend` that echoes audio and reports its level."""

    name = "echo"

    def __init__(self) -> None:
        self.sessions: set[str] = set()

    def open(self, session_id: str, seed: int) -> None:
        self.sessions.add(session_id)

    def restore(self, session_id: str, seed: int, history: list[bytes]) -> None:
        """Echo has no state beyond the current micro-turn: restoring is opening."""
        self.open(session_id, seed)

    def close(self, session_id: str) -> None:
        self.sessions.discard(session_id)

    def step(self, turns: list[MicroTurn]) -> list[MicroTurnOutput]:
        outputs = []
        for turn in turns:
            level = rms_dbfs(turn.audio)
            caption = f"[{turn.index}] {level:.0f} dBFS"
            if turn.text:
                caption += " · you wrote: " + " ".join(turn.text)
            if turn.background:
                caption += " · background: " + " | ".join(turn.background)
            events = tuple(OutputEvent("control", {"name": e.name}) for e in turn.events)
            events += tuple(OutputEvent("background_request", {"request": t[4:].strip()})
                            for t in turn.text if t.startswith("/bg ") and t[4:].strip())
            outputs.append(MicroTurnOutput(turn.session_id, turn.index, turn.audio.copy(), caption, events))
        return outputs
