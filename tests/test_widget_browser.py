"""<microturn-widget> embedded in an integrator's page served from another origin, in headless Chromium.

The integrator is a second aiohttp server on its own port: its page loads the widget from the gateway as a
cross-origin ES module, and its backend endpoint ``/api/microturn-token`` mints the session server-side with the
gateway's ``POST /v1/sessions``. The fake microphone plays espeak-ng speech and the fake camera a test picture; the
gateway's own session counters say what arrived.

Set ``MICROTURN_WRITE_SCREENSHOTS=1`` to (re)write the widget's screenshots in ``docs/widget/``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests._browser_helpers import (
    INBOUND_PROBE,
    MICRO_TURN_S,
    best_envelope_match,
    chromium,
    envelope_dbfs,
    make_fake_camera_y4m,
    make_fake_mic_wav,
    needs_chromium,
    read_wav,
    session_state,
    wait_for_turns,
)
from tests.conftest import free_port, loopback_settings, start_gateway
from webrtc_gateway import api

pytestmark = [pytest.mark.browser, needs_chromium]

DOCS = Path(__file__).resolve().parent.parent / "docs" / "widget"
WIDGET_JS = Path(__file__).resolve().parent.parent / "web" / "widget" / "microturn-widget.js"
API_KEY = "integrator-backend-key"  # what the integrator's backend holds; the browser never sees it
WRITE_SCREENSHOTS = os.environ.get("MICROTURN_WRITE_SCREENSHOTS") == "1"

EVENT_LOG = """
window.__events = [];
const types = ["state", "session", "resume", "caption", "error", "stats"].map((name) => `microturn-${name}`);
for (const type of types) {
  document.addEventListener(type, (e) => window.__events.push({ type, detail: e.detail }));
}
"""

def integrator_page(gateway_base: str, camera: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>An integrator's page</title>
<script type="module" src="{gateway_base}/widget/microturn-widget.js"></script></head>
<body>
<microturn-widget server="{gateway_base}" token-url="/api/microturn-token" camera="{camera}"></microturn-widget>
</body></html>"""

@asynccontextmanager
async def integrator(port: int, gateway_base: str, camera: str = "on") -> AsyncIterator[str]:
    """The integrator's site on 127.0.0.1:``port``: its page, and its backend's token endpoint."""

    async def page(request: web.Request) -> web.Response:
        # a strict policy, as web/README.md recommends: the widget must work without any 'unsafe-inline'
        csp = (f"default-src 'none'; script-src {gateway_base}; connect-src 'self' {gateway_base}; "
               "style-src 'self'; media-src 'self' blob: mediastream:")
        return web.Response(text=integrator_page(gateway_base, camera), content_type="text/html",
                            headers={"Content-Security-Policy": csp})

    async def token(request: web.Request) -> web.Response:
        # server to server: no Origin header; a real backend would check its own user's login here
        async with aiohttp.ClientSession() as http, http.post(
                f"{gateway_base}/v1/sessions", json={}, headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
            return web.json_response(await resp.json(), status=200 if resp.status == 201 else resp.status)

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_post("/api/microturn-token", token)
    server = TestServer(app, host="127.0.0.1", port=port)
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await server.close()

async def shoot(page: Any, name: str) -> None:
    if WRITE_SCREENSHOTS:
        DOCS.mkdir(parents=True, exist_ok=True)
        await page.locator("microturn-widget").screenshot(path=str(DOCS / f"{name}.png"))

async def levels_after(base: str, created: dict[str, Any], turn: int, count: int) -> list[float]:
    """The gateway's input levels of micro-turns ``turn .. turn+count-1`` (waits until they are dispatched)."""
    state = await wait_for_turns(base, created, turn + count, timeout=10)
    levels: list[float] = state["input_levels_dbfs"]
    first = state["micro_turns"] - len(levels)  # levels hold the last 300 micro-turns
    return levels[turn - first: turn - first + count]

@pytest.fixture
async def gateway_and_site() -> AsyncIterator[tuple[TestServer, str]]:
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    gateway = await start_gateway(loopback_settings(allowed_origins=(origin,), api_keys=(API_KEY,)))
    base = str(gateway.make_url("")).rstrip("/")
    async with integrator(port, base) as site:
        yield gateway, site
    await gateway.close()

@pytest.mark.timeout(90)
async def test_widget_on_another_origin(gateway_and_site: tuple[TestServer, str], speech_wav: Path,
                                        tmp_path: Path) -> None:
    gateway, site = gateway_and_site
    base = str(gateway.make_url("")).rstrip("/")
    mic = make_fake_mic_wav(speech_wav, tmp_path / "mic.wav")
    camera = make_fake_camera_y4m(tmp_path / "camera.y4m")
    signal, rate = read_wav(mic)

    async with chromium(tmp_path / "profile", mic, camera) as context:
        page = await context.new_page()  # type: ignore[attr-defined]
        await page.add_init_script(INBOUND_PROBE)
        await page.add_init_script(EVENT_LOG)
        await page.emulate_media(reduced_motion="reduce")  # steady indicators in the screenshots
        await page.goto(site + "/")
        widget = page.locator("microturn-widget")
        await page.wait_for_function("customElements.get('microturn-widget') !== undefined")
        assert await widget.get_attribute("state") is None  # nothing starts without a user action
        assert not gateway.app[api.GATEWAY].live
        await shoot(page, "idle")

        # connect: the page's backend mints the session, the widget connects to the gateway cross-origin
        await page.get_by_role("button", name="Connect", exact=True).click()
        await page.wait_for_selector('microturn-widget[state="listening"]', timeout=15000)
        created = await page.evaluate("(() => { const s = document.querySelector('microturn-widget').session;"
                                      " return { session_id: s.sessionId, token: s.token }; })()")
        speech = await wait_for_turns(base, created, 30, timeout=15)
        await page.get_by_text("dBFS").first.wait_for(timeout=5000)
        assert await page.get_by_text("Camera on").is_visible()
        await shoot(page, "listening")

        # mute: silence at the gateway from the next micro-turns on, and the session stays up
        await page.get_by_role("button", name="Mute", exact=True).click()
        await page.wait_for_selector('microturn-widget[state="muted"]')
        muted_from = (await session_state(base, created))[1]["micro_turns"] + 2  # skip what was in flight
        muted_levels = await levels_after(base, created, muted_from, 6)
        await shoot(page, "muted")
        await page.get_by_role("button", name="Mute", exact=True).click()
        await page.wait_for_selector('microturn-widget[state="listening"]')

        # camera off: no new video frames
        await page.get_by_role("button", name="Camera", exact=True).click()
        await page.get_by_text("Camera on").wait_for(state="hidden")
        await asyncio.sleep(0.6)  # frames already in flight
        frames_off = (await session_state(base, created))[1]["video_frames_in"]
        await asyncio.sleep(1.5)
        status, after_off = await session_state(base, created)
        inbound = await page.evaluate("window.__inbound")

        # disconnect: the gateway closes the session at once
        await page.get_by_role("button", name="Disconnect", exact=True).click()
        await page.wait_for_selector('microturn-widget[state="idle"]')
        deadline = time.monotonic() + 3
        while (gone := (await session_state(base, created))[0]) != 404 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        events = await page.evaluate("window.__events")

    # the gateway heard the fake speech: its RMS and envelope match the WAV's
    levels = speech["input_levels_dbfs"][3:]
    r, offset = best_envelope_match(levels, signal, rate)
    assert r > 0.7, f"levels correlate only {r:.2f} with the speech envelope"
    looped = np.tile(signal, int(len(levels) * MICRO_TURN_S * rate / len(signal)) + 2)
    expected = envelope_dbfs(looped, rate, offset)[: len(levels)]
    loud = expected > -35
    assert loud.sum() >= 5
    assert np.median(np.abs(np.asarray(levels)[loud] - expected[loud])) < 4.0, (levels, expected.round(1))
    assert speech["video_frames_in"] > 5  # the fake camera arrived
    assert inbound["energy"] > 0.01, inbound  # the page played the echo

    assert max(muted_levels) <= -60, muted_levels  # muted: silence, not speech
    assert status == 200 and after_off["state"] == "connected"
    assert after_off["video_frames_in"] - frames_off <= 1, (frames_off, after_off["video_frames_in"])
    assert gone == 404

    states = [e["detail"]["state"] for e in events if e["type"] == "microturn-state"]
    assert states == ["connecting", "listening", "muted", "listening", "idle"], states
    assert any(e["type"] == "microturn-caption" and "dBFS" in e["detail"]["text"] for e in events)
    assert any(e["type"] == "microturn-stats" and e["detail"]["quality"] in ("good", "fair", "poor")
               for e in events)
    assert not [e for e in events if e["type"] == "microturn-error"]

@pytest.mark.timeout(60)
async def test_an_origin_not_on_the_allowlist_is_refused(speech_wav: Path, tmp_path: Path) -> None:
    port = free_port()
    gateway = await start_gateway(loopback_settings(allowed_origins=("https://only-this.example",)))
    base = str(gateway.make_url("")).rstrip("/")
    mic = make_fake_mic_wav(speech_wav, tmp_path / "mic.wav")
    try:
        async with integrator(port, base, camera="off") as site, \
                chromium(tmp_path / "profile", mic) as context:
            page = await context.new_page()  # type: ignore[attr-defined]
            await page.goto(site + "/")
            await page.wait_for_load_state("networkidle")
            # the gateway refuses to serve the widget module to this origin...
            assert await page.evaluate("customElements.get('microturn-widget') === undefined")

            # ...and even with the widget loaded from elsewhere, its calls to the gateway are refused
            await page.route(f"{base}/widget/microturn-widget.js", lambda route: route.fulfill(
                body=WIDGET_JS.read_text(), content_type="text/javascript",
                headers={"Access-Control-Allow-Origin": "*"}))
            await page.reload()
            await page.wait_for_function("customElements.get('microturn-widget') !== undefined")
            await page.get_by_role("button", name="Connect", exact=True).click()
            await page.wait_for_selector('microturn-widget[state="error"]', timeout=10000)
            alert = page.get_by_role("alert")
            message = await alert.text_content()
            await page.wait_for_timeout(300)
            await shoot(page, "error")
        assert message and "voice service" in message
        assert not gateway.app[api.GATEWAY].live  # no peer connection was accepted
    finally:
        await gateway.close()

def test_screenshots_are_checked_in() -> None:
    for name in ("idle", "listening", "muted", "error"):
        path = DOCS / f"{name}.png"
        assert path.exists() and path.stat().st_size < 150_000, path


SESSION_JS = ("(() => { const s = document.querySelector('microturn-widget').session;"
              " return s && { session_id: s.sessionId, token: s.token }; })()")


async def wait_until(page: Any, expression: str, timeout: float) -> None:
    """Poll ``expression`` in the page (``wait_for_function`` needs 'unsafe-eval', which the page's CSP forbids)."""
    deadline = time.monotonic() + timeout
    while not await page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {expression}")
        await asyncio.sleep(0.1)


async def post_resume(base: str, session_id: str, resume_token: str, last_turn: int = -1) -> int:
    async with aiohttp.ClientSession() as http, http.post(
            f"{base}/v1/sessions/{session_id}/resume", json={"last_turn": last_turn},
            headers={"Authorization": f"Bearer {resume_token}"}) as resp:
        return resp.status


@pytest.mark.timeout(60)
async def test_widget_resumes_the_same_session_after_a_lost_connection(
        gateway_and_site: tuple[TestServer, str], speech_wav: Path, tmp_path: Path) -> None:
    gateway, site = gateway_and_site
    gw = gateway.app[api.GATEWAY]
    base = str(gateway.make_url("")).rstrip("/")
    mic = make_fake_mic_wav(speech_wav, tmp_path / "mic.wav")
    captions_js = "window.__events.filter((e) => e.type === 'microturn-caption').map((e) => e.detail)"
    async with chromium(tmp_path / "profile", mic) as context:
        page = await context.new_page()  # type: ignore[attr-defined]
        await page.add_init_script(EVENT_LOG)
        await page.goto(site + "/")
        async with page.expect_response("**/api/microturn-token") as minted:
            await page.get_by_role("button", name="Connect", exact=True).click()
        grant = await (await minted.value).json()
        await page.wait_for_selector('microturn-widget[state="listening"]', timeout=15000)
        first = await page.evaluate(SESSION_JS)
        assert first["session_id"] == grant["session_id"] and grant["resume_token"]
        await wait_until(page, f"{captions_js}.length >= 1", timeout=10)
        before = await page.evaluate(captions_js)

        # the connection drops (the gateway closes the peer) but the session's state stays for a resume
        await gw.live[first["session_id"]].close("test: connection lost", keep_state=True)
        assert first["session_id"] not in gw.live
        await wait_until(page, "window.__events.some((e) => e.type === 'microturn-resume')", timeout=15)
        await page.wait_for_selector('microturn-widget[state="listening"]', timeout=5000)
        second = await page.evaluate(SESSION_JS)
        live_again = second["session_id"] in gw.live
        state = await wait_for_turns(base, second, 3, timeout=10)
        last_before = max(c["turn"] for c in before)
        await wait_until(page, f"{captions_js}.some((c) => c.turn > {last_before + 5})", timeout=15)
        old_token_status = await post_resume(base, first["session_id"], grant["resume_token"])
        still_live = second["session_id"] in gw.live  # a refused resume does not disturb the session
        events = await page.evaluate("window.__events")
        await page.get_by_role("button", name="Disconnect", exact=True).click()

    assert second["session_id"] == first["session_id"]  # resumed: the same session, not a new one
    assert second["token"] != first["token"]  # a fresh connect token from the resume grant
    assert live_again and still_live and state["state"] == "connected"
    assert old_token_status == 401  # the resume token rotated: the old one is used up
    states = [e["detail"]["state"] for e in events if e["type"] == "microturn-state"]
    assert states[:4] == ["connecting", "listening", "reconnecting", "listening"], states
    sessions = [e["detail"] for e in events if e["type"] == "microturn-session"]
    assert [(s["sessionId"], s["resumed"]) for s in sessions] == [
        (first["session_id"], False), (first["session_id"], True)], sessions
    resumes = [e["detail"] for e in events if e["type"] == "microturn-resume"]
    assert len(resumes) == 1 and resumes[0]["sessionId"] == first["session_id"]
    assert resumes[0]["lastTurn"] >= last_before
    captions = [(e["detail"]["turn"], e["detail"]["text"]) for e in events if e["type"] == "microturn-caption"]
    assert len(captions) == len(set(captions)), "a replayed caption was shown twice"
    assert not [e for e in events if e["type"] == "microturn-error"]


@pytest.mark.timeout(60)
async def test_widget_reconnects_as_a_new_session_when_the_gateway_drops_it(
        gateway_and_site: tuple[TestServer, str], speech_wav: Path, tmp_path: Path) -> None:
    gateway, site = gateway_and_site
    base = str(gateway.make_url("")).rstrip("/")
    mic = make_fake_mic_wav(speech_wav, tmp_path / "mic.wav")
    session_js = SESSION_JS
    async with chromium(tmp_path / "profile", mic) as context:
        page = await context.new_page()  # type: ignore[attr-defined]
        await page.add_init_script(EVENT_LOG)
        await page.goto(site + "/")
        await page.get_by_role("button", name="Connect", exact=True).click()
        await page.wait_for_selector('microturn-widget[state="listening"]', timeout=15000)
        first = await page.evaluate(session_js)
        await wait_for_turns(base, first, 3, timeout=10)

        # the gateway ends the session and drops its state (as an idle timeout would): nothing left to resume
        async with aiohttp.ClientSession() as http, http.delete(
                f"{base}/v1/sessions/{first['session_id']}",
                headers={"Authorization": f"Bearer {first['token']}"}) as resp:
            assert resp.status == 200
        await page.wait_for_selector('microturn-widget[state="reconnecting"]', timeout=10000)
        await page.wait_for_selector('microturn-widget[state="listening"]', timeout=15000)
        second = await page.evaluate(session_js)
        state = await wait_for_turns(base, second, 3, timeout=10)
        events = await page.evaluate("window.__events")
        await page.get_by_role("button", name="Disconnect", exact=True).click()

    assert second["session_id"] != first["session_id"]  # the resume was refused (404): a clean new session
    assert state["state"] == "connected"
    assert (await session_state(base, first))[0] == 404
    states = [e["detail"]["state"] for e in events if e["type"] == "microturn-state"]
    assert states[:4] == ["connecting", "listening", "reconnecting", "listening"], states
    assert [(e["detail"]["sessionId"], e["detail"]["resumed"]) for e in events
            if e["type"] == "microturn-session"] == [(first["session_id"], False), (second["session_id"], False)]
    assert not [e for e in events if e["type"] == "microturn-resume"]
