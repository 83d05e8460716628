"""Signed, expiring session tokens.

A token is ``base64url(json payload) + "." + base64url(HMAC-SHA256(secret, payload))``. The payload names the
session (``sid``), what the token allows (``scope``, e.g. ``connect``) and when it stops working (``exp``, unix
seconds). Gateways that share the secret accept each other's tokens.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass


class TokenError(Exception):
    """A token is missing, malformed, forged, expired, or for another session or scope.

    ``forbidden`` marks a genuine token that does not allow this call (another session, another scope): HTTP 403
    rather than 401.
    """

    def __init__(self, message: str, forbidden: bool = False) -> None:
        super().__init__(message)
        self.forbidden = forbidden


@dataclass(frozen=True)
class TokenClaims:
    sid: str
    scope: str
    exp: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    """Issues and checks tokens with one secret."""

    def __init__(self, secret: str) -> None:
        self._key = secret.encode()

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def issue(self, sid: str, scope: str, ttl_s: float, now: float | None = None) -> str:
        exp = (time.time() if now is None else now) + ttl_s
        payload = json.dumps({"sid": sid, "scope": scope, "exp": round(exp, 3)}, separators=(",", ":")).encode()
        return f"{_b64(payload)}.{_b64(self._mac(payload))}"

    def verify(self, token: str, sid: str, scope: str, now: float | None = None) -> TokenClaims:
        try:
            body, mac = token.split(".")
            payload = _unb64(body)
            given = _unb64(mac)
        except ValueError as exc:
            raise TokenError("malformed token") from exc
        if not hmac.compare_digest(given, self._mac(payload)):
            raise TokenError("token signature is invalid")
        try:
            claims = TokenClaims(**json.loads(payload))
        except (ValueError, TypeError) as exc:
            raise TokenError("malformed token") from exc
        if claims.exp < (time.time() if now is None else now):
            raise TokenError("token has expired")
        if claims.sid != sid:
            raise TokenError("token is for another session", forbidden=True)
        if claims.scope != scope:
            raise TokenError(f"token scope is {claims.scope!r}, not {scope!r}", forbidden=True)
        return claims
