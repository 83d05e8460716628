"""The command line as a user runs it: serve in one process, probe and bench from others."""

from __future__ import annotations

import json
import subprocess
import sys
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from microturn.bench_gateway import bench_gateway, slow_impulses
from microturn.config import Settings
from microturn.local import serve
from tests.conftest import free_port
from webrtc_gateway.playout import FRAME_S


@pytest.fixture
def served() -> Iterator[str]:
    port = free_port()
    proc = serve(port, "--model", "echo")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def test_probe_records_a_time_aligned_echo(served: str, speech_wav: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    run = subprocess.run([sys.executable, "-m", "microturn.cli", "probe", served, "--in", str(speech_wav),
                          "--out", str(out), "--text", "hello@0.5"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(result) >= {"session_id", "micro_turns_sent", "audio_in_seconds", "audio_out_seconds",
                           "first_output_ms", "captions", "errors"}
    assert result["errors"] == []
    assert result["micro_turns_sent"] >= result["audio_in_seconds"] / 0.2 - 1
    assert 200 <= result["first_output_ms"] <= 400  # the first speech comes back one micro-turn later
    assert any("you wrote: hello" in c for c in result["captions"])
    with wave.open(str(out)) as w:
        assert w.getframerate() == 48_000 and w.getnchannels() == 1
        audio = np.frombuffer(w.readframes(w.getnframes()), np.int16)
    assert len(audio) >= result["audio_in_seconds"] * 48_000
    assert np.abs(audio).max() > 3000


def test_probe_reports_an_unreachable_gateway(tmp_path: Path, speech_wav: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "microturn.cli", "probe", f"http://127.0.0.1:{free_port()}",
                          "--in", str(speech_wav), "--out", str(tmp_path / "o.wav")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "ClientConnectorError" in json.loads(run.stdout.strip().splitlines()[-1])["errors"][0]


@pytest.mark.parametrize("gateway_processes", [1, 2])
def test_bench_gateway_reports_every_field(gateway_processes: int) -> None:
    result = bench_gateway(sessions=2, seconds=4, processes=1, gateway_processes=gateway_processes)
    assert set(result) >= {"sessions", "seconds", "micro_turns", "late_micro_turns", "underrun_frames",
                           "frames_out", "added_latency_ms", "cpu_seconds_per_session_second"}
    assert result["gateway_processes"] == gateway_processes
    assert result["errors"] == []
    assert result["micro_turns"] >= 2 * 15
    assert result["frames_out"] * FRAME_S >= 2 * 3.0
    assert result["impulses"] >= 4 and result["added_latency_ms"]["p50"] is not None
    assert 0 < result["cpu_seconds_per_session_second"] < 2
    assert result["slow_impulses"]["count"] <= result["impulses"]
    assert result["missed_slots"] >= 0
    assert result["steal_seconds"] >= 0


def test_slow_impulses_say_when_and_where() -> None:
    sessions = [[(0.7, 0.020), (1.5, 0.140), (30.2, 0.101)], [(0.9, 0.099), (12.0, 0.020)], [(41.6, 0.250)]]
    assert slow_impulses(sessions) == {"count": 3, "at_start": 1, "sessions": 2, "seconds": [1, 30, 41]}
    assert slow_impulses([[(1.0, 0.02)], []]) == {"count": 0, "at_start": 0, "sessions": 0, "seconds": []}


def test_settings_come_from_environment_then_flags() -> None:
    env = {"MICROTURN_PORT": "9001", "MICROTURN_ALLOWED_ORIGINS": "https://a.example, https://b.example",
           "MICROTURN_DEADLINE_GRACE_MS": "40"}
    settings = Settings.from_env(env, port=9002)
    assert settings.port == 9002
    assert settings.allowed_origins == ("https://a.example", "https://b.example")
    assert settings.deadline_grace_ms == 40
    assert Settings.from_env({}).model == "reference"
    assert Settings.from_env({"MICROTURN_MODEL": "echo"}).model == "echo"
