"""Helpers for the headless-Chromium tests: fake media files, the browser launch, and envelope comparison.

Chromium reads its fake microphone from a WAV file (16-bit PCM; a 24-bit file arrives as silence) and loops it; its
fake camera reads a .y4m file. Both are generated per test session from espeak-ng and ffmpeg's test source.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
MICRO_TURN_S = 0.2

needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed")

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



def make_fake_mic_wav(speech_wav: Path, out: Path, pad_s: float = 0.6) -> Path:
    """``speech_wav`` as a 16-bit mono 48 kHz WAV with ``pad_s`` of silence after it, for Chromium's fake mic."""
    if shutil.which("sox") is None:
        pytest.skip("sox is not installed")
    subprocess.run(["sox", str(speech_wav), "-r", "48000", "-b", "16", "-c", "1", "-e", "signed-integer",
                    str(out), "pad", "0", str(pad_s)], check=True)
    return out


def make_fake_camera_y4m(out: Path, seconds: int = 4) -> Path:
    """A small moving test picture (160x120, 5 fps) for Chromium's fake camera."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed")
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc=size=160x120:rate=5:duration={seconds}", "-pix_fmt", "yuv420p", str(out)],
                   check=True)
    return out


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        assert w.getsampwidth() == 2 and w.getnchannels() == 1
        data = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768
        return data, w.getframerate()


def envelope_dbfs(signal: np.ndarray, rate: int, offset_s: float = 0.0) -> np.ndarray:
    """RMS level in dBFS (floor -100) of consecutive 200 ms windows of the looped ``signal``, from ``offset_s``."""
    window = int(MICRO_TURN_S * rate)
    start = int(offset_s * rate) % len(signal)
    rolled = np.roll(signal, -start)
    n = len(rolled) // window
    frames = rolled[: n * window].reshape(n, window).astype(np.float64)
    rms = np.sqrt(np.mean(frames**2, axis=1))
    return np.maximum(-100.0, 20 * np.log10(np.maximum(rms, 1e-5)))


def best_envelope_match(levels: list[float], signal: np.ndarray, rate: int, floor_db: float = -60.0,
                        step_s: float = 0.02) -> tuple[float, float]:
    """Best Pearson correlation of the gateway's per-micro-turn levels with the looped WAV's 200 ms envelope.

    The browser starts the file at an unknown point of the micro-turn grid, so every start offset (in ``step_s``
    steps over one loop) is tried; both envelopes are clipped at ``floor_db`` so the silence floor does not
    dominate. Returns ``(correlation, offset_s)``.
    """
    got = np.maximum(np.asarray(levels, dtype=np.float64), floor_db)
    loop_s = len(signal) / rate
    looped = np.tile(signal, int(np.ceil(len(got) * MICRO_TURN_S / loop_s)) + 2)  # the file as the browser plays it
    best = (-1.0, 0.0)
    for offset in np.arange(0.0, loop_s, step_s):
        env = np.maximum(envelope_dbfs(looped, rate, offset), floor_db)[: len(got)]
        if len(env) < len(got) or np.std(env) == 0 or np.std(got) == 0:
            continue
        r = float(np.corrcoef(got, env)[0, 1])
        if r > best[0]:
            best = (r, float(offset))
    return best


def chromium_args(mic_wav: Path, camera_y4m: Path | None = None) -> list[str]:
    args = [
        "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-audio-capture={mic_wav}",
        "--allow-loopback-in-peer-connection", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--autoplay-policy=no-user-gesture-required",
    ]
    if camera_y4m is not None:
        args.append(f"--use-file-for-fake-video-capture={camera_y4m}")
    return args


@asynccontextmanager
async def chromium(user_data_dir: Path, mic_wav: Path, camera_y4m: Path | None = None) -> AsyncIterator[object]:
    """A headless Chromium (a fresh profile in ``user_data_dir``) with fake media devices; yields the context."""
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        context = await p.chromium.launch_persistent_context(
            str(user_data_dir), executable_path=str(CHROMIUM), headless=True,
            args=chromium_args(mic_wav, camera_y4m), viewport={"width": 640, "height": 480})
        try:
            yield context
        finally:
            await context.close()


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
