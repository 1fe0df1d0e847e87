#!/usr/bin/env python3
"""Write dashboards/finetune-operator.json, the Grafana dashboard, from the panel list below.

    python hack/gen-dashboard.py          # regenerate the JSON
    hack/sync-chart.sh                    # regenerate and copy it (and crds/) into the chart

Queries take the max over operator replicas for gauges: with Kopf peering only the active replica
updates them, a standby may still hold stale values. tests/test_prometheus.py runs every query
below against a real Prometheus.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "dashboards" / "finetune-operator.json"

DS = {"type": "prometheus", "uid": "${datasource}"}
JOBS = 'namespace=~"$namespace", job=~"$job"'  # trainer series: job = the FineTuneJob's name
OBJS = 'namespace=~"$namespace"'


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False, fmt: str = "time_series") -> dict:
    t = {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto", "refId": ref, "format": fmt}
    if instant:
        t["instant"], t["range"] = True, False
    return t


def panel(kind: str, title: str, description: str, targets: list[dict], unit: str = "short",
          w: int = 8, h: int = 8, **options) -> dict:
    p = {"type": kind, "title": title, "description": description, "datasource": DS,
         "targets": [dict(t, refId=chr(ord("A") + i)) for i, t in enumerate(targets)],
         "fieldConfig": {"defaults": {"unit": unit}, "overrides": []}, "options": options,
         "gridPos": {"w": w, "h": h}}
    return p


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "gridPos": {"w": 24, "h": 1}}


PANELS = [
    row("Overview"),
    panel("bargauge", "FineTuneJobs by phase", "Current number of FineTuneJobs in each phase.",
          [target("max by (phase) (finetune_operator_finetunejobs)", "{{phase}}", instant=True)],
          w=8, orientation="horizontal", displayMode="basic"),
    panel("bargauge", "Datasets by phase", "Current number of Datasets in each phase.",
          [target("max by (phase) (finetune_operator_datasets)", "{{phase}}", instant=True)],
          w=8, orientation="horizontal", displayMode="basic"),
    panel("timeseries", "Phase transitions", "Phase changes per kind and target phase.",
          [target("sum by (kind, to_phase) (increase(finetune_operator_phase_transitions_total[$__rate_interval]))",
                  "{{kind}} → {{to_phase}}")], w=8),
    panel("table", "Live and recently finished FineTuneJobs", "Current phase of each FineTuneJob with "
          "per-job series (live jobs and jobs finished within the metrics retention).",
          [target(f"max by (namespace, name, phase) (finetune_operator_finetunejob_phase{{{OBJS}}})",
                  instant=True, fmt="table")], w=24, h=7),

    row("Training"),
    panel("timeseries", "Training loss", "Latest training loss reported by each trainer.",
          [target(f"max by (namespace, job) (finetune_trainer_loss{{{JOBS}}})", "{{namespace}}/{{job}}")], w=12),
    panel("timeseries", "Eval loss", "Latest eval loss on the held-out split, per job.",
          [target(f"max by (namespace, job) (finetune_trainer_eval_loss{{{JOBS}}})", "{{namespace}}/{{job}}")],
          w=12),
    panel("timeseries", "Tokens per second", "Real (non-padding) training tokens per second.",
          [target(f"max by (namespace, job) (finetune_trainer_tokens_per_second{{{JOBS}}})",
                  "{{namespace}}/{{job}}")], w=8),
    panel("timeseries", "Accelerator memory", "Peak accelerator memory of each trainer (peak RSS on CPU).",
          [target(f"max by (namespace, job) (finetune_trainer_accelerator_memory_bytes{{{JOBS}}})",
                  "{{namespace}}/{{job}}")], unit="bytes", w=8),
    panel("timeseries", "Learning rate", "Current learning rate of each trainer.",
          [target(f"max by (namespace, job) (finetune_trainer_learning_rate{{{JOBS}}})", "{{namespace}}/{{job}}")],
          w=8),
    panel("bargauge", "Progress", "Optimizer steps done over steps planned.",
          [target(f"max by (namespace, job) (finetune_trainer_step{{{JOBS}}}) / "
                  f"max by (namespace, job) (finetune_trainer_total_steps{{{JOBS}}})",
                  "{{namespace}}/{{job}}", instant=True)], unit="percentunit", w=8,
          orientation="horizontal", displayMode="gradient"),
    panel("stat", "ETA", "Steps left divided by the recent step rate.",
          [target(f"(max by (namespace, job) (finetune_trainer_total_steps{{{JOBS}}}) - "
                  f"max by (namespace, job) (finetune_trainer_step{{{JOBS}}})) / "
                  # "> 0": a stalled run has no ETA rather than an infinite one.
                  f"(max by (namespace, job) (rate(finetune_trainer_step{{{JOBS}}}[$__rate_interval])) > 0)",
                  "{{namespace}}/{{job}}", instant=True)], unit="s", w=8),
    panel("timeseries", "Epoch", "Epochs done (fractional).",
          [target(f"max by (namespace, job) (finetune_trainer_epoch{{{JOBS}}})", "{{namespace}}/{{job}}")], w=8),
    panel("timeseries", "Tokens processed", "Training tokens processed per second, from the counter.",
          [target(f"sum by (namespace, job) (rate(finetune_trainer_tokens_total{{{JOBS}}}[$__rate_interval]))",
                  "{{namespace}}/{{job}}")], w=12),
    panel("table", "Final eval loss", "Eval loss of each recently finished FineTuneJob's adapter.",
          [target(f"max by (namespace, name) (finetune_operator_final_eval_loss{{{OBJS}}})",
                  instant=True, fmt="table")], w=12),

    row("Governance and promotion"),
    panel("bargauge", "Governance checks", "Check results by check and outcome over the dashboard's range.",
          [target("sum by (check, outcome) (increase(finetune_operator_governance_checks_total[$__range]))",
                  "{{check}} {{outcome}}", instant=True)], w=8, orientation="horizontal", displayMode="basic"),
    panel("stat", "Promotions", "Promotion decisions by outcome over the dashboard's range.",
          [target("sum by (outcome) (increase(finetune_operator_promotions_total[$__range]))",
                  "{{outcome}}", instant=True)], w=8),
    panel("bargauge", "Serving publishes", "Publishing to serving targets (vLLM, KServe, OCI) by kind and outcome "
          "over the dashboard's range.",
          [target("sum by (kind, outcome) (increase(finetune_operator_serving_publishes_total[$__range]))",
                  "{{kind}} {{outcome}}", instant=True)], w=8, orientation="horizontal", displayMode="basic"),
    panel("stat", "GPU-hours", "GPU-hours used by trainer pods over the dashboard's range.",
          [target("sum(increase(finetune_operator_gpu_hours_total[$__range]))", "GPU-hours", instant=True)],
          unit="h", w=8),
    panel("table", "GPU-hours per job", "GPU-hours of live and recently finished FineTuneJobs.",
          [target(f"max by (namespace, name) (finetune_operator_finetunejob_gpu_hours{{{OBJS}}})",
                  instant=True, fmt="table")], unit="h", w=24, h=6),

    row("Federations"),
    panel("bargauge", "FederatedFineTuneJobs by phase", "Current number of FederatedFineTuneJobs in each phase.",
          [target("max by (phase) (finetune_operator_federatedfinetunejobs)", "{{phase}}", instant=True)],
          w=8, orientation="horizontal", displayMode="basic"),
    panel("timeseries", "Federated rounds and site dropouts", "Rounds aggregated, and selected sites that did "
          "not report (the round completed without them), all federations; which site is in the SiteDropout Event.",
          [target("sum(increase(finetune_operator_federated_rounds_total[$__rate_interval]))", "rounds"),
           target("sum(increase(finetune_operator_federated_site_dropouts_total[$__rate_interval]))", "dropouts",
                  ref="B")], w=8),
    panel("timeseries", "Federated round time", "p50 / p95 wall time of one federated round.",
          [target(f"histogram_quantile({q}, sum by (le) "
                  f"(rate(finetune_operator_federated_round_seconds_bucket[$__rate_interval])))",
                  f"p{int(q * 100)}", ref=chr(65 + i)) for i, q in enumerate((0.5, 0.95))], unit="s", w=8),

    row("Datasets"),
    panel("table", "Dataset examples", "Examples in each Dataset after validation.",
          [target(f"max by (namespace, name) (finetune_operator_dataset_examples{{{OBJS}}})",
                  instant=True, fmt="table")], w=24, h=6),

    row("Operator"),
    panel("timeseries", "Reconcile latency", "p50 / p95 / p99 time of one reconcile, per kind.",
          [target(f"histogram_quantile({q}, sum by (le, kind) "
                  f"(rate(finetune_operator_reconcile_duration_seconds_bucket[$__rate_interval])))",
                  f"p{int(q * 100)} {{{{kind}}}}") for q in (0.5, 0.95, 0.99)], unit="s", w=12),
    panel("timeseries", "Reconciles per second", "Reconciles per second, per kind.",
          [target("sum by (kind) (rate(finetune_operator_reconcile_duration_seconds_count[$__rate_interval]))",
                  "{{kind}}")], unit="ops", w=6),
    panel("stat", "Operator replicas up", "Operator replicas Prometheus scrapes successfully.",
          [target('sum(up{job=~".*finetune-operator.*metrics"})', "up", instant=True)], w=6),
]


def layout(panels: list[dict]) -> list[dict]:
    """Give panels ids and place them left to right, wrapping at Grafana's 24 columns."""
    x = y = row_h = 0
    for pid, p in enumerate(panels, start=1):
        p["id"] = pid
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if x + w > 24 or p["type"] == "row":
            x, y, row_h = 0, y + row_h, 0
        p["gridPos"].update(x=x, y=y)
        x, row_h = x + w, max(row_h, h)
        if p["type"] == "row":
            x, y, row_h = 0, y + h, 0
    return panels


def dashboard() -> dict:
    variables = [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0},
        {"name": "namespace", "label": "Namespace", "type": "query", "datasource": DS,
         "query": {"query": "label_values(finetune_operator_finetunejob_phase, namespace)", "refId": "ns"},
         "definition": "label_values(finetune_operator_finetunejob_phase, namespace)",
         "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "current": {}, "hide": 0},
        {"name": "job", "label": "FineTuneJob", "type": "query", "datasource": DS,
         "query": {"query": 'label_values(finetune_trainer_step{namespace=~"$namespace"}, job)', "refId": "job"},
         "definition": 'label_values(finetune_trainer_step{namespace=~"$namespace"}, job)',
         "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "current": {}, "hide": 0},
    ]
    return {
        "uid": "finetune-operator",
        "title": "finetune-operator",
        "description": "Fine-tuning jobs, training curves, governance and the operator itself.",
        "tags": ["finetune", "llm", "kopf"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "browser",
        "graphTooltip": 1,
        "templating": {"list": variables},
        "annotations": {"list": []},
        "panels": layout(PANELS),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(REPO)}", file=sys.stderr)
