"""The background model's built-in tools: typed, described by JSON schemas, each a clear error on bad input.

=================  ====================================================================================
``calculator``     arithmetic on numbers through a whitelisting AST evaluator (no ``eval``)
``clock``          the current time (or a given UTC time) in an IANA time zone or city (``zoneinfo``)
``convert_units``  length, mass, time, volume, speed, data and temperature units
``search``         full-text search (SQLite FTS5) over the documents the operator provides
``http_get``       GET a URL whose host is on the operator's allowlist
=================  ====================================================================================

A :class:`Toolbox` holds the tools of one configuration. :meth:`Toolbox.call` never raises for a tool's bad input:
it returns a :class:`ToolResult` with ``ok`` False and a message saying what was wrong. Tools are synchronous and
run inside a background worker process (never on the gateway's event loop or the engine's tick thread).
"""

from __future__ import annotations

import ast
import datetime as dt
import json
import math
import operator
import re
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ToolError(Exception):
    """A tool refused its input or failed; the message is shown to the reasoner (and the user)."""


@dataclass(frozen=True)
class ToolResult:
    """What one tool call gave: its text, or (``ok`` False) a clear error message."""

    name: str
    ok: bool
    text: str


@dataclass(frozen=True)
class ToolConfig:
    """What the operator lets the tools reach. Picklable: it travels to the worker processes."""

    documents: Path | None = None  # a text/markdown file, or a folder of them, for ``search``
    http_allowlist: tuple[str, ...] = ()  # hosts (``example.org``) or ``host:port`` that ``http_get`` may fetch
    http_timeout_s: float = 5.0
    http_max_bytes: int = 65_536


@dataclass(frozen=True)
class Tool:
    """One tool: its name, a description and a JSON schema of its arguments (as offered to a language model)."""

    name: str
    description: str
    parameters: dict[str, Any]
    run: Callable[[dict[str, Any]], str] = field(compare=False)

    def schema(self) -> dict[str, Any]:
        """The OpenAI chat-completions ``tools`` entry of this tool."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


# -- calculator -----------------------------------------------------------------------------------------------

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt, "sin": math.sin, "cos": math.cos, "tan": math.tan, "log": math.log, "log10": math.log10,
    "exp": math.exp, "abs": abs, "round": round, "min": min, "max": max, "floor": math.floor, "ceil": math.ceil,
}
_CONSTANTS = {"pi": math.pi, "e": math.e}
MAX_EXPRESSION = 500


def calculate(expression: str) -> float | int:
    """Evaluate arithmetic: numbers, ``+ - * / // % **``, parentheses, a few functions and ``pi``, ``e``."""
    if len(expression) > MAX_EXPRESSION:
        raise ToolError(f"expression is longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.replace("^", "**").replace("×", "*").replace("÷", "/"), mode="eval")
    except SyntaxError as exc:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from exc
    try:
        return _evaluate(tree.body)
    except ZeroDivisionError as exc:
        raise ToolError("division by zero") from exc
    except (OverflowError, ValueError, TypeError) as exc:
        raise ToolError(f"cannot compute {expression!r}: {exc}") from exc


def _evaluate(node: ast.expr) -> Any:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 1000 or abs(left) > 1e100):
            raise ToolError("exponent or base too large")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
            and not node.keywords and 0 < len(node.args) <= 4):
        return _FUNCTIONS[node.func.id](*(_evaluate(a) for a in node.args))
    raise ToolError(f"not allowed in an arithmetic expression: {ast.unparse(node)!r}")


def _format_number(value: float | int) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.12g}" if isinstance(value, float) else str(value)


# -- clock ----------------------------------------------------------------------------------------------------

def find_zone(name: str) -> zoneinfo.ZoneInfo:
    """An IANA zone by its key (``Asia/Tokyo``), ``UTC``, or a city in it (``tokyo``, ``new york``)."""
    key = name.strip()
    if not key or len(key) > 64:
        raise ToolError("give a time zone (e.g. Europe/Paris) or a city")
    if key.upper() in ("UTC", "GMT", "Z"):
        return zoneinfo.ZoneInfo("UTC")
    if "/" in key:
        try:
            return zoneinfo.ZoneInfo(key)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ToolError(f"unknown time zone {name!r}") from exc
    city = key.replace(" ", "_").lower()
    for zone in sorted(zoneinfo.available_timezones()):
        if zone.rsplit("/", 1)[-1].lower() == city:
            return zoneinfo.ZoneInfo(zone)
    raise ToolError(f"unknown time zone or city {name!r}")


def clock(zone: str, at: str | None = None) -> str:
    tz = find_zone(zone)
    if at is None:
        moment = dt.datetime.now(dt.UTC)
    else:
        try:
            moment = dt.datetime.fromisoformat(at)
        except ValueError as exc:
            raise ToolError(f"'at' must be an ISO 8601 time, got {at!r}") from exc
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)
    local = moment.astimezone(tz)
    return f"{local:%Y-%m-%d %H:%M} {local.tzname()} ({tz.key}, UTC{local:%z})"


# -- units ----------------------------------------------------------------------------------------------------

_UNITS: dict[str, tuple[str, float]] = {}  # unit name → (dimension, factor to the dimension's base unit)


def _units(dimension: str, table: dict[str, float]) -> None:
    for names, factor in table.items():
        for name in names.split(","):
            _UNITS[name] = (dimension, factor)


_units("length", {"m,meter,meters,metre,metres": 1.0, "km,kilometer,kilometers,kilometre,kilometres": 1000.0,
                  "cm,centimeter,centimeters": 0.01, "mm,millimeter,millimeters": 0.001,
                  "mi,mile,miles": 1609.344, "yd,yard,yards": 0.9144, "ft,foot,feet": 0.3048,
                  "in,inch,inches": 0.0254, "nmi,nautical_mile,nautical_miles": 1852.0})
_units("mass", {"kg,kilogram,kilograms": 1.0, "g,gram,grams": 0.001, "mg,milligram,milligrams": 1e-6,
                "t,tonne,tonnes": 1000.0, "lb,lbs,pound,pounds": 0.45359237, "oz,ounce,ounces": 0.028349523125})
_units("time", {"s,sec,second,seconds": 1.0, "ms,millisecond,milliseconds": 0.001, "min,minute,minutes": 60.0,
                "h,hr,hour,hours": 3600.0, "day,days": 86400.0, "week,weeks": 604800.0})
_units("volume", {"l,liter,liters,litre,litres": 1.0, "ml,milliliter,milliliters": 0.001,
                  "gal,gallon,gallons": 3.785411784, "cup,cups": 0.2365882365, "m3": 1000.0})
_units("speed", {"m/s,mps": 1.0, "km/h,kph,kmh": 1 / 3.6, "mph": 0.44704, "knot,knots,kn": 1852 / 3600})
_units("data", {"b,byte,bytes": 1.0, "kb,kilobyte,kilobytes": 1e3, "mb,megabyte,megabytes": 1e6,
                "gb,gigabyte,gigabytes": 1e9, "kib": 1024.0, "mib": 1024.0**2, "gib": 1024.0**3})
_TEMPERATURE = {"c": "c", "celsius": "c", "°c": "c", "f": "f", "fahrenheit": "f", "°f": "f", "k": "k",
                "kelvin": "k"}


def convert_units(value: float, unit_from: str, unit_to: str) -> str:
    a, b = unit_from.strip().lower(), unit_to.strip().lower()
    if not math.isfinite(value):
        raise ToolError("the value must be a finite number")
    if a in _TEMPERATURE and b in _TEMPERATURE:
        kelvin = {"c": value + 273.15, "f": (value - 32) * 5 / 9 + 273.15, "k": value}[_TEMPERATURE[a]]
        out = {"c": kelvin - 273.15, "f": (kelvin - 273.15) * 9 / 5 + 32, "k": kelvin}[_TEMPERATURE[b]]
    else:
        for unit in (a, b):
            if unit not in _UNITS and unit not in _TEMPERATURE:
                raise ToolError(f"unknown unit {unit!r}")
        if a in _TEMPERATURE or b in _TEMPERATURE or _UNITS[a][0] != _UNITS[b][0]:
            raise ToolError(f"cannot convert {unit_from} to {unit_to}: they measure different things")
        out = value * _UNITS[a][1] / _UNITS[b][1]
    return f"{_format_number(value)} {unit_from} = {out:.6g} {unit_to}"


# -- document search ------------------------------------------------------------------------------------------

class DocumentIndex:
    """A full-text index (SQLite FTS5, in memory) over a file or a folder of ``.txt``/``.md`` files.

    Each paragraph (text between blank lines) is one row, so a hit points at the passage, not the whole file.
    """

    SUFFIXES = (".txt", ".md", ".rst")

    def __init__(self, source: Path) -> None:
        self.source = source
        self.db = sqlite3.connect(":memory:", check_same_thread=False)
        self.db.execute("CREATE VIRTUAL TABLE passages USING fts5(path UNINDEXED, body)")
        files = [source] if source.is_file() else sorted(p for p in source.rglob("*")
                                                          if p.is_file() and p.suffix.lower() in self.SUFFIXES)
        rows = []
        for path in files:
            text = path.read_text("utf-8", errors="replace")
            name = path.name if path == source else str(path.relative_to(source))
            rows += [(name, part.strip()) for part in re.split(r"\n\s*\n", text) if part.strip()]
        self.db.executemany("INSERT INTO passages (path, body) VALUES (?, ?)", rows)
        self.passages = len(rows)

    def search(self, query: str, limit: int = 3) -> list[tuple[str, str]]:
        """(path, snippet) of the best passages for the words of ``query`` (any of them, ranked by BM25)."""
        words = re.findall(r"\w+", query.lower())
        if not words:
            raise ToolError("the search query has no words")
        match = " OR ".join(f'"{w}"' for w in words[:32])
        rows = self.db.execute("SELECT path, snippet(passages, 1, '', '', ' … ', 24) FROM passages "
                               "WHERE passages MATCH ? ORDER BY rank LIMIT ?", (match, limit)).fetchall()
        return [(str(p), str(s)) for p, s in rows]


# -- HTTP -----------------------------------------------------------------------------------------------------

class _AllowlistRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, allowed: Callable[[str], bool]) -> None:
        self.allowed = allowed

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        if not self.allowed(newurl):
            raise ToolError(f"redirect to {newurl} is not on the allowlist")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def host_allowed(url: str, allowlist: tuple[str, ...]) -> bool:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    host = parts.hostname.lower()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return any(entry.lower() in (host, f"{host}:{port}") for entry in allowlist)


def http_get(url: str, config: ToolConfig) -> str:
    if not host_allowed(url, config.http_allowlist):
        raise ToolError(f"{url} is not on the allowlist of hosts this tool may fetch "
                        f"({', '.join(config.http_allowlist) or 'empty'})")
    opener = urllib.request.build_opener(_AllowlistRedirects(lambda u: host_allowed(u, config.http_allowlist)))
    request = urllib.request.Request(url, headers={"User-Agent": "microturn-background/0.1"})
    try:
        with opener.open(request, timeout=config.http_timeout_s) as response:
            body = response.read(config.http_max_bytes + 1)
            status = response.status
    except urllib.error.HTTPError as exc:
        raise ToolError(f"GET {url} answered {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise ToolError(f"GET {url} failed: {getattr(exc, 'reason', exc)}") from exc
    text = body[: config.http_max_bytes].decode("utf-8", errors="replace")
    more = " (truncated)" if len(body) > config.http_max_bytes else ""
    return f"HTTP {status}, {len(text)} characters{more}:\n{text}"


# -- the toolbox ----------------------------------------------------------------------------------------------

_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "number": (int, float), "integer": (int,)}


class Toolbox:
    """The built-in tools of one :class:`ToolConfig`; ``search`` only when documents are configured."""

    def __init__(self, config: ToolConfig | None = None) -> None:
        self.config = config or ToolConfig()
        self._index: DocumentIndex | None = None
        tools = [
            Tool("calculator", "Evaluate an arithmetic expression (+ - * / // % **, parentheses, sqrt, sin, cos, "
                 "tan, log, exp, abs, round, min, max, pi, e).",
                 _object({"expression": {"type": "string", "description": "e.g. (12.5 * 4) / 3"}}),
                 lambda a: _format_number(calculate(a["expression"]))),
            Tool("clock", "The current time in a time zone or city, or convert a UTC time (ISO 8601) to it.",
                 _object({"zone": {"type": "string", "description": "IANA zone (Asia/Tokyo) or city (Tokyo)"},
                          "at": {"type": "string", "description": "optional ISO 8601 time; UTC if no offset"}},
                         required=("zone",)),
                 lambda a: clock(a["zone"], a.get("at"))),
            Tool("convert_units", "Convert a value between units of length, mass, time, volume, speed, data or "
                 "temperature.",
                 _object({"value": {"type": "number"}, "from": {"type": "string", "description": "e.g. km"},
                          "to": {"type": "string", "description": "e.g. miles"}}),
                 lambda a: convert_units(float(a["value"]), a["from"], a["to"])),
            Tool("http_get", "Fetch a web page or API response by URL (only hosts the operator allows).",
                 _object({"url": {"type": "string"}}), lambda a: http_get(a["url"], self.config)),
        ]
        if self.config.documents is not None:
            tools.append(Tool("search", "Full-text search over the operator's documents; returns the best "
                              "passages.", _object({"query": {"type": "string"},
                                                    "limit": {"type": "integer", "description": "1-10"}},
                                                   required=("query",)), self._search))
        self.tools = {t.name: t for t in tools}

    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self.tools.values()]

    def call(self, name: str, arguments: dict[str, Any] | str) -> ToolResult:
        """Run a tool; bad names, bad arguments and the tool's own errors come back as ``ok`` False."""
        tool = self.tools.get(name)
        if tool is None:
            return ToolResult(name, False, f"unknown tool {name!r}; tools: {', '.join(self.tools)}")
        try:
            args = _check_arguments(tool, arguments)
            return ToolResult(name, True, tool.run(args))
        except ToolError as exc:
            return ToolResult(name, False, str(exc))
        except Exception as exc:  # a tool's unexpected failure is still a result, never a crash of the task
            return ToolResult(name, False, f"{name} failed: {type(exc).__name__}: {exc}")

    def _search(self, args: dict[str, Any]) -> str:
        if self._index is None:
            assert self.config.documents is not None
            if not self.config.documents.exists():
                raise ToolError(f"the document folder {self.config.documents} does not exist")
            self._index = DocumentIndex(self.config.documents)
        limit = int(args.get("limit", 3))
        if not 1 <= limit <= 10:
            raise ToolError("limit must be between 1 and 10")
        hits = self._index.search(args["query"], limit)
        if not hits:
            return f"no passage matches {args['query']!r}"
        return "\n".join(f"[{path}] {snippet}" for path, snippet in hits)


def _object(properties: dict[str, Any], required: tuple[str, ...] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else list(required), "additionalProperties": False}


def _check_arguments(tool: Tool, arguments: dict[str, Any] | str) -> dict[str, Any]:
    """Validate arguments (a dict or its JSON text) against the tool's schema: required, known, typed."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except ValueError as exc:
            raise ToolError(f"arguments of {tool.name} are not valid JSON") from exc
    if not isinstance(arguments, dict):
        raise ToolError(f"arguments of {tool.name} must be a JSON object")
    props: dict[str, Any] = tool.parameters["properties"]
    missing = [k for k in tool.parameters["required"] if k not in arguments]
    if missing:
        raise ToolError(f"{tool.name} needs {', '.join(missing)}")
    unknown = [k for k in arguments if k not in props]
    if unknown:
        raise ToolError(f"{tool.name} has no argument {', '.join(unknown)}")
    for key, value in arguments.items():
        kinds = _TYPES[props[key]["type"]]
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise ToolError(f"{tool.name}: {key} must be a {props[key]['type']}")
    return arguments
