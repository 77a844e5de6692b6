"""GET /metrics: Prometheus text for operators, read from the shared records at scrape time.

The API is stateless and the work happens in other processes, so nothing is counted in this
process's memory: a collector built per scrape reads Redis (the unfinished jobs, the counters
the workers and the store keep in ``lmd:stats``, the registered workers) and prometheus-client
writes the exposition format.
"""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Depends, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from api.deps import SettingsDep, StoreDep, require_operator
from jobs.queue import queue_names
from jobs.store import RENDER_BUCKETS_S, Store

router = APIRouter(tags=["health"])

UNFINISHED = ("queued", "planning", "rendering")
FINISHED = ("succeeded", "failed", "canceled")


class RecordsCollector:
    """One scrape's view of the service, from a snapshot of Redis taken before collecting."""

    def __init__(self, store: Store, queues: list[str]):
        self.queues = queues
        self.active = store.active_states()
        self.stats = store.stats()
        self.workers = store.workers()

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("lmd_jobs", "Unfinished jobs by state", labels=["state"])
        for state in UNFINISHED:
            jobs.add_metric([state], self.active.get(state, 0))
        yield jobs

        finished = CounterMetricFamily("lmd_jobs_finished", "Jobs that ended, by final state", labels=["state"])
        for state in FINISHED:
            finished.add_metric([state], self.stats.get(f"finished:{state}", 0.0))
        yield finished

        failed = CounterMetricFamily("lmd_jobs_failed", "Failed jobs by error code", labels=["code"])
        for field, value in sorted(self.stats.items()):
            if field.startswith("failed:"):
                failed.add_metric([field.removeprefix("failed:")], value)
        yield failed

        buckets = [(f"{b:g}", self.stats.get(f"render:le:{b:g}", 0.0)) for b in RENDER_BUCKETS_S]
        buckets.append(("+Inf", self.stats.get("render:count", 0.0)))
        yield HistogramMetricFamily("lmd_render_seconds", "Wall time of succeeded renders (stage 2, in the worker)",
                                    buckets=buckets, sum_value=self.stats.get("render:sum", 0.0))

        workers = GaugeMetricFamily("lmd_workers", "Workers that registered recently, by queue", labels=["queue"])
        for queue in self.queues:
            workers.add_metric([queue], sum(queue in w["queues"] for w in self.workers))
        yield workers


@router.get("/metrics", operation_id="metrics", dependencies=[Depends(require_operator)], response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(store: StoreDep, settings: SettingsDep) -> Response:
    """Prometheus metrics: jobs by state, finished jobs, failures by code, render durations, workers.

    With keys on, an operator key is needed (``api.deps.require_operator``): the counts are every tenant's.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(await run_in_threadpool(RecordsCollector, store, queue_names(settings)))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
