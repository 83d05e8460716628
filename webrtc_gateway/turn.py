"""Time-limited TURN credentials for browsers, minted per session (the "TURN REST API" that coturn checks).

A browser that cannot reach the gateway over UDP directly relays its media through a TURN server. The gateway does
not hand out a fixed TURN password: with coturn's ``use-auth-secret`` and ``static-auth-secret=SECRET`` (the
gateway's ``turn_secret``), every session gets its own credential, valid for ``turn_ttl_s`` seconds
(draft-uberti-behave-turn-rest-00):

- username ``"<unix expiry>:<session id>"``;
- credential ``base64(HMAC-SHA1(SECRET, username))``.

coturn recomputes the credential from the username and refuses it (401) once the expiry has passed, so a credential
copied out of a page is of no use for long and none has to be stored or revoked.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any

from microturn.config import Settings


class TurnConfigError(ValueError):
    """The TURN settings cannot work: the gateway refuses to start."""


def check_settings(settings: Settings) -> None:
    """Refuse TURN URLs without the secret that signs their credentials (and other settings that cannot work)."""
    if not settings.turn_urls:
        return
    if not settings.turn_secret:
        raise TurnConfigError(
            "turn_urls are set but turn_secret is empty: set MICROTURN_TURN_SECRET (or --turn-secret) to the TURN "
            "server's static-auth-secret (coturn: use-auth-secret), or leave turn_urls empty")
    bad = [url for url in settings.turn_urls if not url.startswith(("turn:", "turns:"))]
    if bad:
        raise TurnConfigError(f"turn_urls must be turn: or turns: URLs, got {', '.join(bad)}")
    if settings.turn_ttl_s <= 0:
        raise TurnConfigError(f"turn_ttl_s must be positive, got {settings.turn_ttl_s}")


def mint_credential(secret: str, session_id: str, ttl_s: int, now: float | None = None) -> tuple[str, str]:
    """``(username, credential)`` for ``session_id``, valid until ``now + ttl_s`` (a negative ttl: already expired)."""
    expiry = int(time.time() if now is None else now) + ttl_s
    username = f"{expiry}:{session_id}"
    return username, sign(secret, username)


def sign(secret: str, username: str) -> str:
    """The credential coturn expects for ``username``: base64(HMAC-SHA1(secret, username))."""
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def ice_server(settings: Settings, session_id: str, now: float | None = None) -> dict[str, Any]:
    """The ``RTCIceServer`` entry for the TURN URLs, with a fresh credential for ``session_id``."""
    username, credential = mint_credential(settings.turn_secret, session_id, settings.turn_ttl_s, now)
    return {"urls": list(settings.turn_urls), "username": username, "credential": credential}
