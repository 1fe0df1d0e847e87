"""Operator metrics for Prometheus.

The operator calls the plain functions below from its handlers; they are safe to call before
``start_server`` (the series simply wait in the registry until something scrapes them).

Cardinality: aggregate series (jobs per phase, transitions, checks, promotions) have small fixed
label sets. Series labelled with ``namespace``/``name`` exist only for live objects and for
FineTuneJobs that finished less than ``retention_seconds`` ago (default 1 h); after that, or when
the operator calls ``forget``, they are removed. Prometheus keeps the history either way.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .api.governance import ALL_CHECKS

JOB_PHASES = ("Pending", "WaitingForDataset", "Queued", "Training", "Evaluating",
              "AwaitingApproval", "Succeeded", "Failed", "Suspended")
DATASET_PHASES = ("Pending", "Validating", "Ready", "Invalid", "Failed")
SYNTHETIC_PHASES = ("Pending", "WaitingForInputs", "Generating", "Reviewing", "Finalizing", "Ready", "Invalid",
                    "Failed")
JOB_FINISHED_PHASES = frozenset({"Succeeded", "Failed"})
PROMOTION_OUTCOMES = ("promoted", "blocked", "awaiting_approval")
SERVING_KINDS = ("vllm", "kserve", "oci")
SERVING_OUTCOMES = ("published", "unpublished", "failed")
GOVERNANCE_RUN_TRIGGERS = ("first", "policy_change")
DEFAULT_RETENTION_SECONDS = 3600.0
FEDERATION_PHASES = ("Pending", "WaitingForDatasets", "Starting", "Training", "Evaluating", "AwaitingApproval",
                     "Succeeded", "Failed")
#: Federated rounds take minutes (local training at every site, then aggregation).
ROUND_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

# Reconciles are mostly API round-trips (tens of ms) but S3 checks can take seconds.
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _kind(kind: str) -> str:
    """'FineTuneJob', 'finetunejobs', 'Dataset' ... -> 'finetunejob' / 'dataset'."""
    normalized = kind.lower().removesuffix("s")
    if normalized not in ("finetunejob", "dataset", "syntheticdataset"):
        raise ValueError(f"unknown kind {kind!r}: expected FineTuneJob, Dataset or SyntheticDataset")
    return normalized


class _ExpireOnCollect:
    """A collector with no series of its own: it runs expiry when the registry is scraped."""

    def __init__(self, metrics: "OperatorMetrics") -> None:
        self._metrics = metrics

    def collect(self):
        self._metrics.expire()
        return []

    def describe(self):
        return []


class OperatorMetrics:
    """All operator series in one registry, plus the per-object bookkeeping that bounds them."""

    def __init__(self, registry: Optional[CollectorRegistry] = None,
                 retention_seconds: float = DEFAULT_RETENTION_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.retention_seconds = retention_seconds
        self._clock = clock
        self._lock = threading.RLock()
        # (kind, namespace, name) -> current phase; and finished jobs -> when they finished.
        self._phases: dict[tuple[str, str, str], str] = {}
        self._finished_at: dict[tuple[str, str, str], float] = {}
        self._gpu_hours_seen: dict[tuple[str, str], float] = {}
        r = self.registry
        # Registered first so that every scrape expires stale series before they are collected.
        r.register(_ExpireOnCollect(self))

        self.reconcile_duration = Histogram(
            "finetune_operator_reconcile_duration_seconds", "Time spent in one reconcile of an object.",
            ["kind"], buckets=RECONCILE_BUCKETS, registry=r)
        self.jobs = Gauge("finetune_operator_finetunejobs", "FineTuneJobs by current phase.",
                          ["phase"], registry=r)
        self.transitions = Counter(
            "finetune_operator_phase_transitions", "Phase changes observed by the operator.",
            ["kind", "from_phase", "to_phase"], registry=r)
        self.job_phase_info = Gauge(
            "finetune_operator_finetunejob_phase",
            "1 for the current phase of each live or recently finished FineTuneJob.",
            ["namespace", "name", "phase"], registry=r)
        self.datasets = Gauge("finetune_operator_datasets", "Datasets by current phase.", ["phase"], registry=r)
        self.synthetic = Gauge("finetune_operator_syntheticdatasets", "SyntheticDatasets by current phase.",
                               ["phase"], registry=r)
        self.synthetic_pending = Gauge(
            "finetune_operator_synthetic_review_pending", "Sampled synthetic examples waiting for a person's review.",
            ["namespace", "name"], registry=r)
        self.dataset_examples = Gauge(
            "finetune_operator_dataset_examples", "Examples in a Dataset after validation.",
            ["namespace", "name"], registry=r)
        self.governance_checks = Counter(
            "finetune_operator_governance_checks", "Governance check results.", ["check", "outcome"], registry=r)
        self.promotions = Counter(
            "finetune_operator_promotions", "Promotion decisions by outcome.", ["outcome"], registry=r)
        self.serving_publishes = Counter(
            "finetune_operator_serving_publishes", "Attempts to publish to serving targets, by target kind and outcome.",
            ["kind", "outcome"], registry=r)
        for kind in SERVING_KINDS:  # every series exists at 0, so rate() and alerts work from the start
            for outcome in SERVING_OUTCOMES:
                self.serving_publishes.labels(kind, outcome)
        self.governance_runs = Counter(
            "finetune_operator_governance_runs", "Governance runs started, by trigger (first run, policy change).",
            ["trigger"], registry=r)
        self.gpu_hours_by_job = Gauge(
            # Not "finetune_operator_gpu_hours": that family name belongs to the counter below
            # (OpenMetrics forbids a gauge and a counter sharing it).
            "finetune_operator_finetunejob_gpu_hours", "GPU-hours used by a FineTuneJob's trainer pods so far.",
            ["namespace", "name"], registry=r)
        self.gpu_hours_total = Counter(
            "finetune_operator_gpu_hours", "GPU-hours used by all trainer pods (sum of increments).", registry=r)
        self.final_eval_loss_by_job = Gauge(
            "finetune_operator_final_eval_loss", "Eval loss (nats per token) of a finished FineTuneJob's adapter.",
            ["namespace", "name"], registry=r)

        # Federations: no namespace/name/site labels. A site label would be bounded per federation
        # (spec.participants) but not across them: every team that federates adds series that stay.
        # Which site dropped out is in the Event and in status.rounds; here only how often.
        self._federation_phases: dict[tuple[str, str], str] = {}
        self.federations = Gauge("finetune_operator_federatedfinetunejobs", "FederatedFineTuneJobs by current phase.",
                                 ["phase"], registry=r)
        self.federated_rounds = Counter("finetune_operator_federated_rounds",
                                        "Federated rounds completed (aggregated), all federations.", registry=r)
        self.federated_round_seconds = Histogram(
            "finetune_operator_federated_round_seconds", "Wall time of one federated round (the server's clock).",
            buckets=ROUND_BUCKETS, registry=r)
        self.federated_dropouts = Counter(
            "finetune_operator_federated_site_dropouts",
            "Sites selected for a round that did not report (the round completed without them).", registry=r)
        for phase in FEDERATION_PHASES:
            self.federations.labels(phase).set(0)

        # Zero series for every known label value, so dashboards and alert expressions such as
        # finetune_operator_finetunejobs{phase="Failed"} > 0 evaluate to data, not to nothing.
        for phase in JOB_PHASES:
            self.jobs.labels(phase).set(0)
        for phase in DATASET_PHASES:
            self.datasets.labels(phase).set(0)
        for phase in SYNTHETIC_PHASES:
            self.synthetic.labels(phase).set(0)
        for outcome in PROMOTION_OUTCOMES:
            self.promotions.labels(outcome)
        for trigger in GOVERNANCE_RUN_TRIGGERS:
            self.governance_runs.labels(trigger)
        for check in ALL_CHECKS:
            for outcome in ("passed", "failed"):
                self.governance_checks.labels(check, outcome)
        for kind in ("FineTuneJob", "Dataset", "SyntheticDataset"):
            self.reconcile_duration.labels(kind)
        # Transitions into bad phases exist from the start: alerts use increase() on them, and
        # increase() cannot see the first sample of a series that appears already at 1.
        for phase in JOB_PHASES:
            if phase != "Failed":
                self.transitions.labels("FineTuneJob", phase, "Failed")
        for phase in ("Pending", "Validating"):
            for bad in ("Invalid", "Failed"):
                self.transitions.labels("Dataset", phase, bad)

    # --- reconcile latency -------------------------------------------------------------------

    @contextmanager
    def reconcile_timer(self, kind: str) -> Iterator[None]:
        """Time the body (also when it raises) into the reconcile-duration histogram."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.reconcile_duration.labels(kind).observe(time.perf_counter() - started)
            self.expire()

    # --- phases ------------------------------------------------------------------------------

    def _set_phase(self, kind: str, namespace: str, name: str, phase: str) -> Optional[str]:
        """Record the object's phase; return the previous one (None when first seen)."""
        key = (_kind(kind), namespace, name)
        aggregate = {"finetunejob": self.jobs, "dataset": self.datasets, "syntheticdataset": self.synthetic}[key[0]]
        previous = self._phases.get(key)
        if previous == phase:
            return previous
        if previous is not None:
            aggregate.labels(previous).dec()
            # Only changes this process saw count as transitions: after an operator restart the
            # first sighting of an existing object is not a transition.
            self.transitions.labels(kind, previous, phase).inc()
        aggregate.labels(phase).inc()
        self._phases[key] = phase
        return previous

    def job_phase(self, namespace: str, name: str, phase: str) -> None:
        with self._lock:
            previous = self._set_phase("FineTuneJob", namespace, name, phase)
            if previous == phase:
                return
            if previous is not None:
                self._remove(self.job_phase_info, namespace, name, previous)
            self.job_phase_info.labels(namespace, name, phase).set(1)
            key = ("finetunejob", namespace, name)
            if phase in JOB_FINISHED_PHASES:
                self._finished_at[key] = self._clock()
            else:
                self._finished_at.pop(key, None)
        self.expire()

    def dataset_phase(self, namespace: str, name: str, phase: str, examples: Optional[int] = None) -> None:
        with self._lock:
            self._set_phase("Dataset", namespace, name, phase)
            if examples is not None:
                self.dataset_examples.labels(namespace, name).set(examples)
        self.expire()

    def synthetic_phase(self, namespace: str, name: str, phase: str, pending: Optional[int] = None) -> None:
        with self._lock:
            self._set_phase("SyntheticDataset", namespace, name, phase)
            if pending is not None:
                self.synthetic_pending.labels(namespace, name).set(pending)
        self.expire()

    # --- governance and promotion ------------------------------------------------------------

    def governance_check(self, check: str, passed: bool) -> None:
        self.governance_checks.labels(check, "passed" if passed else "failed").inc()

    def governance_run(self, trigger: str) -> None:
        if trigger not in GOVERNANCE_RUN_TRIGGERS:
            raise ValueError(f"unknown governance run trigger {trigger!r}: expected one of {GOVERNANCE_RUN_TRIGGERS}")
        self.governance_runs.labels(trigger).inc()

    def serving_publish(self, kind: str, outcome: str) -> None:
        if kind not in SERVING_KINDS or outcome not in SERVING_OUTCOMES:
            raise ValueError(f"unknown serving publish {kind!r}/{outcome!r}")
        self.serving_publishes.labels(kind, outcome).inc()

    def promotion(self, outcome: str) -> None:
        if outcome not in PROMOTION_OUTCOMES:
            raise ValueError(f"unknown promotion outcome {outcome!r}: expected one of {PROMOTION_OUTCOMES}")
        self.promotions.labels(outcome).inc()

    # --- per-job usage and results -----------------------------------------------------------

    def gpu_hours(self, namespace: str, name: str, hours: float) -> None:
        """Set a job's cumulative GPU-hours; the cluster-wide counter grows by the increase."""
        with self._lock:
            previous = self._gpu_hours_seen.get((namespace, name), 0.0)
            if hours > previous:
                self.gpu_hours_total.inc(hours - previous)
                self._gpu_hours_seen[(namespace, name)] = hours
            self.gpu_hours_by_job.labels(namespace, name).set(hours)

    def final_eval_loss(self, namespace: str, name: str, value: float) -> None:
        self.final_eval_loss_by_job.labels(namespace, name).set(value)

    # --- federations -------------------------------------------------------------------------

    def federation_phase(self, namespace: str, name: str, phase: Optional[str]) -> None:
        """Record a federation's phase (None: it is gone)."""
        if phase is not None and phase not in FEDERATION_PHASES:
            raise ValueError(f"unknown federation phase {phase!r}")
        with self._lock:
            previous = self._federation_phases.pop((namespace, name), None)
            if previous is not None:
                self.federations.labels(previous).dec()
            if phase is not None:
                self.federations.labels(phase).inc()
                self._federation_phases[(namespace, name)] = phase

    def federated_round(self, seconds: Optional[float], dropouts: int) -> None:
        """One round newly seen aggregated, how long it took and how many selected sites missed it."""
        self.federated_rounds.inc()
        if seconds is not None and seconds >= 0:
            self.federated_round_seconds.observe(seconds)
        if dropouts:
            self.federated_dropouts.inc(dropouts)

    # --- bounding cardinality ----------------------------------------------------------------

    @staticmethod
    def _remove(metric, *labels: str) -> None:
        try:
            metric.remove(*labels)
        except KeyError:
            pass

    def _drop_job_series(self, namespace: str, name: str) -> None:
        for phase in JOB_PHASES:
            self._remove(self.job_phase_info, namespace, name, phase)
        self._remove(self.gpu_hours_by_job, namespace, name)
        self._remove(self.final_eval_loss_by_job, namespace, name)

    def forget(self, kind: str, namespace: str, name: str) -> None:
        """The object is gone: drop its per-object series and its share of the phase counts."""
        key = (_kind(kind), namespace, name)
        with self._lock:
            phase = self._phases.pop(key, None)
            if key[0] == "finetunejob":
                if phase is not None:
                    self.jobs.labels(phase).dec()
                self._finished_at.pop(key, None)
                self._gpu_hours_seen.pop((namespace, name), None)
                self._drop_job_series(namespace, name)
            elif key[0] == "syntheticdataset":
                if phase is not None:
                    self.synthetic.labels(phase).dec()
                self._remove(self.synthetic_pending, namespace, name)
            else:
                if phase is not None:
                    self.datasets.labels(phase).dec()
                self._remove(self.dataset_examples, namespace, name)

    def expire(self) -> None:
        """Drop per-object series of jobs that finished more than retention_seconds ago.

        The job still counts in finetune_operator_finetunejobs until it is deleted (forget).
        """
        now = self._clock()
        with self._lock:
            for key, finished in list(self._finished_at.items()):
                if now - finished >= self.retention_seconds:
                    del self._finished_at[key]
                    _, namespace, name = key
                    self._gpu_hours_seen.pop((namespace, name), None)
                    self._drop_job_series(namespace, name)

    def tracked_objects(self) -> int:
        """How many objects carry per-object series (for tests and debugging)."""
        with self._lock:
            return len(self._phases)


# The operator uses one process-wide instance through the module-level functions below; the Helm
# chart sets the retention through the environment.
DEFAULT = OperatorMetrics(retention_seconds=float(
    os.environ.get("FINETUNE_METRICS_RETENTION_SECONDS", DEFAULT_RETENTION_SECONDS)))
REGISTRY = DEFAULT.registry


def configure(retention_seconds: float) -> None:
    """Change how long finished jobs keep their per-object series."""
    DEFAULT.retention_seconds = retention_seconds


def start_server(port: int, addr: str = "0.0.0.0") -> None:
    """Serve /metrics on the port in a background thread."""
    start_http_server(port, addr=addr, registry=REGISTRY)


def reconcile_timer(kind: str):
    return DEFAULT.reconcile_timer(kind)


def job_phase(namespace: str, name: str, phase: str) -> None:
    DEFAULT.job_phase(namespace, name, phase)


def dataset_phase(namespace: str, name: str, phase: str, examples: Optional[int] = None) -> None:
    DEFAULT.dataset_phase(namespace, name, phase, examples)


def synthetic_phase(namespace: str, name: str, phase: str, pending: Optional[int] = None) -> None:
    DEFAULT.synthetic_phase(namespace, name, phase, pending)


def governance_check(check: str, passed: bool) -> None:
    DEFAULT.governance_check(check, passed)


def promotion(outcome: str) -> None:
    DEFAULT.promotion(outcome)


def serving_publish(kind: str, outcome: str) -> None:
    DEFAULT.serving_publish(kind, outcome)


def governance_run(trigger: str) -> None:
    DEFAULT.governance_run(trigger)


def gpu_hours(namespace: str, name: str, hours: float) -> None:
    DEFAULT.gpu_hours(namespace, name, hours)


def final_eval_loss(namespace: str, name: str, value: float) -> None:
    DEFAULT.final_eval_loss(namespace, name, value)


def federation_phase(namespace: str, name: str, phase: Optional[str]) -> None:
    DEFAULT.federation_phase(namespace, name, phase)


def federated_round(seconds: Optional[float], dropouts: int) -> None:
    DEFAULT.federated_round(seconds, dropouts)


def forget(kind: str, namespace: str, name: str) -> None:
    DEFAULT.forget(kind, namespace, name)


def expire() -> None:
    DEFAULT.expire()
