"""``bench_engine(quick=True)`` is quick and gives every field of ``microturn bench engine --json``."""

from __future__ import annotations

import json

import pytest

from inference.bench_engine import bench_engine


def test_quick_bench_has_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    result = bench_engine("tiny", quick=True)
    assert set(result) == {"preset", "params_total", "params_active", "tick_ms", "reprefill_tick_ms",
                           "batch_tick_ms", "realtime_sessions", "kv_bytes_per_session"}
    assert result["preset"] == "tiny"
    total, active = result["params_total"], result["params_active"]
    assert isinstance(total, int) and isinstance(active, int) and 0 < active < total
    sizes = {"tick_ms": 4, "reprefill_tick_ms": 3, "batch_tick_ms": 2, "kv_bytes_per_session": 2}
    for key, n in sizes.items():
        table = result[key]
        assert isinstance(table, dict) and len(table) == n
        assert all(isinstance(v, int | float) and v > 0 for v in table.values())
    kv = result["kv_bytes_per_session"]
    assert isinstance(kv, dict) and len(set(kv.values())) == 1  # bounded: the same at every length
    assert isinstance(result["realtime_sessions"], int)
    json.dumps(result)
    captured = capsys.readouterr()
    assert captured.out == "" and "[bench engine]" in captured.err  # progress on stderr only
