"""The background model's built-in tools and agent, on real inputs — good ones and bad ones."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from inference.background.reasoner import ReasonerError, ToolAgent
from inference.background.tasks import Task, Transcript
from inference.background.tools import Toolbox, ToolConfig, calculate


def test_calculator_evaluates_arithmetic_without_eval() -> None:
    box = Toolbox()
    assert box.call("calculator", {"expression": "(12.5 * 4) / 3"}).text == "16.6666666667"
    assert box.call("calculator", {"expression": "2^10 + sqrt(16) - -1"}).text == "1029"
    assert calculate("max(3, 7) % 4") == 3
    for bad, message in [("1/0", "division by zero"), ("5 // 0", "division by zero"),
                         ("__import__('os').system('true')", "not allowed"), ("2 ** 99999", "too large"),
                         ("1 +", "not an arithmetic expression"), ("sqrt(-1)", "cannot compute")]:
        result = box.call("calculator", {"expression": bad})
        assert not result.ok and message in result.text, (bad, result)
    assert "needs expression" in box.call("calculator", {}).text
    assert "must be a string" in box.call("calculator", {"expression": 7}).text
    assert "not valid JSON" in box.call("calculator", "{oops").text
    assert "unknown tool" in box.call("rm", {}).text


def test_clock_knows_zones_and_cities() -> None:
    box = Toolbox()
    at = box.call("clock", {"zone": "Asia/Tokyo", "at": "2024-01-15T12:00:00"})
    assert at.ok and at.text.startswith("2024-01-15 21:00 JST")
    assert "New_York" in box.call("clock", {"zone": "new york", "at": "2024-07-01T12:00:00+00:00"}).text
    now = box.call("clock", {"zone": "UTC"})
    assert now.ok and now.text.startswith(dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"))
    assert "unknown time zone" in box.call("clock", {"zone": "Atlantis"}).text
    assert "unknown time zone" in box.call("clock", {"zone": "Mars/Olympus"}).text
    assert "ISO 8601" in box.call("clock", {"zone": "UTC", "at": "yesterday"}).text


def test_unit_conversion() -> None:
    box = Toolbox()
    assert box.call("convert_units", {"value": 5, "from": "km", "to": "miles"}).text == "5 km = 3.10686 miles"
    assert box.call("convert_units", {"value": 100, "from": "C", "to": "F"}).text == "100 C = 212 F"
    assert box.call("convert_units", {"value": 1, "from": "GiB", "to": "MB"}).text.endswith("1073.74 MB")
    unknown = box.call("convert_units", {"value": 3, "from": "furlongs", "to": "m"})
    assert not unknown.ok and "unknown unit 'furlongs'" in unknown.text
    assert "different things" in box.call("convert_units", {"value": 3, "from": "kg", "to": "m"}).text
    assert "different things" in box.call("convert_units", {"value": 3, "from": "C", "to": "m"}).text


def test_search_over_operator_documents(tmp_path: Path) -> None:
    (tmp_path / "returns.md").write_text("# Returns\n\nItems may be returned within 30 days with a receipt.\n\n"
                                         "Opened software cannot be returned.\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "shipping.txt").write_text("Standard shipping takes 3 to 5 business days.\n")
    (tmp_path / "ignored.bin").write_bytes(b"\x00shipping")
    box = Toolbox(ToolConfig(documents=tmp_path))
    hit = box.call("search", {"query": "how long does shipping take?"})
    assert hit.ok and hit.text.startswith("[sub/shipping.txt]") and "3 to 5 business days" in hit.text
    assert "[returns.md] Items may be returned within 30 days" in box.call("search", {"query": "receipt"}).text
    assert "no passage matches" in box.call("search", {"query": "warranty"}).text
    assert "has no words" in box.call("search", {"query": "?!"}).text
    assert "limit must be" in box.call("search", {"query": "days", "limit": 99}).text
    assert "search" not in Toolbox().tools  # no documents configured, no search tool
    missing = Toolbox(ToolConfig(documents=tmp_path / "nope")).call("search", {"query": "x"})
    assert not missing.ok and "does not exist" in missing.text


@pytest.fixture
async def site() -> AsyncIterator[TestServer]:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello from the allowlisted host")

    async def away(request: web.Request) -> web.Response:
        raise web.HTTPFound("http://example.invalid/elsewhere")

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500, text="no")

    app = web.Application()
    app.router.add_get("/hello", hello)
    app.router.add_get("/away", away)
    app.router.add_get("/broken", broken)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


async def test_http_get_only_fetches_allowlisted_hosts(site: TestServer) -> None:
    base = f"http://127.0.0.1:{site.port}"
    box = Toolbox(ToolConfig(http_allowlist=(f"127.0.0.1:{site.port}",), http_timeout_s=3))

    async def get(url: str) -> tuple[bool, str]:
        result = await asyncio.to_thread(box.call, "http_get", {"url": url})
        return result.ok, result.text

    assert await get(f"{base}/hello") == (True, "HTTP 200, 31 characters:\nhello from the allowlisted host")
    ok, text = await get("http://example.com/")
    assert not ok and "not on the allowlist" in text
    ok, text = await get(f"http://127.0.0.1:{site.port + 1}/hello")  # same host, another port
    assert not ok and "not on the allowlist" in text
    ok, text = await get(f"{base}/away")
    assert not ok and "redirect to http://example.invalid/elsewhere is not on the allowlist" in text
    ok, text = await get(f"{base}/broken")
    assert not ok and "answered 500" in text
    ok, text = await get("file:///etc/passwd")
    assert not ok and "not on the allowlist" in text


def test_agent_plans_a_tool_from_the_request() -> None:
    agent = ToolAgent(Toolbox())
    assert agent.plan("what is 12 * (3 + 4)?") == ("calculator", {"expression": "12 * (3 + 4)"})
    assert agent.plan("calculate sqrt(2)") == ("calculator", {"expression": "sqrt(2)"})
    assert agent.plan("What time is it in Tokyo?") == ("clock", {"zone": "Tokyo"})
    assert agent.plan("convert 5 km to miles") == ("convert_units", {"value": 5.0, "from": "km", "to": "miles"})
    assert agent.plan("72 F in C") == ("convert_units", {"value": 72.0, "from": "F", "to": "C"})
    assert agent.plan("fetch https://x.org/a.json please")[0] == "http_get"
    assert agent.plan("what does the returns policy say") == ("search", {"query": "what does the returns policy say"})


async def test_agent_reports_progress_then_the_result_or_a_clear_failure() -> None:
    agent = ToolAgent(Toolbox())
    progress: list[str] = []
    assert await agent.run("", "what is 6*7", progress.append) == "42"
    assert progress == ["calculator(expression='6*7')"]
    with pytest.raises(ReasonerError, match="division by zero"):
        await agent.run("", "what is 1/0", progress.append)
    with pytest.raises(ReasonerError, match="document search is not configured"):
        await agent.run("", "tell me a story", progress.append)
    spun: list[str] = []
    assert await agent.run("", "/spin 0.05", spun.append) == "spun for 0.05 s"
    assert spun == ["spinning: 25%", "spinning: 50%", "spinning: 75%"]


def test_task_items_and_transcript() -> None:
    task = Task("t1", "s1", "what is 6*7")
    assert [i.kind for i in task.items()] == ["started"]
    task.partials.append("calculator(…)")
    task.state, task.result = "done", "42"
    items = task.items()
    assert [(i.seq, i.kind, i.context_text()) for i in items] == [(0, "started", ""), (1, "progress", "calculator(…)"),
                                                                 (2, "result", "42")]
    assert items[2].event_data() == {"task_id": "t1", "seq": 2, "text": "42"}
    assert Task.decode(task.encode()) == task
    transcript = Transcript(max_chars=60)
    transcript.model("Hel")
    transcript.model("lo.")
    transcript.user("what is 6*7")
    transcript.event("background_result 42")
    assert transcript.text() == "model: Hello.\nuser: what is 6*7\nevent: background_result 42"
    transcript.user("x" * 50)
    assert transcript.text().endswith("x" * 50) and "model:" not in transcript.text()


def test_request_spans_are_cut_out_of_the_caption_stream() -> None:
    from inference.tokenizer import MAX_REQUEST_CHARS, REQUEST_CLOSE, REQUEST_OPEN, RequestSpans

    spans = RequestSpans()
    assert spans.feed("Let me ") == ("Let me ", [])
    assert spans.feed(f"check.{REQUEST_OPEN}what ") == ("check.", [])
    assert spans.feed("is 6*7") == ("", [])
    assert spans.feed(f"{REQUEST_CLOSE} ok") == (" ok", ["what is 6*7"])
    assert spans.feed(f"{REQUEST_OPEN} {REQUEST_CLOSE}") == ("", [])  # an empty span asks nothing
    assert spans.feed(f"{REQUEST_OPEN}a{REQUEST_CLOSE}{REQUEST_OPEN}b{REQUEST_CLOSE}") == ("", ["a", "b"])
    assert spans.feed(REQUEST_OPEN + "x" * (MAX_REQUEST_CHARS + 1) + "tail") == ("tail", [])


def test_reference_model_reads_background_results_as_tool_text() -> None:
    import dataclasses

    from inference import tokenizer
    from inference.reference import ReferenceModel
    from tests._reference_helpers import make_net, make_turn, small_config

    model = ReferenceModel(make_net(small_config()), record=True)
    model.open("s", seed=1)
    turn = dataclasses.replace(make_turn("s", 0, video=False), background=("42",))
    model.step([turn])
    trace = model.sessions["s"].trace
    assert trace is not None
    n_model = model.layout.n_model
    slots = trace.runs[0].text[n_model:n_model + model.layout.text_in].tolist()
    assert slots[:3] == [tokenizer.TOOL, ord("4"), ord("2")]
    model.close("s")
