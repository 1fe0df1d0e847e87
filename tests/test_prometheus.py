"""Dashboard queries and alert rules against a real Prometheus that scrapes real endpoints.

Prometheus (Debian's package, installed by hack/install-prometheus.sh when missing) runs on a free
port and scrapes, every second, the operator's metrics endpoint and a real `finetune-trainer train`
subprocess' metrics endpoint. The operator's side is the metrics module driven through the sequence
of calls its handlers make for a successful, a failed, a governance-blocked and a queued job.
Then every query of the Grafana dashboard and every alert rule of the chart runs against it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import REPO, free_port, wait_for_port

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/trainer/helpers.py

CHART = REPO / "helm" / "finetune-operator"
DASHBOARD = REPO / "dashboards" / "finetune-operator.json"
OPERATOR_JOB = "finetune-operator-metrics"  # the job label the chart's ServiceMonitor gives (release name
TRAINER_JOB = "finetune-trainer"            # finetune-operator): the operator-down alert names it
NS = "team-a"
RATE_INTERVAL = "5s"  # what Grafana's $__rate_interval is for a 1 s scrape interval


# --- Prometheus ------------------------------------------------------------------------------


def prometheus_binaries() -> tuple[str, str]:
    if not (shutil.which("prometheus") and shutil.which("promtool")):
        result = subprocess.run(["bash", str(REPO / "hack" / "install-prometheus.sh")], capture_output=True,
                                text=True, timeout=600)
        if result.returncode != 0:
            pytest.skip(f"Prometheus is not installed and cannot be installed here: {result.stderr[-500:]}")
    return shutil.which("prometheus"), shutil.which("promtool")


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def api(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list:
        return self.api("query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float) -> list:
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step="1")["result"]

    def wait_ready(self, timeout: float = 60) -> None:
        """The port opens before the TSDB is loaded; /-/ready answers 200 only after that."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError("Prometheus did not become ready")

    def wait_for(self, expr: str, timeout: float = 60, what: str = "") -> list:
        deadline = time.time() + timeout
        while time.time() < deadline:
            result = self.query(expr)
            if result:
                return result
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what or expr}")


def chart_rules() -> dict:
    """The PrometheusRule the chart renders with default values, as a Prometheus rules file."""
    subprocess.run(["bash", str(REPO / "hack" / "get-helm.sh")], check=True, capture_output=True, timeout=300)
    out = subprocess.run([str(REPO / "hack" / "bin" / "helm"), "template", "finetune-operator", str(CHART),
                          "--show-only", "templates/prometheusrule.yaml"],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    return {"groups": yaml.safe_load(out)["spec"]["groups"]}


# --- the observed run ------------------------------------------------------------------------


def drive_job(m, name: str, phases: list[str]) -> None:
    """The calls the operator's FineTuneJob reconcile makes for each phase it writes."""
    for phase in phases:
        with m.reconcile_timer("FineTuneJob"):
            m.job_phase(NS, name, phase)


def start_trainer(tmp: Path, bucket: str, tiny_model_dir: Path, port: int) -> tuple[subprocess.Popen, str]:
    from trainer.helpers import trainer_command, trainer_config, upload_folder, write_config, write_dataset

    model_uri = f"s3://{bucket}/models/tiny"
    upload_folder(tiny_model_dir, model_uri)
    data_uri = write_dataset(f"s3://{bucket}/data/support", n_train=32, n_eval=8)
    output_uri = f"s3://{bucket}/out/support-bot"
    cfg = trainer_config(model_uri=model_uri, data_uri=data_uri, output_uri=output_uri, job="support-bot",
                         namespace=NS, metricsPort=port, training={"maxSteps": 10, "evalEverySteps": 3})
    config_path = write_config(cfg, tmp / "job.json")
    # Slow steps a little so that 1 s scrapes see the run progress.
    env = {**__import__("os").environ, "FINETUNE_DEBUG_STEP_SLEEP": "0.5"}
    proc = subprocess.Popen(trainer_command(config_path), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return proc, output_uri


@pytest.fixture(scope="module")
def observed(tmp_path_factory, s3_server, tiny_model_dir):
    from prometheus_client import start_http_server

    from finetune_operator.metrics import OperatorMetrics
    from finetune_trainer import storage

    prometheus, promtool = prometheus_binaries()
    tmp = tmp_path_factory.mktemp("prometheus")
    rules = chart_rules()
    rules_file = tmp / "rules.yml"
    rules_file.write_text(yaml.safe_dump(rules, sort_keys=False))
    checked = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True,
                             timeout=60)

    op_port, trainer_port, prom_port = free_port(), free_port(), free_port()
    (tmp / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules_file)],
        "scrape_configs": [
            {"job_name": OPERATOR_JOB, "static_configs": [{"targets": [f"127.0.0.1:{op_port}"]}]},
            # As the chart's PodMonitor: keep the trainer's namespace/job labels.
            {"job_name": TRAINER_JOB, "honor_labels": True,
             "static_configs": [{"targets": [f"127.0.0.1:{trainer_port}"]}]},
        ],
    }))
    m = OperatorMetrics()
    server, _ = start_http_server(op_port, addr="127.0.0.1", registry=m.registry)
    proc = subprocess.Popen([prometheus, f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}",
                             "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    trainer = None
    try:
        wait_for_port(prom_port, timeout=60)
        prom = Prometheus(f"http://127.0.0.1:{prom_port}")
        prom.wait_ready()
        start = time.time()
        prom.wait_for(f'up{{job="{OPERATOR_JOB}"}} == 1', timeout=60, what="the first operator scrape")

        bucket = f"prom-{uuid.uuid4().hex[:10]}"
        storage.s3_client().create_bucket(Bucket=bucket)
        # A Dataset validates; a bad one is Invalid; the job waits for its dataset, is queued, trains.
        with m.reconcile_timer("Dataset"):
            m.dataset_phase(NS, "support", "Pending")
        with m.reconcile_timer("Dataset"):
            m.dataset_phase(NS, "support", "Validating")
        with m.reconcile_timer("Dataset"):
            m.dataset_phase(NS, "support", "Ready", examples=40)
        for phase in ("Pending", "Validating", "Invalid"):
            with m.reconcile_timer("Dataset"):
                m.dataset_phase(NS, "bad-data", phase)
        drive_job(m, "support-bot", ["Pending", "WaitingForDataset", "Queued", "Training"])
        drive_job(m, "waiting", ["Pending", "Queued"])

        trainer, output_uri = start_trainer(tmp, bucket, tiny_model_dir, trainer_port)
        started = time.time()
        prom.wait_for('finetune_trainer_eval_loss{job="support-bot"}', timeout=240, what="trainer metrics")
        output, _ = trainer.communicate(timeout=240)
        assert trainer.returncode == 0, output[-3000:]
        result = json.loads(storage.read_text(f"{output_uri}/result.json"))

        # After training: evaluation, governance, promotion (as the handlers record them).
        drive_job(m, "support-bot", ["Evaluating"])
        m.final_eval_loss(NS, "support-bot", result["metrics"]["evalLoss"])
        m.gpu_hours(NS, "support-bot", (time.time() - started) / 3600)
        for check in ("evaluation", "bias", "provenance", "pii", "explainability"):
            m.governance_check(check, True)
        m.promotion("promoted")
        drive_job(m, "support-bot", ["Succeeded"])
        # A job whose trainer crashed, and one that governance blocked.
        drive_job(m, "broken", ["Pending", "Queued", "Training", "Failed"])
        drive_job(m, "risky", ["Pending", "Queued", "Training", "Evaluating"])
        m.governance_check("evaluation", True)
        m.governance_check("bias", False)
        m.promotion("blocked")
        drive_job(m, "risky", ["Failed"])

        prom.wait_for('ALERTS{alertname="FineTuneJobFailed", alertstate="firing"}', timeout=60)
        prom.wait_for('ALERTS{alertname="FineTuneGovernanceBlocked", alertstate="firing"}', timeout=60)
        prom.wait_for('finetune_operator_final_eval_loss{name="support-bot"}', timeout=30)
        time.sleep(3)  # a few more scrapes, so that 1 s range steps also see the last changes
        yield {"prom": prom, "start": start, "end": time.time(), "rules": rules, "promtool": checked,
               "result": result}
    finally:
        if trainer is not None and trainer.poll() is None:
            trainer.kill()
            trainer.wait(10)
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        server.shutdown()
        server.server_close()


# --- the queries ------------------------------------------------------------------------------


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of the dashboard, with Grafana's variables filled in
    as Grafana does for 'All' and a 1 s scrape interval."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    return exprs


def fill(expr: str, window: float) -> str:
    return (expr.replace("$namespace", ".*").replace("$job", ".*")
            .replace("$__rate_interval", RATE_INTERVAL).replace("$__range", f"{int(window) + 1}s"))


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads (ours, the trainer's and `up`)."""
    return set(re.findall(r"\b(finetune_(?:operator|trainer)_[a-z_]+|up)\b(?=\s*[{\[)])", expr))


def test_alert_rules_pass_promtool(observed):
    checked = observed["promtool"]
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 5 rules found" in checked.stdout


def test_both_endpoints_were_scraped(observed):
    prom, start, end = observed["prom"], observed["start"], observed["end"]
    assert prom.query(f'up{{job="{OPERATOR_JOB}"}}')[0]["value"][1] == "1"
    trainer_up = prom.query_range(f'up{{job="{TRAINER_JOB}"}} == 1', start, end)
    assert trainer_up and len(trainer_up[0]["values"]) >= 3, "the trainer was scraped fewer than 3 times"
    # honor_labels kept the trainer's own labels: job is the FineTuneJob's name.
    steps = prom.query_range("max_over_time(finetune_trainer_step[10m])", start, end)
    assert steps[0]["metric"]["job"] == "support-bot" and steps[0]["metric"]["namespace"] == NS
    # The run was seen in progress (the last step may finish between two scrapes).
    seen = sorted({float(v) for _, v in steps[0]["values"]})
    assert len(seen) >= 2 and 0 < seen[-1] <= 10, seen
    (total,) = prom.query_range("max_over_time(finetune_trainer_total_steps[10m])", start, end)
    assert float(total["values"][-1][1]) == 10


@pytest.mark.parametrize("title,expr", dashboard_exprs())
def test_every_dashboard_query_returns_data(observed, title, expr):
    prom, start, end = observed["prom"], observed["start"], time.time()
    result = prom.query_range(fill(expr, end - start), start, end)
    assert result, f"panel {title!r}: no data for {expr}"
    assert metric_names(expr), expr


def test_dashboard_variables_have_values(observed):
    prom, start, end = observed["prom"], observed["start"], time.time()
    for variable in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        if variable["type"] != "query":
            continue
        metric, label = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["definition"]).groups()
        result = prom.query_range(f"group by ({label}) ({fill(metric, 0)})", start, end)
        values = {r["metric"].get(label) for r in result}
        assert NS in values or "support-bot" in values, (variable["name"], values)


def alert_rules() -> list[dict]:
    return [r for g in chart_rules()["groups"] for r in g["rules"]]


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_every_alert_rule_evaluates_over_existing_series(observed, rule):
    prom, start, end = observed["prom"], observed["start"], time.time()
    prom.query_range(rule["expr"], start, end)  # evaluates without error (status success)
    names = metric_names(rule["expr"])
    assert names, rule["expr"]
    for name in names:
        selector = f'up{{job="{OPERATOR_JOB}"}}' if name == "up" else name
        assert prom.query_range(selector, start, end), f"{rule['alert']}: no series {name}"
    loaded = {r["name"]: r for g in prom.api("rules")["groups"] for r in g["rules"]}
    assert loaded[rule["alert"]]["health"] == "ok", loaded[rule["alert"]].get("lastError")


def test_bad_states_fire_their_alerts_and_good_ones_stay_quiet(observed):
    prom = observed["prom"]
    states = {a["labels"]["alertname"]: a["state"] for a in prom.api("alerts")["alerts"]}
    assert states.get("FineTuneJobFailed") == "firing"
    assert states.get("FineTuneGovernanceBlocked") == "firing"
    # These have a `for:` longer than the test: they are pending, with the right labels.
    assert states.get("FineTuneDatasetInvalid") == "pending"
    queued = [a for a in prom.api("alerts")["alerts"] if a["labels"]["alertname"] == "FineTuneJobQueuedTooLong"]
    assert [(a["labels"]["namespace"], a["labels"]["name"], a["state"]) for a in queued] == \
        [(NS, "waiting", "pending")]
    assert "FineTuneOperatorDown" not in states


def test_final_eval_loss_is_the_trainers(observed):
    prom = observed["prom"]
    (series,) = prom.query('finetune_operator_final_eval_loss{name="support-bot"}')
    assert float(series["value"][1]) == pytest.approx(observed["result"]["metrics"]["evalLoss"])
    # The trainer's own eval loss was scraped during the run (its last value may fall between scrapes).
    (seen,) = prom.query_range('finetune_trainer_eval_loss{job="support-bot"}', observed["start"], observed["end"])
    assert 0 < float(seen["values"][-1][1]) < 20

