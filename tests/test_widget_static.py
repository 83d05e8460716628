"""The widget as files: its size budget, no runtime dependencies, and how the gateway serves it."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

from tests.conftest import loopback_settings, start_gateway

WIDGET = Path(__file__).resolve().parent.parent / "web" / "widget"


def test_widget_is_under_its_size_budget() -> None:
    assert (WIDGET / "microturn-widget.js").stat().st_size < 40 * 1024


def test_widget_has_no_runtime_dependencies() -> None:
    source = (WIDGET / "microturn-widget.js").read_text()
    assert not re.search(r"^\s*import\s", source, re.MULTILINE), "the widget must not import modules"
    assert not re.search(r"\bimport\s*\(", source), "the widget must not load modules at run time"
    assert not re.search(r"\brequire\s*\(", source)
    assert "customElements.define" in source


def test_declarations_cover_the_public_api() -> None:
    declarations = (WIDGET / "microturn-widget.d.ts").read_text()
    for name in ("connect(", "disconnect(", "mute(", "setCamera(", "sendText(", "microturn-state",
                 "microturn-caption", "microturn-error", "microturn-task", "microturn-stats"):
        assert name in declarations, name


async def test_gateway_serves_the_widget_with_cors_and_cache_headers(gateway: TestServer) -> None:
    url = str(gateway.make_url("/widget/microturn-widget.js"))
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:  # same origin / no Origin header
            assert resp.status == 200
            assert resp.content_type == "text/javascript"
            assert "max-age" in resp.headers["Cache-Control"]
            assert "Access-Control-Allow-Origin" not in resp.headers
            etag = resp.headers["ETag"]
        async with http.get(url, headers={"If-None-Match": etag}) as resp:
            assert resp.status == 304
        async with http.get(url, headers={"Origin": "https://elsewhere.example"}) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"]["code"] == "origin_not_allowed"
        async with http.get(str(gateway.make_url("/widget/../app.py"))) as resp:
            assert resp.status == 404
        async with http.get(str(gateway.make_url("/widget/microturn-widget.d.ts"))) as resp:
            assert resp.status == 200 and "MicroturnWidget" in await resp.text()


async def test_allowed_origins_may_load_the_widget() -> None:
    for allowed, origin in [(("https://shop.example",), "https://shop.example"), (("*",), "https://any.example")]:
        server = await start_gateway(loopback_settings(allowed_origins=allowed))
        try:
            async with aiohttp.ClientSession() as http, http.get(
                    str(server.make_url("/widget/microturn-widget.js")), headers={"Origin": origin}) as resp:
                assert resp.status == 200
                assert resp.headers["Access-Control-Allow-Origin"] == origin
                assert "Origin" in resp.headers["Vary"]
        finally:
            await server.close()
