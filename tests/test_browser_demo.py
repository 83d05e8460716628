"""The demo page in headless Chromium: fake microphone (espeak-ng speech) → gateway → echo back → captions.

The page is driven only through what a person sees (its Connect/Disconnect buttons and captions); the session is
checked from the gateway's side with the token the page received, and the audio coming back is measured by a
WebAudio analyser this test adds to every remote track.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests._browser_helpers import best_envelope_match, chromium, make_fake_mic_wav, needs_chromium, read_wav

pytestmark = [pytest.mark.browser, needs_chromium]

# Added to every page before its own scripts: measure the energy of every remote audio track the page receives.
# (Chromium only delivers a remote WebRTC stream's samples to WebAudio while the page also plays it in a media
# element, so this measures what the page itself plays.)
INBOUND_PROBE = """
window.__inbound = { energy: 0, tracks: 0 };
const NativePC = window.RTCPeerConnection;
window.RTCPeerConnection = class extends NativePC {
  constructor(...args) {
    super(...args);
    this.addEventListener("track", (e) => {
      if (e.track.kind !== "audio") return;
      window.__inbound.tracks += 1;
      const ctx = new AudioContext();
      const analyser = ctx.createAnalyser();
      ctx.createMediaStreamSource(new MediaStream([e.track])).connect(analyser);
      const data = new Float32Array(analyser.fftSize);
      setInterval(() => {
        analyser.getFloatTimeDomainData(data);
        let sum = 0;
        for (const v of data) sum += v * v;
        window.__inbound.energy += sum / data.length;
      }, 50);
    });
  }
};
"""


async def session_state(base: str, created: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(
            f"{base}/v1/sessions/{created['session_id']}",
            headers={"Authorization": f"Bearer {created['token']}"}) as resp:
        return resp.status, dict(await resp.json())


async def wait_for_turns(base: str, created: dict[str, Any], turns: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status, state = await session_state(base, created)
        if status == 200 and state.get("micro_turns", 0) >= turns:
            return state
        await asyncio.sleep(0.2)
    raise AssertionError(f"the session did not reach {turns} micro-turns: {state}")


@pytest.mark.timeout(60)
async def test_demo_page_talks_to_the_gateway(gateway: TestServer, speech_wav: Path, tmp_path: Path) -> None:
    mic = make_fake_mic_wav(speech_wav, tmp_path / "mic.wav")
    signal, rate = read_wav(mic)
    base = str(gateway.make_url("")).rstrip("/")

    async with chromium(tmp_path / "profile", mic) as context:
        page = await context.new_page()  # type: ignore[attr-defined]
        await page.add_init_script(INBOUND_PROBE)

        await page.goto(base + "/")
        async with page.expect_response(
                lambda r: r.request.method == "POST" and r.url.endswith("/v1/sessions")) as response:
            await page.get_by_role("button", name="Connect", exact=True).click()
        created = await (await response.value).json()

        state = await wait_for_turns(base, created, 32, timeout=20)  # 6.4 s of the speaker
        await page.get_by_text("dBFS").first.wait_for(timeout=5000)
        inbound = await page.evaluate("window.__inbound")

        await page.get_by_role("button", name="Disconnect", exact=True).click()
        deadline = time.monotonic() + 5
        while (status := (await session_state(base, created))[0]) != 404 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    assert state["state"] == "connected"
    levels = state["input_levels_dbfs"][3:]  # skip the first micro-turns (connection, audio processing warm-up)
    assert len(levels) >= 25
    # the gateway heard the speech: loud micro-turns well above silence, and quiet ones between phrases
    assert max(levels) > -35, levels
    assert min(levels) < max(levels) - 25, levels
    # and its shape: the per-micro-turn levels follow the WAV's 200 ms RMS envelope
    r, offset = best_envelope_match(levels, signal, rate)
    assert r > 0.7, f"gateway levels correlate only {r:.2f} with the speech envelope (best offset {offset:.2f} s)"
    # the page played the echo back and showed captions
    assert inbound["tracks"] >= 1 and inbound["energy"] > 0.01, inbound
    assert status == 404  # Disconnect ended the session on the gateway
