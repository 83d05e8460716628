"""microturn.logs: JSON lines, the session id from the task's context, exceptions, the unchanged text format."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest

from microturn.logs import bind_session, configure, session_id

log = logging.getLogger("microturn.test_logs")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    token = session_id.set(None)  # a sync test's bind_session would otherwise outlive it
    yield
    session_id.reset(token)
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)


def json_lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines()]


def test_json_lines_parse(capsys: pytest.CaptureFixture[str]) -> None:
    configure("info", "json")
    log.info("hello %s", "world", extra={"turn": 7, "peer": {"loss": 0.1}, "unserialisable": object()})
    log.debug("below the level")
    log.warning("second", extra={"session_id": "s-extra"})
    first, second = json_lines(capsys)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert first == {"ts": first["ts"], "level": "INFO", "logger": "microturn.test_logs", "msg": "hello world",
                     "turn": 7, "peer": {"loss": 0.1}}
    assert second["level"] == "WARNING" and second["session_id"] == "s-extra"


async def test_session_id_follows_the_task_that_bound_it(capsys: pytest.CaptureFixture[str]) -> None:
    configure("INFO", "json")
    bound, sibling_logged = asyncio.Event(), asyncio.Event()

    async def session(sid: str) -> None:
        bind_session(sid)
        log.info("first")
        bound.set()
        await sibling_logged.wait()  # the sibling logs while this task is bound and suspended
        log.info("second")

    async def sibling() -> None:
        await bound.wait()
        log.info("sibling")
        sibling_logged.set()

    await asyncio.gather(asyncio.create_task(session("s-1")), asyncio.create_task(sibling()))
    log.info("outside")
    lines = json_lines(capsys)
    assert [(line["msg"], line.get("session_id")) for line in lines] == [
        ("first", "s-1"), ("sibling", None), ("second", "s-1"), ("outside", None)]
    assert all("session_id" not in line for line in lines if line["msg"] in ("sibling", "outside"))


async def test_extra_session_id_wins_over_the_bound_one(capsys: pytest.CaptureFixture[str]) -> None:
    configure("INFO", "json")

    async def session() -> None:
        bind_session("s-bound")
        log.info("about another session", extra={"session_id": "s-other"})

    await asyncio.create_task(session())
    assert [line["session_id"] for line in json_lines(capsys)] == ["s-other"]


def test_exceptions_are_carried(capsys: pytest.CaptureFixture[str]) -> None:
    configure("INFO", "json")
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.exception("failed")
    log.info("no exception")
    failed, plain = json_lines(capsys)
    assert failed["level"] == "ERROR" and failed["msg"] == "failed"
    assert failed["exc"].startswith("Traceback (most recent call last):")
    assert "ZeroDivisionError: division by zero" in failed["exc"]
    assert "exc" not in plain


def test_text_format_is_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    configure("INFO", "text")
    bind_session("s-ignored")
    log.warning("hello %s", "text")
    err = capsys.readouterr().err
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING microturn.test_logs: hello text\n", err)


def test_configure_twice_keeps_one_handler(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    before = len(root.handlers)
    configure("INFO", "text")
    configure("WARNING", "json")
    assert len(root.handlers) == before + 1
    log.info("below the new level")
    log.warning("once")
    assert [line["msg"] for line in json_lines(capsys)] == ["once"]


def test_unknown_format_or_level_is_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown log format 'yaml': choose one of text, json"):
        configure("INFO", "yaml")
    with pytest.raises(ValueError, match="Unknown level"):
        configure("LOUD", "json")
