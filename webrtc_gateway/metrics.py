"""Prometheus metrics of a gateway, computed when ``/metrics`` is scraped.

The collector reads the live sessions, the totals of ended ones and the engine's counters; nothing on the media
path touches a metrics object. Names and meanings:

==========================================  ======================================================================
``microturn_sessions``                      sessions on this gateway (``state``: ``new`` or ``live``)
``microturn_micro_turns_total``             micro-turns dispatched to the engine
``microturn_late_micro_turns_total``        micro-turns dispatched at their deadline with audio missing
``microturn_frames_out_total``              20 ms audio frames sent to browsers
``microturn_underrun_frames_total``         frames sent as silence because model output was late
``microturn_engine_ticks_total``            batched engine steps
``microturn_engine_late_ticks_total``       engine steps that ended past their micro-turn's tick budget
``microturn_engine_tick_seconds``           quantiles of engine step time (recent ticks)
``microturn_engine_wait_seconds``           quantiles of submit → step start (recent micro-turns)
``microturn_engine_batch_size``             quantiles of micro-turns per engine step (recent ticks)
==========================================  ======================================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from webrtc_gateway.gateway import Gateway

QUANTILES = (0.5, 0.9, 0.99)


def _summary(name: str, doc: str, values: Iterable[float]) -> Metric:
    data = np.fromiter(values, float)
    family = GaugeMetricFamily(name, doc, labels=["quantile"])
    for q in QUANTILES:
        family.add_metric([str(q)], float(np.quantile(data, q)) if data.size else float("nan"))
    return family


class GatewayCollector(Collector):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator[Metric]:
        g = self.gateway
        live = list(g.live.values())
        sessions = GaugeMetricFamily("microturn_sessions", "Sessions on this gateway", labels=["state"])
        sessions.add_metric(["new"], len(g.pending))
        sessions.add_metric(["live"], len(live))
        yield sessions

        def counter(name: str, doc: str, value: float) -> Metric:
            return CounterMetricFamily(name, doc, value=value)

        t = g.totals
        yield counter("microturn_micro_turns", "Micro-turns dispatched",
                      t.micro_turns + sum(s.clock.dispatched for s in live))
        yield counter("microturn_late_micro_turns", "Micro-turns dispatched at their deadline",
                      t.late_micro_turns + sum(s.clock.late for s in live))
        yield counter("microturn_frames_out", "Audio frames sent",
                      t.frames_out + sum(s.playout.frames_out for s in live))
        yield counter("microturn_underrun_frames", "Frames sent as silence because output was late",
                      t.underrun_frames + sum(s.playout.underrun_frames for s in live))
        e = g.engine.stats
        yield counter("microturn_engine_ticks", "Batched engine steps", e.ticks)
        yield counter("microturn_engine_late_ticks", "Engine steps past their tick budget", e.late_ticks)
        yield _summary("microturn_engine_tick_seconds", "Engine step time", e.tick_seconds)
        yield _summary("microturn_engine_wait_seconds", "Submit to step start", e.wait_seconds)
        yield _summary("microturn_engine_batch_size", "Micro-turns per engine step", e.batch_sizes)


def registry_for(gateway: Gateway) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(gateway))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


