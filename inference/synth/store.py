"""A conversation's files: ``<id>.npz`` (the media) and ``<id>.json`` (the labels), byte for byte reproducible.

``numpy.savez`` stamps each member with the time of writing; here every member gets a fixed date, mode and
compression, so the same conversation always gives the same bytes (``np.load`` reads them as any ``.npz``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile
from typing import Any

import numpy as np

from inference.synth.timeline import Episode

_EPOCH = (1980, 1, 1, 0, 0, 0)


def encode(episode: Episode) -> tuple[bytes, bytes]:
    """The ``.npz`` and ``.json`` bytes of ``episode``."""
    return _npz({"user_audio": episode.user_audio, "model_audio": episode.model_audio, "video": episode.video,
                 "camera": episode.camera}), (json.dumps(labels(episode)) + "\n").encode()


def labels(episode: Episode) -> dict[str, Any]:
    """The ``.json`` document of ``episode``."""
    return {
        "id": episode.id, "split": episode.split, "scenario": episode.scenario,
        "voice": dataclasses.asdict(episode.voice), "noise": dataclasses.asdict(episode.noise),
        "phrasing": episode.phrasing, "turns": episode.turns,
        "user_text": episode.user_text, "background": episode.background, "model_text": episode.model_text,
        "model_speaks": episode.model_speaks,
        "user_speech": [list(s) for s in episode.user_speech], "user_speech_text": episode.user_speech_text,
        "model_speech": [list(s) for s in episode.model_speech], "pauses": [list(s) for s in episode.pauses],
        "overlaps": [list(s) for s in episode.overlaps],
        "questions": [dataclasses.asdict(q) for q in episode.questions],
    }


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, array in arrays.items():
            member = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
            member.compress_type = zipfile.ZIP_DEFLATED
            member.external_attr = 0o644 << 16
            with archive.open(member, "w") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()
