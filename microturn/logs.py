"""Process-wide logging: the human text format, or one JSON object per line for a log pipeline.

:func:`configure` installs one handler (stderr) on the root logger. In the ``json`` format every line carries
``ts`` (ISO-8601 UTC, milliseconds), ``level``, ``logger``, ``msg`` (the formatted message), ``session_id`` when one
is known, ``exc`` (the formatted traceback) when the record has one, ``stack`` when ``stack_info`` was asked for,
and every JSON-serialisable field passed as ``extra=``.

The session id is ``extra={"session_id": ...}`` on the record if given, else the :data:`session_id` context
variable. :func:`bind_session` sets that variable in the current context; an asyncio task copies its creator's
context when it is created, so a task that binds its session first logs with that id from then on, while its
creator and its sibling tasks do not. Threads do not inherit the context (aiortc's codec threads log without one).
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")
HANDLER_NAME = "microturn"  # the name of the root handler configure() owns, so a second call replaces it

session_id: ContextVar[str | None] = ContextVar("session_id", default=None)

# Attributes every LogRecord has (plus the two Formatter.format adds): whatever else a record has came from extra=.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def bind_session(sid: str) -> None:
    """Log with ``sid`` as the session id from now on in the current context (task)."""
    session_id.set(sid)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        sid = record.__dict__.get("session_id") or session_id.get()
        if sid is not None:
            entry["session_id"] = str(sid)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        for key, value in record.__dict__.items():
            if key in _RECORD_ATTRIBUTES or key in entry:
                continue
            try:
                json.dumps(value)
            except (TypeError, ValueError):  # not serialisable (or circular): left out rather than stringified
                continue
            entry[key] = value
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str, fmt: str) -> None:
    """Log records of ``level`` and above to stderr in format ``fmt`` (``text`` or ``json``).

    Calling it again replaces the handler an earlier call installed; other handlers on the root logger stay.
    """
    if fmt == "text":
        formatter: logging.Formatter = logging.Formatter(TEXT_FORMAT)
    elif fmt == "json":
        formatter = JsonFormatter()
    else:
        raise ValueError(f"unknown log format {fmt!r}: choose one of {', '.join(FORMATS)}")
    root = logging.getLogger()
    root.setLevel(level.upper())  # raises ValueError for an unknown level before anything is replaced
    for old in [h for h in root.handlers if h.name == HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    handler = logging.StreamHandler()
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(formatter)
    root.addHandler(handler)
