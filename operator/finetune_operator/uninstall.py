"""`finetune-operator release-finalizers`: let FineTuneJobs (and so their namespaces) be deleted
once the operator is gone.

A FineTuneJob that has started training carries our finalizer (FINALIZER: its checkpoints are
deleted before it goes) and, while it trains, Kopf's (KOPF_FINALIZER: the progress timer). Only a
running operator removes them, so `helm uninstall` followed by `kubectl delete namespace` would
leave the namespace Terminating forever. The chart runs this command in a `pre-delete` hook Job:

1. stop the operator (scale its Deployment to 0 and wait for its pods to go), so that it cannot
   put a finalizer back on a job it still sees training;
2. for every FineTuneJob in the watched namespaces that carries one of our finalizers: do the
   cleanup the finalizer guards -- delete the checkpoints when spec.output.checkpointsOnDelete is
   Delete and the job is being deleted (or, with --delete-all-checkpoints, also when it is not) --
   then remove both finalizers with a JSON patch whose `test` ops make it apply only to the list
   that was read (a concurrent change is re-read and tried again);
3. release the FederatedFineTuneJobs' finalizer, after deleting the site objects (by label, in the
   participants' namespaces) of those being deleted;
4. delete what the operator made outside any owner's reach: the Job NetworkPolicy
   (`finetune-job-pods`) in each watched namespace and the governance Jobs in its own namespace.

Storage trouble never blocks the release: the operator is going away, nobody would retry later,
and a namespace stuck in Terminating is worse than a checkpoint folder left behind; the command
names every folder it could not delete so that someone can delete it by hand.

Idempotent (a second run finds nothing to do) and safe while an operator still runs: both sides
remove finalizers with guarded patches, so neither removes what the other changed, and the
operator's own deletion of checkpoints is the same delete of the same prefix. The decisions are
plain functions (`release_patch`, `checkpoints_to_delete`, `plan`), tested without a cluster.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from finetune_trainer import storage

from .api.meta import GROUP, VERSION
from .handlers import FINALIZER, KOPF_FINALIZER

#: The finalizers this command releases; any other finalizer (another controller's) is left alone.
OURS = (FINALIZER, KOPF_FINALIZER)
PLURAL = "finetunejobs"


@dataclass(frozen=True)
class Release:
    """What to do for one FineTuneJob."""

    namespace: str
    name: str
    #: The checkpoints folder to delete first, or None.
    checkpoints: Optional[str]
    #: The JSON patch removing our finalizers.
    patch: list[dict]
    #: Why checkpoints are kept or cannot be deleted (for the report), or "".
    note: str = ""


def release_patch(finalizers: Iterable[str], ours: tuple[str, ...] = OURS) -> Optional[list[dict]]:
    """A JSON patch (RFC 6902) removing our finalizers from metadata.finalizers, or None when the
    list holds none. Each removal is preceded by a `test` of the value at its index, so the patch
    fails (422) instead of removing someone else's finalizer when the list changed since it was
    read. Removals go from the highest index down, so earlier removals do not shift later ones."""
    current = list(finalizers)
    indices = [i for i, f in enumerate(current) if f in ours]
    if not indices:
        return None
    tests = [{"op": "test", "path": f"/metadata/finalizers/{i}", "value": current[i]} for i in indices]
    removes = [{"op": "remove", "path": f"/metadata/finalizers/{i}"} for i in reversed(indices)]
    return tests + removes


def checkpoints_to_delete(ftj: dict, delete_all: bool = False) -> tuple[Optional[str], str]:
    """(the checkpoints folder to delete or None, a note on why not). The same rule as the
    operator's finalizer: only with our finalizer present and checkpointsOnDelete Delete (the
    default); and only for a job being deleted unless delete_all (a job nobody deletes keeps its
    checkpoints: it may be resumed by a reinstalled operator)."""
    meta = ftj.get("metadata") or {}
    if FINALIZER not in (meta.get("finalizers") or []):
        return None, ""
    output = (ftj.get("spec") or {}).get("output") or {}
    if not isinstance(output, dict):
        return None, "checkpoints not deleted: spec.output is not an object"
    if output.get("checkpointsOnDelete", "Delete") != "Delete":
        return None, f"checkpoints kept: spec.output.checkpointsOnDelete is {output.get('checkpointsOnDelete')}"
    if not meta.get("deletionTimestamp") and not delete_all:
        return None, "checkpoints kept: the FineTuneJob is not being deleted"
    uri = output.get("uri")
    if not isinstance(uri, str) or not uri:
        return None, "checkpoints not deleted: spec.output.uri is missing"
    try:
        return storage.join(uri, "checkpoints"), ""
    except Exception as exc:  # a hostile or malformed URI: say which field, release anyway
        return None, f"checkpoints not deleted: spec.output.uri: {exc}"


def plan(ftjs: Iterable[dict], delete_all: bool = False) -> list[Release]:
    """The releases for a list of FineTuneJobs: those carrying at least one of our finalizers."""
    out = []
    for ftj in ftjs:
        meta = ftj.get("metadata") or {}
        patch = release_patch(meta.get("finalizers") or [])
        if patch is None:
            continue
        checkpoints, note = checkpoints_to_delete(ftj, delete_all)
        out.append(Release(meta.get("namespace") or "", meta.get("name") or "", checkpoints, patch, note))
    return out


# --- talking to the cluster ------------------------------------------------------------------


def _api_client():
    """In a pod: the ServiceAccount (KUBERNETES_SERVICE_HOST/PORT and the mounted token);
    elsewhere: the kubeconfig, as kubectl would."""
    import kubernetes

    if os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(
            "/var/run/secrets/kubernetes.io/serviceaccount/token"):
        kubernetes.config.load_incluster_config()
        return kubernetes.client.ApiClient()
    return kubernetes.config.new_client_from_config()


def stop_deployment(api_client: Any, namespace: str, name: str, timeout: float, say: Callable[[str], None]) -> bool:
    """Scale the operator's Deployment to 0 and wait (bounded) until its pods are gone.
    True when none is left; a missing Deployment counts as stopped."""
    import kubernetes

    apps = kubernetes.client.AppsV1Api(api_client)
    core = kubernetes.client.CoreV1Api(api_client)
    try:
        scale = apps.patch_namespaced_deployment_scale(name, namespace, {"spec": {"replicas": 0}},
                                                       _content_type="application/merge-patch+json")
    except kubernetes.client.ApiException as exc:
        if exc.status == 404:
            say(f"Deployment {namespace}/{name} not found: no operator to stop")
            return True
        raise
    selector = (scale.status.selector if scale.status else None) or ""
    say(f"scaled Deployment {namespace}/{name} to 0; waiting for its pods to stop")
    deadline = time.monotonic() + timeout
    while True:
        pods = core.list_namespaced_pod(namespace, label_selector=selector).items if selector else []
        if not pods:
            return True
        if time.monotonic() >= deadline:
            say(f"warning: {len(pods)} operator pod(s) still running after {timeout:.0f}s; releasing anyway")
            return False
        time.sleep(1)


def _list(api_client: Any, namespaces: tuple[str, ...]) -> list[dict]:
    import kubernetes

    custom = kubernetes.client.CustomObjectsApi(api_client)
    items: list[dict] = []
    for ns in namespaces or (None,):  # None: every namespace
        try:
            items += (custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL) if ns else
                      custom.list_cluster_custom_object(GROUP, VERSION, PLURAL))["items"]
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:  # 404: the namespace (or the CRD) is gone: nothing to release there
                raise
    return items


def _delete_checkpoints(uri: str, attempts: int, say: Callable[[str], None]) -> bool:
    delay = 1.0
    for attempt in range(1, attempts + 1):
        try:
            storage.delete_prefix(uri)
            return True
        except Exception as exc:  # storage trouble: say so (the type and message name no secret)
            if attempt == attempts:
                say(f"warning: cannot delete checkpoints under {uri} ({type(exc).__name__}: {exc}); "
                    "releasing anyway: delete them by hand")
                return False
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
    return False


def release(api_client: Any, namespaces: tuple[str, ...], delete_all: bool = False, attempts: int = 1,
            say: Callable[[str], None] = print) -> dict[str, int]:
    """Release every FineTuneJob carrying our finalizers; counts of what happened. A patch whose
    `test` fails (the object changed meanwhile) is re-planned from a fresh read, a few times.
    One delete attempt per folder by default: the S3 client already retries (FINETUNE_S3_MAX_ATTEMPTS)."""
    import kubernetes

    custom = kubernetes.client.CustomObjectsApi(api_client)
    counts = {"released": 0, "checkpointsDeleted": 0, "checkpointsLeft": 0, "gone": 0}
    done_checkpoints: set[str] = set()
    pending = plan(_list(api_client, namespaces), delete_all)
    for _round in range(5):
        retry: list[tuple[str, str]] = []
        for item in pending:
            where = f"FineTuneJob {item.namespace}/{item.name}"
            if item.checkpoints and item.checkpoints not in done_checkpoints:
                if _delete_checkpoints(item.checkpoints, attempts, say):
                    counts["checkpointsDeleted"] += 1
                    say(f"{where}: deleted checkpoints under {item.checkpoints}")
                else:
                    counts["checkpointsLeft"] += 1
                done_checkpoints.add(item.checkpoints)
            try:
                custom.patch_namespaced_custom_object(GROUP, VERSION, item.namespace, PLURAL, item.name, item.patch,
                                                      _content_type="application/json-patch+json")
            except kubernetes.client.ApiException as exc:
                if exc.status == 404:
                    counts["gone"] += 1
                    continue
                if exc.status in (409, 422):  # the finalizer list changed since it was read
                    retry.append((item.namespace, item.name))
                    continue
                raise
            counts["released"] += 1
            say(f"{where}: released finalizers" + (f" ({item.note})" if item.note else ""))
        if not retry:
            return counts
        fresh = []
        for ns, name in retry:
            try:
                fresh.append(custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name))
            except kubernetes.client.ApiException as exc:
                if exc.status != 404:
                    raise
                counts["gone"] += 1
        pending = plan(fresh, delete_all)
        time.sleep(0.5)
    raise RuntimeError(f"finalizers keep changing on {len(pending)} FineTuneJob(s) "
                       f"({', '.join(f'{r.namespace}/{r.name}' for r in pending)}): is an operator still running?")


# --- FederatedFineTuneJobs ------------------------------------------------------------------------

FEDERATIONS = "federatedfinetunejobs"


@dataclass(frozen=True)
class FederationRelease:
    namespace: str
    name: str
    patch: list[dict]
    #: (namespace, label selector) of its site objects to delete first: only for a federation being
    #: deleted (one that stays keeps its sites: a reinstalled operator takes it up again).
    sites: tuple[tuple[str, str], ...]


def plan_federations(items: Iterable[dict]) -> list[FederationRelease]:
    """The releases of the FederatedFineTuneJobs that carry the federation finalizer."""
    from . import federation

    out = []
    for item in items:
        meta = item.get("metadata") or {}
        patch = release_patch(meta.get("finalizers") or [], (federation.FINALIZER,))
        if patch is None:
            continue
        ns, name = meta.get("namespace") or "", meta.get("name") or ""
        sites: tuple[tuple[str, str], ...] = ()
        if meta.get("deletionTimestamp"):
            participants = (item.get("spec") or {}).get("participants") or []
            where = dict.fromkeys(p.get("namespace") for p in participants if isinstance(p, dict))
            sites = tuple((s, federation.site_selector(ns, name)) for s in where if isinstance(s, str) and s)
        out.append(FederationRelease(ns, name, patch, sites))
    return out


def release_federations(api_client: Any, namespaces: tuple[str, ...], say: Callable[[str], None] = print) -> int:
    """Delete the site objects of federations being deleted, then release every federation's
    finalizer (one attempt: a changed list is an operator still running, which releases it itself)."""
    import kubernetes

    custom = kubernetes.client.CustomObjectsApi(api_client)
    released = 0
    items: list[dict] = []
    for ns in namespaces or (None,):
        try:
            items += (custom.list_namespaced_custom_object(GROUP, VERSION, ns, FEDERATIONS) if ns else
                      custom.list_cluster_custom_object(GROUP, VERSION, FEDERATIONS))["items"]
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:  # 404: no such CRD (an older install) or namespace
                raise
    core, batch = kubernetes.client.CoreV1Api(api_client), kubernetes.client.BatchV1Api(api_client)
    net = kubernetes.client.NetworkingV1Api(api_client)
    kinds = ((batch.list_namespaced_job, batch.delete_namespaced_job),
             (core.list_namespaced_config_map, core.delete_namespaced_config_map),
             (net.list_namespaced_network_policy, net.delete_namespaced_network_policy),
             (core.list_namespaced_service_account, core.delete_namespaced_service_account))
    for item in plan_federations(items):
        for site_ns, selector in item.sites:
            for list_, delete in kinds:
                try:
                    for obj in list_(site_ns, label_selector=selector).items:
                        delete(obj.metadata.name, site_ns, propagation_policy="Background")
                except kubernetes.client.ApiException as exc:
                    if exc.status == 404:
                        continue
                    if exc.status == 403:  # a participant namespace the hook may not touch: say so, go on
                        say(f"warning: FederatedFineTuneJob {item.namespace}/{item.name}: cannot delete its "
                            f"site objects in {site_ns} ({exc.status}); delete `-l {selector}` there by hand")
                        break
                    raise
        try:
            custom.patch_namespaced_custom_object(GROUP, VERSION, item.namespace, FEDERATIONS, item.name, item.patch,
                                                  _content_type="application/json-patch+json")
        except kubernetes.client.ApiException as exc:
            if exc.status in (404, 409, 422):
                continue
            raise
        released += 1
        say(f"FederatedFineTuneJob {item.namespace}/{item.name}: released its finalizer"
            + (f" (deleted its site objects in {', '.join(n for n, _ in item.sites)})" if item.sites else ""))
    return released


def remove_operator_objects(api_client: Any, namespaces: tuple[str, ...], operator_namespace: str,
                            say: Callable[[str], None] = print) -> dict[str, int]:
    """Delete the Job NetworkPolicies (by name and our label; in `namespaces`, all when empty) and the
    governance Jobs in the operator's namespace. Neither has an owner that garbage collection follows."""
    import kubernetes

    from . import children

    net = kubernetes.client.NetworkingV1Api(api_client)
    batch = kubernetes.client.BatchV1Api(api_client)
    ours = f"{children.MANAGED_BY}={children.OPERATOR}"
    by_name = f"metadata.name={children.JOB_NETWORK_POLICY}"
    counts = {"networkPolicies": 0, "governanceJobs": 0}
    if namespaces:
        policies = [p for ns in dict.fromkeys((*namespaces, operator_namespace))  # governance pods' too
                    for p in net.list_namespaced_network_policy(ns, label_selector=ours, field_selector=by_name).items]
    else:
        policies = net.list_network_policy_for_all_namespaces(label_selector=ours, field_selector=by_name).items
    for policy in policies:
        try:
            net.delete_namespaced_network_policy(policy.metadata.name, policy.metadata.namespace)
            counts["networkPolicies"] += 1
            say(f"deleted NetworkPolicy {policy.metadata.namespace}/{policy.metadata.name}")
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:
                raise
    jobs = batch.list_namespaced_job(operator_namespace, label_selector=f"{ours},{children.ROLE}=governance").items
    for job in jobs:
        try:
            batch.delete_namespaced_job(job.metadata.name, operator_namespace, propagation_policy="Background")
            counts["governanceJobs"] += 1
            say(f"deleted governance Job {operator_namespace}/{job.metadata.name}")
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:
                raise
    return counts


def main(namespaces: Optional[tuple[str, ...]], stop: Optional[str], stop_timeout: float, delete_all: bool,
         say: Callable[[str], None] = print) -> int:
    """The command: namespaces default to the operator's configuration (FINETUNE_CONFIG), as the
    chart's hook Job mounts it; `stop` is NAMESPACE/NAME of the operator's Deployment."""
    import kubernetes
    import urllib3

    from . import config as config_mod

    try:
        return _main(config_mod.load(), namespaces, stop, stop_timeout, delete_all, say)
    except kubernetes.client.ApiException as exc:  # e.g. 403: the hook's RBAC; no traceback, the API's own words
        say(f"error: the Kubernetes API answered {exc.status} {exc.reason}: {_message(exc)}")
    except (ValueError, OSError, kubernetes.config.ConfigException, urllib3.exceptions.HTTPError) as exc:
        # configuration, or the API server unreachable
        say(f"error: {type(exc).__name__}: {exc}")
    except RuntimeError as exc:
        say(f"error: {exc}")
    return 1


def _message(exc: Any) -> str:
    import json

    try:
        return json.loads(exc.body).get("message") or str(exc.body)
    except (TypeError, ValueError, AttributeError):
        return str(exc.body)[:500]


def _main(cfg: Any, namespaces: Optional[tuple[str, ...]], stop: Optional[str], stop_timeout: float,
          delete_all: bool, say: Callable[[str], None]) -> int:
    if cfg.s3_endpoint:  # the operator's own storage settings (handlers.configure does the same)
        os.environ.setdefault("AWS_ENDPOINT_URL", cfg.s3_endpoint)
    os.environ.setdefault("AWS_DEFAULT_REGION", cfg.s3_region)
    storage.reset_client()
    watched = cfg.namespaces if namespaces is None else namespaces
    stop_ns, _, stop_name = (stop or "").partition("/")
    if stop and (not stop_ns or not stop_name):
        say(f"error: --stop-deployment: expected NAMESPACE/NAME, got {stop!r}")
        return 2
    api_client = _api_client()
    if stop:
        stop_deployment(api_client, stop_ns, stop_name, stop_timeout, say)
    counts = release(api_client, tuple(watched), delete_all, say=say)
    scope = ", ".join(watched) if watched else "all namespaces"
    say(f"released {counts['released']} FineTuneJob(s) in {scope}; checkpoints deleted: "
        f"{counts['checkpointsDeleted']}, left behind: {counts['checkpointsLeft']}")
    federations = release_federations(api_client, tuple(watched), say)
    say(f"released {federations} FederatedFineTuneJob(s)")
    removed = remove_operator_objects(api_client, tuple(watched), cfg.namespace, say)
    say(f"deleted {removed['networkPolicies']} Job NetworkPolicy(ies) and {removed['governanceJobs']} "
        "governance Job(s)")
    return 0
