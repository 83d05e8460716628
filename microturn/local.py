"""Running microturn's own processes on this machine: free ports, starting a gateway, waiting for it.

Used by the benchmarks and the tests, which start real gateway, worker (and Redis) processes on loopback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60) -> None:
    """Wait until ``url`` answers; fail early if ``proc`` exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process serving {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def _start(command: list[str], port: int, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "microturn.cli", *command], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/livez", proc)
    except BaseException:
        proc.kill()
        raise
    return proc


def serve(port: int, *args: str, gateway_id: str | None = None) -> subprocess.Popen[bytes]:
    """Start ``microturn serve`` on loopback (media too) and wait until it is live."""
    env = {**os.environ, **({"MICROTURN_GATEWAY_ID": gateway_id} if gateway_id else {})}
    return _start(["serve", "--port", str(port), "--ice-host", "127.0.0.1", "--log-level", "WARNING", *args], port,
                  env)


def worker(port: int, *args: str, worker_id: str | None = None) -> subprocess.Popen[bytes]:
    """Start ``microturn worker`` on loopback and wait until it is live."""
    extra = ["--worker-id", worker_id] if worker_id else []
    return _start(["worker", "--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING", *extra, *args],
                  port)


def stop(*procs: subprocess.Popen[bytes], timeout: float = 10, kill: bool = False) -> None:
    """SIGTERM each of ``procs`` that still runs (gateways and workers drain on it), then wait for each; one that has
    not ended within ``timeout`` raises :class:`subprocess.TimeoutExpired`, or with ``kill`` is killed. ``kill`` is
    for processes whose work is done (an evaluation's own gateway): a session it still counts as live, whose peer's
    goodbye has not reached it yet, would hold its drain and the caller's results for up to the drain timeout."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        p.terminate()
    for p in running:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            if not kill:
                raise
            p.kill()
            p.wait()
