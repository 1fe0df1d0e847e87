"""Dashboard queries and alert rules against a real Prometheus that scrapes the real operator.

Prometheus (Debian's package, installed by hack/install-prometheus.sh when missing) runs on a free
port and scrapes, every second, the metrics endpoint of the real operator (run in-process against
the emulated API server with the fake kubelet, as in tests/operator/) and the metrics endpoint of
the real `finetune-trainer train` pod the operator starts. The operator handles a FineTuneJob
that trains and is promoted, one that governance blocks, one whose trainer fails, one that stays
Queued (unschedulable) and an Invalid Dataset. Then every query of the Grafana dashboard and every
alert rule of the chart runs against what Prometheus collected, and the chart's RBAC is checked
against every API request the operator made.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
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

from testutil import REPO, free_port, wait_for_port

CHART = REPO / "helm" / "finetune-operator"
DASHBOARD = REPO / "dashboards" / "finetune-operator.json"
OPERATOR_JOB = "finetune-operator-metrics"  # the job label the chart's ServiceMonitor gives (release name
TRAINER_JOB = "finetune-trainer"            # finetune-operator): the operator-down alert names it
NS = "default"
RATE_INTERVAL = "5s"  # what Grafana's $__rate_interval is for a 1 s scrape interval
# In a cluster every trainer pod has its own IP and serves on port 9400. Here all pods share
# 127.0.0.1, so the trainer pod's command is wrapped to serve on a free port instead: the wrapper
# rewrites metricsPort in the pod's job.json and execs the real trainer.
PORT_WRAPPER = """
import json, os, sys
source, port = sys.argv[1], int(sys.argv[2])
config = json.load(open(source))
config["metricsPort"] = port
json.dump(config, open("job-local.json", "w"))
os.execv(sys.executable, [sys.executable, "-m", "finetune_trainer.cli", "train", "--config", "job-local.json"])
"""


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


def operator_harness():
    """tests/operator/conftest.py (emulator, fake kubelet, manifests), loaded under its own name."""
    spec = importlib.util.spec_from_file_location("operator_e2e_harness", REPO / "tests" / "operator" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def environment(values: dict):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def observed(tmp_path_factory, s3_server, tiny_model_dir):
    from finetune_trainer import storage

    prometheus, promtool = prometheus_binaries()
    harness = operator_harness()
    from kube_emulator import Cluster  # on sys.path through the harness
    from kubelet import FakeKubelet
    from trainer.helpers import upload_folder

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
    bucket = f"prom-{uuid.uuid4().hex[:10]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    model_uri = f"s3://{bucket}/models/tiny"
    upload_folder(tiny_model_dir, model_uri)

    with contextlib.ExitStack() as stack:
        proc = subprocess.Popen([prometheus, f"--config.file={tmp / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack.callback(proc.wait, 20)
        stack.callback(proc.terminate)
        # A fresh metrics registry for this operator run: earlier tests in the same process (the
        # operator e2e tests) have fed the module's default one.
        from finetune_operator import metrics

        fresh = metrics.OperatorMetrics()
        patch = pytest.MonkeyPatch()
        stack.callback(patch.undo)
        patch.setattr(metrics, "DEFAULT", fresh)
        patch.setattr(metrics, "REGISTRY", fresh.registry)
        cluster = Cluster()
        stack.callback(cluster.close)
        stack.enter_context(environment({
            "KUBECONFIG": str(cluster.write_kubeconfig(tmp / "kubeconfig")),
            "FINETUNE_METRICS_PORT": str(op_port),  # the operator serves its own metrics
            "FINETUNE_ARTIFACT_STORE": f"s3://{bucket}/store",
            "FINETUNE_S3_ENDPOINT": s3_server,
            "FINETUNE_S3_CREDENTIALS_SECRET": harness.SECRET,
            "FINETUNE_TRAINER_IMAGE": "finetune-trainer:test",
            "FINETUNE_DEFAULT_GOVERNANCE": json.dumps({"required": []}),
            # Slow steps a little so that 1 s scrapes see the run progress.
            "FINETUNE_JOB_ENV": json.dumps({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                            "FINETUNE_DEBUG_STEP_SLEEP": "0.4"}),
        }))
        cluster.secret(harness.SECRET, {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
        # Governance Jobs run in the operator's namespace, with the platform's S3 Secret.
        cluster.secret(harness.SECRET, {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
                       namespace=harness.OPERATOR_NAMESPACE)
        kubelet = FakeKubelet(cluster.url, tmp / "pods").start()
        stack.callback(kubelet.stop)
        kubelet.declare("support-bot-train", command=[sys.executable, "-c", PORT_WRAPPER,
                                                      "/etc/finetune/job.json", str(trainer_port)])
        # A second trainer must not take the first one's port: it serves no metrics.
        kubelet.declare("risky-train", command=[sys.executable, "-c", PORT_WRAPPER, "/etc/finetune/job.json", "0"])
        kubelet.declare("broken-train", command=[sys.executable, "-c", "raise SystemExit(3)"])  # config error
        kubelet.declare("waiting-train", unschedulable="0/3 nodes are available: 3 Insufficient nvidia.com/gpu")

        wait_for_port(prom_port, timeout=60)
        prom = Prometheus(f"http://127.0.0.1:{prom_port}")
        prom.wait_ready()
        start = time.time()
        stack.enter_context(harness.running_operator())
        prom.wait_for(f'up{{job="{OPERATOR_JOB}"}} == 1', timeout=60, what="the first operator scrape")

        source = harness.write_raw_dataset(bucket, n=40)
        output = f"s3://{bucket}/runs/support-bot"
        cluster.create(harness.dataset_manifest("support", source))
        cluster.create(harness.dataset_manifest("too-small", harness.write_raw_dataset(bucket, 3, "raw/small.jsonl"),
                                                min_examples=10))
        cluster.create(harness.finetunejob_manifest("support-bot", "support", model_uri, output,
                                                    training={"maxSteps": 10, "evalEverySteps": 3},
                                                    # A GPU job (the fake kubelet runs it on CPU) so that
                                                    # the operator accounts GPU-hours.
                                                    resources={"gpusPerNode": 1, "cpu": "1", "memory": "2Gi"}))
        # Governance blocks this one: its own policy (tighten-only) wants a 99% lower eval loss.
        cluster.create(harness.finetunejob_manifest(
            "risky", "support", model_uri, f"s3://{bucket}/runs/risky", training={"maxSteps": 2},
            governance={"required": ["evaluation"], "evaluation": {"minRelativeImprovement": 0.99}}))
        cluster.create(harness.finetunejob_manifest("broken", "support", model_uri, f"s3://{bucket}/runs/broken"))
        cluster.create(harness.finetunejob_manifest("waiting", "support", model_uri, f"s3://{bucket}/runs/waiting"))

        def phase(name, kind="finetunejobs"):
            return harness.phase(cluster, name, kind)

        wanted = {("datasets", "too-small"): {"Invalid"}, ("finetunejobs", "broken"): {"Failed"},
                  ("finetunejobs", "waiting"): {"Queued"}, ("finetunejobs", "support-bot"): {"Succeeded", "Failed"},
                  ("finetunejobs", "risky"): {"Succeeded", "Failed"}}
        seen: dict = {}

        def all_there() -> bool:
            seen.update({key: phase(key[1], key[0]) for key in wanted})
            return all(seen[key] in phases for key, phases in wanted.items())

        deadline = time.time() + 200
        while not all_there():
            assert time.time() < deadline, (f"phases after 200 s: {seen}\n{kubelet.log('support')[-3000:]}\n"
                                            f"{kubelet.log('too-small')[-2000:]}")
            time.sleep(0.5)
        done = cluster.ftj("support-bot")
        assert done["status"]["phase"] == "Succeeded", (done["status"], kubelet.log("support-bot-"))
        result = json.loads(storage.read_text(f"{output}/result.json"))

        risky = cluster.ftj("risky")["status"]
        assert (risky.get("promotion") or {}).get("state") == "Blocked", (risky, kubelet.log("risky-"))
        prom.wait_for('ALERTS{alertname="FineTuneJobFailed", alertstate="firing"}', timeout=60)
        prom.wait_for('ALERTS{alertname="FineTuneGovernanceBlocked", alertstate="firing"}', timeout=60)
        prom.wait_for('finetune_operator_final_eval_loss{name="support-bot"}', timeout=30)
        time.sleep(3)  # a few more scrapes, so that 1 s range steps also see the last changes
        yield {"prom": prom, "start": start, "end": time.time(), "rules": rules, "promtool": checked,
               "result": result, "status": done["status"],
               # Every request the API server saw; the operator's carry the kubeconfig's token.
               "requests": [r for r in list(cluster.emulator._requests)
                            if r.headers.get("Authorization") == "Bearer test-token"]}


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


def test_alert_rules_fire_after_their_for_durations():
    """`promtool test rules` on synthetic series: what the real-time run cannot wait for (for: 1h)."""
    _, promtool = prometheus_binaries()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"alert-tests-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    (tmp / "rules.yml").write_text(yaml.safe_dump(chart_rules(), sort_keys=False))
    failed = 'finetune_operator_phase_transitions_total{kind="FineTuneJob",from_phase="Training",to_phase="Failed"}'
    blocked = 'finetune_operator_promotions_total{outcome="blocked"}'

    def alerts(name: str, at: str, *expected: dict) -> dict:
        return {"alertname": name, "eval_time": at, "exp_alerts": list(expected)}

    tests = {"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [
            {"series": f'up{{job="{OPERATOR_JOB}"}}', "values": "1x10 0x20"},
            {"series": f'finetune_operator_finetunejob_phase{{namespace="{NS}",name="stuck",phase="Queued"}}',
             "values": "1x90"},
            {"series": 'finetune_operator_datasets{phase="Invalid"}', "values": "0x5 1x30"},
            {"series": failed, "values": "0x5 1x40"},
            {"series": blocked, "values": "0x40"},
            # A target failing every 2 minutes from minute 5, then fixed at minute 25.
            {"series": 'finetune_operator_serving_publishes_total{kind="kserve",outcome="failed"}',
             "values": "0x5 1 1 2 2 3 3 4 4 5 5 6 6 7 7 8 8 9 9 10 10 10x30"},
        ],
        "alert_rule_test": [
            alerts("FineTuneOperatorDown", "14m"),  # down since 11m: still inside for: 5m
            alerts("FineTuneOperatorDown", "17m", {
                "exp_labels": {"severity": "critical"},
                "exp_annotations": {
                    "summary": "The finetune-operator is down",
                    "description": f"No replica of {OPERATOR_JOB} has been scraped successfully for 5m: "
                                   "Datasets and FineTuneJobs are not reconciled."}}),
            alerts("FineTuneJobQueuedTooLong", "59m"),
            alerts("FineTuneJobQueuedTooLong", "61m", {
                "exp_labels": {"severity": "warning", "namespace": NS, "name": "stuck"},
                "exp_annotations": {
                    "summary": "A FineTuneJob waits in the queue",
                    "description": f"FineTuneJob {NS}/stuck has been Queued for more than 1h: check GPU quota "
                                   "(Kueue) and node capacity."}}),
            alerts("FineTuneDatasetInvalid", "12m"),
            alerts("FineTuneDatasetInvalid", "17m", {
                "exp_labels": {"severity": "warning"},
                "exp_annotations": {
                    "summary": "A Dataset failed validation",
                    "description": "1 Dataset(s) are Invalid; jobs that use them cannot start. "
                                   "See kubectl get datasets -A."}}),
            alerts("FineTuneJobFailed", "4m"),
            alerts("FineTuneJobFailed", "8m", {
                "exp_labels": {"severity": "warning"},
                "exp_annotations": {
                    "summary": "A FineTuneJob failed",
                    "description": "1 FineTuneJob(s) moved to Failed in the last 15 minutes. See kubectl get "
                                   "finetunejobs -A and the Failed condition."}}),
            alerts("FineTuneJobFailed", "30m"),  # the failure left the 15 minute window
            alerts("FineTuneGovernanceBlocked", "30m"),  # no promotion blocked
            alerts("FineTuneServingPublishFailing", "12m"),  # failing since 6m: inside for: 10m
            alerts("FineTuneServingPublishFailing", "18m", {
                "exp_labels": {"severity": "warning", "kind": "kserve"},
                "exp_annotations": {
                    "summary": "A promoted adapter does not reach a serving target",
                    "description": "Publishing to kserve targets keeps failing (retried with backoff). See "
                                   "status.promotion.targets and the Published condition of the FineTuneJobs."}}),
            alerts("FineTuneServingPublishFailing", "50m"),  # fixed at 25m: the 15 minute window is clean
        ],
    }]}
    (tmp / "tests.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run([promtool, "test", "rules", "tests.yml"], cwd=tmp, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    shutil.rmtree(tmp, ignore_errors=True)


def test_alert_rules_pass_promtool(observed):
    checked = observed["promtool"]
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 6 rules found" in checked.stdout


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
    alerts = prom.api("alerts")["alerts"]
    states = {a["labels"]["alertname"]: a["state"] for a in alerts}
    assert states.get("FineTuneJobFailed") == "firing"
    assert states.get("FineTuneGovernanceBlocked") == "firing"
    # These have a `for:` longer than the test: they are pending, with the right labels.
    assert states.get("FineTuneDatasetInvalid") == "pending"
    queued = [a for a in alerts if a["labels"]["alertname"] == "FineTuneJobQueuedTooLong"]
    assert [(a["labels"]["namespace"], a["labels"]["name"], a["state"]) for a in queued] == \
        [(NS, "waiting", "pending")]
    assert "FineTuneOperatorDown" not in states  # the operator is up


def test_operator_metrics_match_the_cluster(observed):
    prom, status = observed["prom"], observed["status"]
    (loss,) = prom.query('finetune_operator_final_eval_loss{name="support-bot"}')
    assert float(loss["value"][1]) == pytest.approx(observed["result"]["metrics"]["evalLoss"], rel=1e-4)
    phases = {r["metric"]["phase"]: float(r["value"][1]) for r in prom.query("finetune_operator_finetunejobs")}
    assert phases["Succeeded"] + phases["Failed"] == 3 and phases["Failed"] >= 1 and phases["Queued"] == 1
    datasets = {r["metric"]["phase"]: float(r["value"][1]) for r in prom.query("finetune_operator_datasets")}
    assert datasets["Ready"] == 1 and datasets["Invalid"] == 1
    promotions = {r["metric"]["outcome"]: float(r["value"][1]) for r in prom.query("finetune_operator_promotions_total")}
    assert promotions == {"promoted": 1, "blocked": 1, "awaiting_approval": 0}
    (failed_evaluation,) = prom.query('finetune_operator_governance_checks_total{check="evaluation",outcome="failed"}')
    assert float(failed_evaluation["value"][1]) == 1
    assert status["promotion"]["state"] == "Promoted"
    # The trainer's own eval loss was scraped during the run (its last value may fall between scrapes).
    (seen,) = prom.query_range('finetune_trainer_eval_loss{job="support-bot"}', observed["start"], observed["end"])
    assert 0 < float(seen["values"][-1][1]) < 20


def rbac_request(method: str, path: str, params) -> tuple[str, str, str] | None:
    """(API group, resource[/subresource], verb) of an API request; None for discovery requests."""
    parts = path.strip("/").split("/")
    if parts[0] == "api" and len(parts) > 2:
        group, rest = "", parts[2:]
    elif parts[0] == "apis" and len(parts) > 3:
        group, rest = parts[1], parts[3:]
    else:
        return None  # /api, /apis, /apis/<group>/<version>: discovery, open to every account
    if len(rest) >= 3 and rest[0] == "namespaces":
        rest = rest[2:]
    if not rest:
        return None
    resource = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
    named = len(rest) > 1
    verb = {"POST": "create", "PUT": "update", "PATCH": "patch",
            "DELETE": "delete" if named else "deletecollection"}.get(method)
    if method == "GET":
        verb = "get" if named else ("watch" if params.get("watch") in ("true", "1") else "list")
    return group, resource, verb


def request_scope(path: str) -> tuple[str | None, str | None]:
    """(namespace, object name) of an API request path."""
    parts = path.strip("/").split("/")
    rest = parts[2:] if parts[0] == "api" else parts[3:]
    namespace = rest[1] if len(rest) >= 2 and rest[0] == "namespaces" else None
    rest = rest[2:] if namespace else rest
    return namespace, rest[1] if len(rest) > 1 else None


def test_chart_rbac_allows_every_request_the_operator_made(observed):
    """The ClusterRole the chart renders, plus the Role in the operator's own namespace (governance
    Jobs, the signing Secret by name), covers each API call of the real operator run (and the run did
    exercise the operator: jobs, configmaps, status, events, the signing key)."""
    out = subprocess.run([str(REPO / "hack" / "bin" / "helm"), "template", "finetune-operator", str(CHART),
                          "--namespace", "finetune-system", "--show-only", "templates/rbac.yaml"], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    docs = [doc for doc in yaml.safe_load_all(out) if doc]
    cluster_rules = [r for doc in docs if doc["kind"] == "ClusterRole" for r in doc["rules"]]
    role_rules = {}
    for doc in docs:
        if doc["kind"] == "Role":
            role_rules.setdefault(doc["metadata"]["namespace"], []).extend(doc["rules"])
    made = set()
    for request in observed["requests"]:
        parsed = rbac_request(request.method, request.url.path, request.params)
        if parsed:
            made.add((*parsed, *request_scope(request.url.path)))
    assert {("batch", "jobs", "create"), ("", "configmaps", "create"), ("", "events", "create"),
            ("finetune.dev", "finetunejobs/status", "patch"), ("finetune.dev", "datasets", "watch"),
            ("", "secrets", "get")} <= {m[:3] for m in made}, made

    def allowed(group, resource, verb, namespace, name) -> bool:
        rules = cluster_rules + role_rules.get(namespace, [])
        return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
                   and (not r.get("resourceNames") or name in r["resourceNames"]) for r in rules)

    denied = sorted(m for m in made if not allowed(*m))
    assert not denied, f"the chart's RBAC would forbid: {denied}"
