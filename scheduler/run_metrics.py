"""The scheduler's Prometheus metrics (names in encore.metric_names).

Figures about the last published run are read from the run records at scrape time, so they
are right whichever process ran it (the scheduler, `encore run`, or the API). Histograms and
counters describe the runs this process did.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from encore import metric_names as names
from encore.database import Database, RunRecord

logger = logging.getLogger("encore.scheduler.run_metrics")


class RunMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.batch_seconds = Histogram(
            names.BATCH_SECONDS,
            "Score and write time of one batch of users.",
            buckets=names.BATCH_BUCKETS,
            registry=registry,
        )
        self.failures = Counter(
            names.RUN_FAILURES.removesuffix("_total"),
            "Runs that failed, by reason.",
            ["reason"],
            registry=registry,
        )
        self.lock_contention = Counter(
            names.LOCK_CONTENTION.removesuffix("_total"),
            "Runs refused because another run held the lock.",
            registry=registry,
        )
        self.runs = Counter(
            names.RUNS.removesuffix("_total"),
            "Runs finished, by kind and status.",
            ["kind", "status"],
            registry=registry,
        )
        self.deciles = DecileHistogram()
        registry.register(self.deciles)

    def add_database(self, open_db: Callable[[], Database]) -> None:
        self.registry.register(LastRunCollector(open_db))

    def add_ingest(self, manifest: Path, gate: Path) -> None:
        self.registry.register(IngestCollector(manifest))
        self.registry.register(RetrainGateCollector(gate))


class RetrainGateCollector(Collector):
    """The last retraining's gate (``retrain.json``, training/retrain.py), at scrape time."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            gate = json.loads(self.path.read_text())
            refused = 0.0 if gate["promoted"] else 1.0
            recalls = (gate["champion_recall@10"], gate["challenger_recall@10"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("cannot read the retraining gate %s for metrics: %s", self.path, exc)
            return
        family = GaugeMetricFamily(
            names.RETRAIN_REFUSED,
            "1 when the last retrained ranker was refused by the quality gate (kept unpromoted).",
        )
        family.add_metric([], refused)
        yield family
        recall = GaugeMetricFamily(
            names.RETRAIN_RECALL,
            "recall@10 on the latest data at the last gate, champion and challenger.",
            labels=["role"],
        )
        for role, value in zip(("champion", "challenger"), recalls, strict=True):
            recall.add_metric([role], float(value))
        yield recall


class IngestCollector(Collector):
    """The nightly ingest's partitions set aside and rows admitted, read from its manifest
    (``ingest.json``, training/source.py) at scrape time, whichever process ingested."""

    def __init__(self, manifest: Path) -> None:
        self.manifest = manifest

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            state = json.loads(self.manifest.read_text())
            statuses = [p["status"] for p in state["partitions"].values()]
            rows = int(state["rows"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("cannot read the ingest state %s for metrics: %s", self.manifest, exc)
            return
        aside = GaugeMetricFamily(
            names.INGEST_SET_ASIDE,
            "Partitions of ENCORE_INTERACTIONS set aside (a bad row); `encore ingest status`.",
        )
        aside.add_metric([], statuses.count("set_aside"))
        yield aside
        admitted = GaugeMetricFamily(names.INGEST_ROWS, "Interaction rows admitted so far.")
        admitted.add_metric([], rows)
        yield admitted


class DecileHistogram(Collector):
    """Popularity decile of every recommended playlist, added per batch in bulk.

    prometheus_client's Histogram observes one value at a time; a run recommends millions of
    playlists, so the counts per decile are accumulated and exposed as a histogram family.
    """

    def __init__(self) -> None:
        self.counts = np.zeros(10, dtype=np.int64)

    def add(self, counts: np.ndarray) -> None:
        self.counts += np.asarray(counts, dtype=np.int64)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative = np.cumsum(self.counts)
        buckets = [(f"{d}.0", float(c)) for d, c in zip(range(1, 11), cumulative, strict=True)]
        buckets.append(("+Inf", float(cumulative[-1])))
        total = float((self.counts * np.arange(1, 11)).sum())
        yield HistogramMetricFamily(
            names.POPULARITY_DECILE,
            "Popularity decile (1 = most popular tenth) of each recommended playlist.",
            buckets=buckets,
            sum_value=total,
        )


class LastRunCollector(Collector):
    def __init__(self, open_db: Callable[[], Database]) -> None:
        self.open_db = open_db

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            with self.open_db() as db:
                run = db.last_published()
                queued = [r for r in db.open_runs() if r.status == "queued"]
        except Exception as exc:  # a scrape must not fail because the database is down
            logger.warning("cannot read the run records for metrics: %s", exc)
            return
        yield from _queue_gauges(queued)
        if run is None:
            return
        yield from _run_gauges(run)


def _queue_gauges(queued: list[RunRecord]) -> Iterator[GaugeMetricFamily]:
    count = GaugeMetricFamily(names.RUNS_QUEUED, "Runs queued through the API, not yet claimed.")
    count.add_metric([], len(queued))
    yield count
    if queued:
        oldest = GaugeMetricFamily(
            names.RUNS_QUEUED_OLDEST, "When the oldest queued run was queued (Unix seconds)."
        )
        oldest.add_metric([], min(r.created_at for r in queued).timestamp())
        yield oldest


def _run_gauges(run: RunRecord) -> Iterator[GaugeMetricFamily]:
    def gauge(name: str, doc: str, value: float | None) -> Iterator[GaugeMetricFamily]:
        if value is not None:
            family = GaugeMetricFamily(name, doc)
            family.add_metric([], float(value))
            yield family

    yield from gauge(
        names.RUN_LAST_SUCCESS,
        "Finish time of the last published run (Unix seconds).",
        run.finished_at.timestamp() if run.finished_at else None,
    )
    yield from gauge(
        names.RUN_DURATION, "Duration of the last published run.", run.duration_seconds
    )
    if run.phases:
        phases = GaugeMetricFamily(
            names.RUN_PHASE_SECONDS,
            "Seconds of each phase of the last published run (ingest, refresh, score, publish).",
            labels=["phase"],
        )
        for phase, seconds in run.phases.items():
            phases.add_metric([phase], float(seconds))
        yield phases
    yield from gauge(
        names.RUN_USERS_SCORED, "Users scored by the last published run.", run.users_scored
    )
    yield from gauge(
        names.RUN_COLD_USERS,
        "Users without candidates in that run (popular playlists they have not seen).",
        run.cold_users,
    )
    yield from gauge(names.RUN_COLD_FRACTION, "Cold users / users in that run.", run.cold_fraction)
    yield from gauge(
        names.RUN_DRIFT_SCORE,
        "PSI of the run's popularity deciles and cold share vs the run before.",
        run.drift_score,
    )
    yield from gauge(
        names.RUN_DRIFT_PVALUE,
        "Chi-square p-value of the decile distribution vs the run before.",
        run.drift_pvalue,
    )
