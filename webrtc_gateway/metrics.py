"""Prometheus metrics of a gateway, computed when ``/metrics`` is scraped.

The collector reads the live sessions, the totals of ended ones and the engine's counters; the media path only
counts (plain integers and :class:`~microturn.histogram.Histogram`). Names and meanings (counters end in
``_total``):

==========================================  ======================================================================
``microturn_sessions``                      sessions on this gateway (``state``: ``new`` or ``live``)
``microturn_gateway_draining``              1 while the gateway drains (after SIGTERM), else 0
``microturn_micro_turns_total``             micro-turns dispatched to the engine
``microturn_late_micro_turns_total``        micro-turns dispatched at their deadline with audio missing
``microturn_turns_not_stepped_total``       micro-turns the engine could not step (silence, not in the context)
``microturn_frames_out_total``              40 ms audio frames sent to browsers
``microturn_underrun_frames_total``         frames sent as silence because model output was late
``microturn_missed_slots_total``            40 ms frame slots outbound tracks missed because their process
                                            stalled (its event loop could not run); timestamps jump over them
``microturn_micro_turn_seconds``            histogram: micro-turn submitted → its output back at the gateway
``microturn_peer_packet_loss_ratio``        inbound audio packet loss of live sessions (``quantile`` over them)
``microturn_peer_jitter_seconds``           inbound audio interarrival jitter (``quantile`` over live sessions)
``microturn_peer_rtt_seconds``              round-trip time to the browser (``quantile`` over live sessions)
``microturn_peer_packets_lost_total``       inbound audio packets lost, live sessions (from RTP sequence numbers)
``microturn_workers``                       remote workers by ``state`` (``up``, ``draining``); with ``--workers``
``microturn_worker_reassignments_total``    sessions moved to another worker (worker died or drained)
``microturn_worker_resent_turns_total``     micro-turns sent again to the worker that took their session over
``microturn_worker_hop_seconds``            histogram: gateway ↔ worker time of a micro-turn, less its time
                                            inside the worker (the cost of the hop)
engine metrics                              with the in-process engine: see :mod:`inference.metrics`
==========================================  ======================================================================
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from inference.engine import Engine
from inference.metrics import engine_metrics, histogram
from webrtc_gateway.gateway import Gateway
from webrtc_gateway.workers import RemoteEngine

QUANTILES = (0.5, 0.9, 0.99)


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
        yield GaugeMetricFamily("microturn_gateway_draining", "1 while draining", value=int(g.draining))

        def counter(name: str, doc: str, value: float) -> Metric:
            return CounterMetricFamily(name, doc, value=value)

        t = g.totals
        yield counter("microturn_micro_turns", "Micro-turns dispatched",
                      t.micro_turns + sum(s.clock.dispatched for s in live))
        yield counter("microturn_late_micro_turns", "Micro-turns dispatched at their deadline",
                      t.late_micro_turns + sum(s.clock.late for s in live))
        yield counter("microturn_turns_not_stepped", "Micro-turns the engine could not step",
                      t.turns_not_stepped + sum(s.turns_not_stepped for s in live))
        yield counter("microturn_frames_out", "Audio frames sent",
                      t.frames_out + sum(s.playout.frames_out for s in live))
        yield counter("microturn_underrun_frames", "Frames sent as silence because output was late",
                      t.underrun_frames + sum(s.playout.underrun_frames for s in live))
        yield counter("microturn_missed_slots", "Frame slots outbound tracks missed because their process stalled",
                      t.missed_slots + sum(s.playout.missed_slots for s in live))
        yield histogram("microturn_micro_turn_seconds", "Micro-turn submitted to output back", g.turn_latency)
        peers = [s.peer for s in live if s.peer is not None]
        yield _quantiles("microturn_peer_packet_loss_ratio", "Inbound audio packet loss of live sessions",
                         [p.loss_ratio for p in peers])
        yield _quantiles("microturn_peer_jitter_seconds", "Inbound audio jitter of live sessions",
                         [p.jitter_s for p in peers if p.jitter_s is not None])
        yield _quantiles("microturn_peer_rtt_seconds", "Round-trip time to the browsers of live sessions",
                         [p.rtt_s for p in peers if p.rtt_s is not None])
        yield counter("microturn_peer_packets_lost", "Inbound audio packets lost (live sessions)",
                      sum(p.packets_lost for p in peers))
        engine = g.engine
        if isinstance(engine, Engine):
            yield from engine_metrics(engine)
        elif isinstance(engine, RemoteEngine):
            workers = GaugeMetricFamily("microturn_workers", "Remote workers", labels=["state"])
            up = engine.up()
            workers.add_metric(["up"], sum(not w.draining for w in up))
            workers.add_metric(["draining"], sum(w.draining for w in up))
            yield workers
            r = engine.stats
            yield counter("microturn_worker_reassignments", "Sessions moved to another worker", r.reassignments)
            yield counter("microturn_worker_resent_turns", "Micro-turns sent again after a move", r.turns_resent)
            yield histogram("microturn_worker_hop_seconds", "Gateway-worker hop of a micro-turn", r.hop_hist)


def _quantiles(name: str, doc: str, values: list[float]) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=["quantile"])
    data = np.asarray(values, float)
    for q in QUANTILES:
        family.add_metric([str(q)], float(np.quantile(data, q)) if data.size else float("nan"))
    return family


def registry_for(gateway: Gateway) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(gateway))
    return registry


def page(registry: CollectorRegistry) -> web.Response:
    """``registry`` as a ``/metrics`` answer (Prometheus text format)."""
    return web.Response(body=render(registry), content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
