"""``microturn probe``: stream a WAV file to a gateway in real time, like a browser, and record the reply.

OUT.wav is 48 kHz mono and time-aligned with the input: its sample 0 is the moment sample 0 of the input was
captured. The last line printed is one JSON object (see :func:`run_probe`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import sys
import wave
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import av
import numpy as np

from microturn.client import RATE, ProbeClient
from microturn.contracts import MICRO_TURN_MS
from webrtc_gateway.ice import use_host_addresses


def read_audio(path: Path, rate: int = RATE) -> np.ndarray:
    """Any audio file av can open → mono float32 at ``rate``."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    chunks: list[np.ndarray] = []
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
    chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    if not chunks:
        raise ValueError(f"{path} has no audio")
    return np.concatenate(chunks).astype(np.float32)


def read_picture(path: Path, width: int = 320, height: int = 240) -> np.ndarray:
    """The first frame of an image or video file as RGB."""
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
    return np.asarray(frame.reformat(width=width, height=height, format="rgb24").to_ndarray())


def write_wav(path: Path, audio: np.ndarray, rate: int = RATE) -> None:
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def first_sound_ms(audio: np.ndarray, rate: int = RATE, threshold_dbfs: float = -50.0) -> float | None:
    window = rate // 100
    usable = len(audio) // window * window
    rms = np.sqrt(np.mean(np.square(audio[:usable].reshape(-1, window)), axis=1))
    loud = np.nonzero(rms > 10 ** (threshold_dbfs / 20))[0]
    return float(loud[0] * 10) if loud.size else None


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def run_probe(urls: list[str], inp: Path, out: Path, video: Path | None = None,
                    texts: list[tuple[str, float]] | None = None, tail_s: float = 1.0, loss: float = 0.0,
                    ice_host: str | None = None, relay_only: bool = False) -> dict[str, Any]:
    """Run one probe session; returns ``session_id, micro_turns_sent, audio_in_seconds, audio_out_seconds,
    first_output_ms, captions, errors, resumes, resume_gap_ms, caption_gap_ms`` (the longest wait between two
    captions: a session moved to another inference worker shows up here, not as a resume), ``ice_candidates`` (the
    selected pair's local and remote candidate types), and ``dropped_packets`` when ``loss`` is set. With more than
    one URL, the session resumes on the next one whenever its connection fails. ``relay_only``: ICE through the
    gateway's TURN server only.
    """
    use_host_addresses([ice_host] if ice_host else (["127.0.0.1"] if is_loopback(urls[0]) else []))
    signal = read_audio(inp)
    seconds = len(signal) / RATE
    client = ProbeClient(urls[0], signal, picture=read_picture(video) if video else None, loss=loss,
                         fallback_urls=tuple(urls[1:]), relay_only=relay_only)
    errors: list[str] = []
    state: dict[str, Any] = {}
    pair: tuple[str, str] | None = None
    try:
        await client.connect()
        print(f"probe: session {client.session_id}, streaming {seconds:.1f} s", file=sys.stderr)
        for text, at in sorted(texts or [], key=lambda t: t[1]):
            await asyncio.sleep(max(0.0, at - client.now()))
            client.send({"type": "text", "text": text})
        await asyncio.sleep(max(0.0, seconds + tail_s - client.now()))
        state = await client.state()
        pair = client.selected_candidates()
    except Exception as exc:  # the JSON line reports it; the exit status says it failed
        errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        await client.close()
    recorded = client.output(seconds + tail_s)
    write_wav(out, recorded)
    result: dict[str, Any] = {
        "session_id": client.session_id,
        "micro_turns_sent": state.get("micro_turns", int(np.ceil(seconds * 1000 / MICRO_TURN_MS))),
        "audio_in_seconds": round(seconds, 3),
        "audio_out_seconds": round(client.audio_seconds(), 3),
        "first_output_ms": first_sound_ms(recorded),
        "captions": [c["text"] for c in client.captions()],
        "errors": errors + client.errors,
        "resumes": client.resumes,
        "resume_gap_ms": [round(gap * 1000, 1) for gap in client.resume_gaps],
        "caption_gap_ms": round(client.longest_caption_gap() * 1000, 1),
        "ice_candidates": list(pair) if pair else None,
    }
    captions = [c["turn"] for c in client.captions()]
    if len(captions) != len(set(captions)):
        result["errors"].append("a caption arrived twice")
    if loss:
        result["dropped_packets"] = client.dropped_packets
    return result
