"""Prometheus metrics of an engine, the same whether it runs in a worker or inside an all-in-one gateway.

==========================================  ======================================================================
``microturn_engine_ticks_total``            batched engine steps
``microturn_engine_late_ticks_total``       engine steps that ended past their micro-turn's tick budget
``microturn_engine_tick_seconds``           histogram of engine step time
``microturn_engine_wait_seconds``           histogram of submit → step start
``microturn_engine_batch_size``             histogram of micro-turns per engine step
``microturn_kv_cache_bytes``                memory the model's KV cache holds (models with one)
==========================================  ======================================================================
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from inference.engine import Engine
from microturn.histogram import Histogram


def engine_metrics(engine: Engine) -> Iterator[Metric]:
    s = engine.stats
    yield CounterMetricFamily("microturn_engine_ticks", "Batched engine steps", value=s.ticks)
    yield CounterMetricFamily("microturn_engine_late_ticks", "Engine steps past their tick budget",
                              value=s.late_ticks)
    yield histogram("microturn_engine_tick_seconds", "Engine step time", s.tick_hist)
    yield histogram("microturn_engine_wait_seconds", "Submit to step start", s.wait_hist)
    yield histogram("microturn_engine_batch_size", "Micro-turns per engine step", s.batch_hist)
    kv = getattr(engine.backend, "kv_cache_bytes", None)
    if callable(kv):
        yield GaugeMetricFamily("microturn_kv_cache_bytes", "Memory held by the KV cache", value=kv())


def histogram(name: str, doc: str, h: Histogram) -> Metric:
    """A :class:`~microturn.histogram.Histogram` as a Prometheus histogram family."""
    family = HistogramMetricFamily(name, doc)
    family.add_metric([], h.cumulative(), sum_value=h.sum)
    return family
