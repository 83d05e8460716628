"""``tally``: a deterministic stateful diagnostic model, for showing that a session's context survives a move.

Each micro-turn it folds what it heard — the input level quantised to whole dB, any typed text and any background
results — into a running digest of the whole conversation, and reports the digest in its caption (and as a short
tone whose pitch the digest chooses). A session rebuilt elsewhere from its context records gives the same captions
as one that never moved; one that lost or repeated a micro-turn does not. Its context record is the level byte plus
the text and background results: no audio.
"""

from __future__ import annotations

import hashlib

import numpy as np

from microturn.audio import rms_dbfs
from microturn.contracts import MICRO_TURN_SAMPLES, SAMPLE_RATE, MicroTurn, MicroTurnOutput


def _record(turn: MicroTurn) -> bytes:
    level = int(round(rms_dbfs(turn.audio))) + 128  # −100…0 dBFS → 28…128, one byte
    record = bytes([level]) + "\x1f".join(turn.text).encode()
    if turn.background:  # background results, after a record separator
        record += ("\x1e" + "\x1f".join(turn.background)).encode()
    return record


class TallyModel:
    """A :class:`~microturn.contracts.ModelBackend` whose state is a digest of every micro-turn so far."""

    name = "tally"

    def __init__(self) -> None:
        self.digests: dict[str, bytes] = {}

    def open(self, session_id: str, seed: int) -> None:
        self.digests[session_id] = seed.to_bytes(8, "big", signed=False)

    def restore(self, session_id: str, seed: int, history: list[bytes]) -> None:
        self.open(session_id, seed)
        for record in history:
            self.digests[session_id] = self._fold(self.digests[session_id], record)

    def close(self, session_id: str) -> None:
        self.digests.pop(session_id, None)

    @staticmethod
    def _fold(digest: bytes, record: bytes) -> bytes:
        return hashlib.blake2b(digest + record, digest_size=8).digest()

    def step(self, turns: list[MicroTurn]) -> list[MicroTurnOutput]:
        outputs = []
        for turn in turns:
            record = _record(turn)
            digest = self._fold(self.digests[turn.session_id], record)
            self.digests[turn.session_id] = digest
            pitch = 300 + digest[0] * 2  # Hz
            t = np.arange(MICRO_TURN_SAMPLES // 4) / SAMPLE_RATE
            audio = np.zeros(MICRO_TURN_SAMPLES, np.float32)
            audio[: len(t)] = 0.1 * np.sin(2 * np.pi * pitch * t)
            caption = f"[{turn.index}] {digest.hex()}"
            if turn.background:
                caption += " · background: " + " | ".join(turn.background)
            outputs.append(MicroTurnOutput(turn.session_id, turn.index, audio, caption, context=record))
        return outputs
