"""The demo page in headless Chromium: fake microphone (espeak-ng speech) → gateway → echo back → captions.

The page is driven only through what a person sees (its Connect/Disconnect buttons and captions); the session is
checked from the gateway's side with the token the page received, and the audio coming back is measured by a
WebAudio analyser this test adds to every remote track.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from tests._browser_helpers import (
    INBOUND_PROBE,
    best_envelope_match,
    chromium,
    make_fake_mic_wav,
    needs_chromium,
    read_wav,
    session_state,
    wait_for_turns,
)

pytestmark = [pytest.mark.browser, needs_chromium]



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
    # Chrome sends 40 ms packets, as the answer's a=ptime asks (by default it sends 20 ms: 10 a micro-turn)
    assert 4 <= state["audio_frames_in"] / state["micro_turns"] <= 6
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
