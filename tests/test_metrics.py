"""Operator metrics: phase bookkeeping, transitions, bounded cardinality, forget, HTTP exposition."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from testutil import free_port
from finetune_operator import metrics
from finetune_operator.metrics import JOB_PHASES, OperatorMetrics


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture()
def m(clock) -> OperatorMetrics:
    return OperatorMetrics(retention_seconds=3600, clock=clock)


def value(m: OperatorMetrics, metric: str, **labels) -> float | None:
    return m.registry.get_sample_value(metric, labels)


def series_with_label(m: OperatorMetrics, label: str) -> set[tuple[str, tuple]]:
    """Every sample that carries the label, as (sample name, sorted labels)."""
    found = set()
    for family in m.registry.collect():
        for sample in family.samples:
            if label in sample.labels:
                found.add((sample.name, tuple(sorted(sample.labels.items()))))
    return found


def test_every_job_phase_has_a_series_before_any_job_exists(m):
    for phase in JOB_PHASES:
        assert value(m, "finetune_operator_finetunejobs", phase=phase) == 0
    # Alert expressions over these series must evaluate to data, not to nothing.
    assert value(m, "finetune_operator_promotions_total", outcome="blocked") == 0
    assert value(m, "finetune_operator_governance_runs_total", trigger="policy_change") == 0
    assert value(m, "finetune_operator_governance_checks_total", check="bias", outcome="failed") == 0


def test_jobs_counted_by_current_phase_and_transitions_counted(m):
    m.job_phase("team-a", "j1", "Pending")
    m.job_phase("team-a", "j2", "Pending")
    m.job_phase("team-a", "j1", "Queued")
    m.job_phase("team-a", "j1", "Queued")  # a repeated reconcile is not a transition
    m.job_phase("team-a", "j1", "Training")

    assert value(m, "finetune_operator_finetunejobs", phase="Pending") == 1
    assert value(m, "finetune_operator_finetunejobs", phase="Training") == 1
    assert value(m, "finetune_operator_finetunejobs", phase="Queued") == 0
    name = "finetune_operator_phase_transitions_total"
    assert value(m, name, kind="FineTuneJob", from_phase="Pending", to_phase="Queued") == 1
    assert value(m, name, kind="FineTuneJob", from_phase="Queued", to_phase="Training") == 1
    assert value(m, name, kind="FineTuneJob", from_phase="Queued", to_phase="Queued") is None
    # Exactly one info series per job, for its current phase.
    assert value(m, "finetune_operator_finetunejob_phase", namespace="team-a", name="j1", phase="Training") == 1
    assert value(m, "finetune_operator_finetunejob_phase", namespace="team-a", name="j1", phase="Queued") is None


def test_first_sighting_after_restart_is_not_a_transition(m):
    m.job_phase("team-a", "old", "Succeeded")
    assert value(m, "finetune_operator_finetunejobs", phase="Succeeded") == 1
    counted = [s for f in m.registry.collect() for s in f.samples
               if s.name == "finetune_operator_phase_transitions_total" and s.value]
    assert counted == []


def test_transitions_into_bad_phases_exist_at_zero_for_alerts(m):
    name = "finetune_operator_phase_transitions_total"
    assert value(m, name, kind="FineTuneJob", from_phase="Training", to_phase="Failed") == 0
    assert value(m, name, kind="Dataset", from_phase="Validating", to_phase="Invalid") == 0
    m.job_phase("team-a", "j", "Training")
    m.job_phase("team-a", "j", "Failed")
    assert value(m, name, kind="FineTuneJob", from_phase="Training", to_phase="Failed") == 1


def test_datasets_by_phase_and_examples(m):
    m.dataset_phase("team-a", "chat", "Validating")
    m.dataset_phase("team-a", "chat", "Ready", examples=1200)
    m.dataset_phase("team-a", "bad", "Invalid")

    assert value(m, "finetune_operator_datasets", phase="Ready") == 1
    assert value(m, "finetune_operator_datasets", phase="Invalid") == 1
    assert value(m, "finetune_operator_datasets", phase="Validating") == 0
    assert value(m, "finetune_operator_dataset_examples", namespace="team-a", name="chat") == 1200
    assert value(m, "finetune_operator_phase_transitions_total",
                 kind="Dataset", from_phase="Validating", to_phase="Ready") == 1


def test_governance_promotion_gpu_hours_and_eval_loss(m):
    m.governance_check("evaluation", True)
    m.governance_check("bias", False)
    m.governance_check("bias", False)
    m.promotion("blocked")
    m.governance_run("first")
    m.governance_run("policy_change")
    m.gpu_hours("team-a", "j1", 0.25)
    m.gpu_hours("team-a", "j1", 0.75)
    m.gpu_hours("team-a", "j1", 0.75)  # the same cumulative value again adds nothing
    m.gpu_hours("team-a", "j2", 1.0)
    m.final_eval_loss("team-a", "j1", 1.5)

    assert value(m, "finetune_operator_governance_checks_total", check="evaluation", outcome="passed") == 1
    assert value(m, "finetune_operator_governance_checks_total", check="bias", outcome="failed") == 2
    assert value(m, "finetune_operator_promotions_total", outcome="blocked") == 1
    assert value(m, "finetune_operator_governance_runs_total", trigger="policy_change") == 1
    with pytest.raises(ValueError):
        m.governance_run("whim")
    assert value(m, "finetune_operator_finetunejob_gpu_hours", namespace="team-a", name="j1") == 0.75
    assert value(m, "finetune_operator_gpu_hours_total") == pytest.approx(1.75)
    assert value(m, "finetune_operator_final_eval_loss", namespace="team-a", name="j1") == 1.5
    with pytest.raises(ValueError):
        m.promotion("maybe")


def test_reconcile_timer_observes_also_when_the_body_raises(m):
    with m.reconcile_timer("FineTuneJob"):
        pass
    with pytest.raises(RuntimeError):
        with m.reconcile_timer("FineTuneJob"):
            raise RuntimeError("boom")
    assert value(m, "finetune_operator_reconcile_duration_seconds_count", kind="FineTuneJob") == 2
    assert value(m, "finetune_operator_reconcile_duration_seconds_sum", kind="FineTuneJob") >= 0


def test_forget_drops_per_object_series_and_phase_counts(m):
    m.job_phase("team-a", "j1", "Training")
    m.gpu_hours("team-a", "j1", 0.5)
    m.final_eval_loss("team-a", "j1", 2.0)
    m.dataset_phase("team-a", "d1", "Ready", examples=10)

    m.forget("FineTuneJob", "team-a", "j1")
    m.forget("datasets", "team-a", "d1")

    assert series_with_label(m, "namespace") == set()
    assert value(m, "finetune_operator_finetunejobs", phase="Training") == 0
    assert value(m, "finetune_operator_datasets", phase="Ready") == 0
    # Counters are history: forgetting an object never lowers them.
    assert value(m, "finetune_operator_gpu_hours_total") == 0.5
    m.forget("FineTuneJob", "team-a", "never-seen")  # harmless
    with pytest.raises(ValueError):
        m.forget("Pod", "team-a", "x")


def test_finished_jobs_lose_per_object_series_after_retention(m, clock):
    m.job_phase("team-a", "done", "Training")
    m.gpu_hours("team-a", "done", 1.0)
    m.job_phase("team-a", "done", "Succeeded")
    m.final_eval_loss("team-a", "done", 1.1)
    m.job_phase("team-a", "running", "Training")

    clock.now += 3599
    m.expire()
    assert value(m, "finetune_operator_final_eval_loss", namespace="team-a", name="done") == 1.1

    clock.now += 2
    # Scraping alone expires: the registry runs expiry before collecting.
    names = {name for name, _ in series_with_label(m, "namespace")}
    labelled = {dict(labels)["name"] for _, labels in series_with_label(m, "namespace")}
    assert labelled == {"running"}
    assert "finetune_operator_final_eval_loss" not in names
    # The finished job is still a Succeeded job until it is deleted.
    assert value(m, "finetune_operator_finetunejobs", phase="Succeeded") == 1


def test_a_restarted_job_is_live_again_and_does_not_expire(m, clock):
    m.job_phase("team-a", "j", "Failed")
    m.job_phase("team-a", "j", "Queued")  # e.g. the user retried it
    clock.now += 10 * 3600
    m.expire()
    assert value(m, "finetune_operator_finetunejob_phase", namespace="team-a", name="j", phase="Queued") == 1


def test_cardinality_is_bounded_by_live_and_recent_jobs(m, clock):
    # Many jobs come and go over a long time; only the live one and the recent ones keep labels.
    for i in range(200):
        name = f"job-{i}"
        m.job_phase("team-a", name, "Pending")
        m.job_phase("team-a", name, "Training")
        m.gpu_hours("team-a", name, 0.1)
        m.job_phase("team-a", name, "Succeeded" if i % 3 else "Failed")
        m.final_eval_loss("team-a", name, 1.0)
        clock.now += 600  # one job finishes every 10 minutes
    m.job_phase("team-a", "live", "Training")

    jobs_with_series = {dict(labels)["name"] for _, labels in series_with_label(m, "name")}
    # Retention 1 h / one job per 10 min -> at most 6 finished jobs plus the live one.
    assert "live" in jobs_with_series
    assert len(jobs_with_series) <= 7
    assert value(m, "finetune_operator_finetunejobs", phase="Succeeded") + \
        value(m, "finetune_operator_finetunejobs", phase="Failed") == 200


def test_module_functions_are_served_over_http():
    port = free_port()
    metrics.start_server(port, addr="127.0.0.1")
    metrics.job_phase("http-ns", "http-job", "Queued")
    metrics.dataset_phase("http-ns", "http-ds", "Ready", examples=3)
    with metrics.reconcile_timer("Dataset"):
        pass

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(body)}
    info = families["finetune_operator_finetunejob_phase"].samples
    assert any(s.labels == {"namespace": "http-ns", "name": "http-job", "phase": "Queued"} and s.value == 1
               for s in info)
    examples = families["finetune_operator_dataset_examples"].samples
    assert any(s.labels == {"namespace": "http-ns", "name": "http-ds"} and s.value == 3 for s in examples)
    assert "finetune_operator_reconcile_duration_seconds" in families
    metrics.forget("FineTuneJob", "http-ns", "http-job")
    metrics.forget("Dataset", "http-ns", "http-ds")


def test_serving_publishes_count_by_kind_and_outcome_from_zero(m):
    assert value(m, "finetune_operator_serving_publishes_total", kind="oci", outcome="failed") == 0
    m.serving_publish("kserve", "failed")
    m.serving_publish("kserve", "published")
    assert value(m, "finetune_operator_serving_publishes_total", kind="kserve", outcome="failed") == 1
    assert value(m, "finetune_operator_serving_publishes_total", kind="kserve", outcome="published") == 1
    with pytest.raises(ValueError, match="unknown serving publish"):
        m.serving_publish("triton", "published")
