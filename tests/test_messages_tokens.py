"""The data-channel schema and session tokens."""

from __future__ import annotations

import json

import pytest

from webrtc_gateway.messages import (
    ControlMessage,
    MessageError,
    PingMessage,
    TextMessage,
    parse_client_message,
)
from webrtc_gateway.tokens import TokenError, TokenSigner


def parse(raw: str | bytes) -> object:
    return parse_client_message(raw, max_bytes=4096, max_text_chars=2000)


def test_valid_messages() -> None:
    assert parse('{"type": "text", "text": "hi"}') == TextMessage("hi")
    assert parse('{"type": "control", "name": "mute"}') == ControlMessage("mute", {})
    assert parse('{"type": "ping", "id": 7}') == PingMessage(7)


@pytest.mark.parametrize("raw, code", [
    (b"\x00\x01", "binary_not_supported"),
    ("not json", "invalid_json"),
    ("[1, 2]", "invalid_message"),
    ('{"type": 3}', "invalid_message"),
    ('{"type": "dance"}', "unknown_type"),
    ('{"type": "text", "text": ""}', "invalid_message"),
    ('{"type": "text", "text": 5}', "invalid_message"),
    (json.dumps({"type": "text", "text": "x" * 2001}), "too_large"),
    (json.dumps({"type": "text", "text": "x" * 5000}), "too_large"),
    ('{"type": "control", "name": "format_disk"}', "unknown_control"),
    ('{"type": "control", "name": "mute", "data": []}', "invalid_message"),
    ('{"type": "ping", "id": true}', "invalid_message"),
])
def test_refused_messages(raw: str | bytes, code: str) -> None:
    with pytest.raises(MessageError) as info:
        parse(raw)
    assert info.value.code == code


def test_tokens() -> None:
    signer = TokenSigner("secret")
    token = signer.issue("s1", "connect", ttl_s=60, now=1000)
    assert signer.verify(token, "s1", "connect", now=1059).sid == "s1"
    with pytest.raises(TokenError, match="expired"):
        signer.verify(token, "s1", "connect", now=1061)
    with pytest.raises(TokenError, match="another session"):
        signer.verify(token, "s2", "connect", now=1000)
    with pytest.raises(TokenError, match="scope"):
        signer.verify(token, "s1", "resume", now=1000)
    with pytest.raises(TokenError, match="signature"):
        TokenSigner("other").verify(token, "s1", "connect", now=1000)
    body, mac = token.split(".")
    with pytest.raises(TokenError):
        signer.verify(body[:-2] + "xx." + mac, "s1", "connect", now=1000)
    with pytest.raises(TokenError, match="malformed"):
        signer.verify("garbage", "s1", "connect")
