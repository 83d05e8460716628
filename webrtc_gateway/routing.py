"""Which process of a multi-process gateway holds a session: its id says so, and nothing else needs to.

A session id is 32 hex digits. :func:`new_session_id` draws random ids until one falls to the process that makes
it, so that the front (:mod:`webrtc_gateway.front`) routes every later call of that session by the id alone,
with no table to keep in step with sessions that end. Any string maps to some process, so an id the gateway never
made gets the answer a single process would give (404, or 401 without a token).
"""

from __future__ import annotations

import secrets
import zlib


def process_of(session_id: str, processes: int) -> int:
    """The index of the process that holds ``session_id``, among ``processes``."""
    return zlib.crc32(session_id.encode()) % processes


def new_session_id(process_index: int = 0, processes: int = 1) -> str:
    """A fresh random session id that :func:`process_of` maps to ``process_index``."""
    if not 0 <= process_index < processes:
        raise ValueError(f"process index {process_index} is not one of {processes} processes")
    while True:  # on average ``processes`` draws
        session_id = secrets.token_hex(16)
        if process_of(session_id, processes) == process_index:
            return session_id
