"""Cluster commands: talk to the Kubernetes API with the `kubernetes` client and a kubeconfig.

The operator does the work on a cluster; these functions only create/update objects,
read their status, read pod logs and record approvals.
"""

from __future__ import annotations

import copy
import json
from typing import Iterator, Optional

from ..api import GROUP, VERSION, KINDS
from .errors import EXIT_USAGE, FtctlError
from .manifests import check, describe

_BY_KIND = {k.KIND: k for k in KINDS}


def api_error_message(exc: Exception) -> str:
    """The API server's own message (a Status object), without the HTTP dump."""
    body = getattr(exc, "body", None)
    try:
        data = json.loads(body) if body else {}
    except (TypeError, ValueError):
        data = {}
    message = data.get("message") if isinstance(data, dict) else None
    reason = getattr(exc, "reason", None) or ""
    return f"{getattr(exc, 'status', '?')} {reason}: {message or body or exc}".strip()


def merge_patch(old: dict, new: dict) -> dict:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`: removed keys become null."""
    patch: dict = {key: None for key in old if key not in new}
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            sub = merge_patch(old[key], value)
            if sub:
                patch[key] = sub
        elif old.get(key, object()) != value:
            patch[key] = value
    return patch


class Cluster:
    """One kubeconfig context: its API client, namespace and user."""

    def __init__(self, kubeconfig: Optional[str] = None, context: Optional[str] = None,
                 namespace: Optional[str] = None):
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException

        try:
            contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
            if context:
                active = next((c for c in contexts if c["name"] == context), None)
                if active is None:
                    raise FtctlError(f"context {context!r} is not in the kubeconfig", EXIT_USAGE)
            self.api_client = config.new_client_from_config(config_file=kubeconfig, context=active["name"])
        except ConfigException as exc:
            raise FtctlError(f"cannot load the kubeconfig: {exc}", EXIT_USAGE) from None
        ctx = (active or {}).get("context") or {}
        self.namespace = namespace or ctx.get("namespace") or "default"
        #: The kubeconfig user of the context: who approves when --by is not given.
        self.user: Optional[str] = ctx.get("user")
        self.custom = client.CustomObjectsApi(self.api_client)
        self.core = client.CoreV1Api(self.api_client)

    # --- objects ------------------------------------------------------------------------------
    def _call(self, fn, *args, what: str, **kwargs):
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            if exc.status == 404:
                raise FtctlError(f"{what}: not found in namespace {self.namespace}") from None
            raise FtctlError(f"{what}: {api_error_message(exc)}") from None
        except HTTPError as exc:
            raise FtctlError(f"{what}: cannot reach the Kubernetes API: {exc}") from None

    def get(self, kind: str, name: str, namespace: Optional[str] = None) -> dict:
        res = _BY_KIND[kind]
        if res.SCOPE == "Cluster":
            return self._call(self.custom.get_cluster_custom_object, GROUP, VERSION, res.PLURAL, name,
                              what=f"{kind} {name}")
        return self._call(self.custom.get_namespaced_custom_object, GROUP, VERSION,
                          namespace or self.namespace, res.PLURAL, name, what=f"{kind} {name}")

    def find(self, kind: str, name: str, namespace: Optional[str] = None) -> Optional[dict]:
        try:
            return self.get(kind, name, namespace)
        except FtctlError as exc:
            if "not found" in str(exc):
                return None
            raise

    def list(self, kind: str) -> list[dict]:
        res = _BY_KIND[kind]
        if res.SCOPE == "Cluster":
            out = self._call(self.custom.list_cluster_custom_object, GROUP, VERSION, res.PLURAL, what=res.PLURAL)
        else:
            out = self._call(self.custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace,
                             res.PLURAL, what=res.PLURAL)
        items = [i for i in out.get("items", [])
                 if res.SCOPE == "Cluster" or (i.get("metadata") or {}).get("namespace") in (None, self.namespace)]
        return sorted(items, key=lambda i: i["metadata"]["name"])

    def apply(self, manifest: dict, source: str) -> str:
        """Create, or merge-patch an existing object's spec (checked against it first, like the
        API server's transition rules). Returns "created", "configured" or "unchanged"."""
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        res = _BY_KIND[kind]
        namespaced = res.SCOPE != "Cluster"
        namespace = (manifest["metadata"].get("namespace") or self.namespace) if namespaced else None
        body = copy.deepcopy(manifest)
        body.pop("status", None)
        if namespaced:
            body["metadata"]["namespace"] = namespace
        existing = self.find(kind, name, namespace)
        what = describe(manifest)
        if existing is None:
            if namespaced:
                self._call(self.custom.create_namespaced_custom_object, GROUP, VERSION, namespace, res.PLURAL,
                           body, what=what)
            else:
                self._call(self.custom.create_cluster_custom_object, GROUP, VERSION, res.PLURAL, body, what=what)
            return "created"
        check(body, source, old={k: v for k, v in existing.items() if k != "status"})
        if existing.get("spec") == body.get("spec") and all(
                (existing["metadata"].get(k) or {}) == (body["metadata"].get(k) or {}) for k in ("labels", "annotations")):
            return "unchanged"
        patch: dict = {"spec": merge_patch(existing.get("spec") or {}, body["spec"])}
        meta_patch = {k: merge_patch(existing["metadata"].get(k) or {}, body["metadata"][k])
                      for k in ("labels", "annotations") if k in body["metadata"]}
        if existing["metadata"].get("resourceVersion"):
            # A precondition: a concurrent change makes this a conflict instead of being overwritten.
            meta_patch["resourceVersion"] = existing["metadata"]["resourceVersion"]
        if meta_patch:
            patch["metadata"] = meta_patch
        if namespaced:
            self._call(self.custom.patch_namespaced_custom_object, GROUP, VERSION, namespace, res.PLURAL, name,
                       patch, what=what)
        else:
            self._call(self.custom.patch_cluster_custom_object, GROUP, VERSION, res.PLURAL, name, patch, what=what)
        return "configured"

    def approve(self, name: str, digest: str, approved_by: Optional[str]) -> dict:
        """Record an approval of the adapter `digest` in spec.promotion.approval."""
        job = self.get("FineTuneJob", name)
        approval = {"digest": digest, **({"approvedBy": approved_by} if approved_by else {})}
        patch = {"spec": {"promotion": {"approval": approval}}}
        proposed = copy.deepcopy({k: v for k, v in job.items() if k != "status"})
        proposed["spec"].setdefault("promotion", {})["approval"] = approval
        check(proposed, "approve", old={k: v for k, v in job.items() if k != "status"})
        adapter = ((job.get("status") or {}).get("adapter") or {}).get("digest")
        if adapter and adapter != digest:
            raise FtctlError(f"FineTuneJob {name}: --digest {digest} is not the trained adapter ({adapter}); "
                             "the operator would ignore this approval")
        return self._call(self.custom.patch_namespaced_custom_object, GROUP, VERSION, self.namespace,
                          "finetunejobs", name, patch, what=f"FineTuneJob {name}")

    def alias_holder(self, alias: str) -> dict:
        """The promoted FineTuneJob that an alias points at now: of the jobs whose status says they
        promoted `alias`, the one promoted last (a successor's promotion moved the alias to it)."""
        holders = [j for j in self.list("FineTuneJob")
                   if ((j.get("status") or {}).get("promotion") or {}).get("alias") == alias
                   and j["status"]["promotion"].get("state") == "Promoted"]
        if not holders:
            raise FtctlError(f"no promoted FineTuneJob holds alias {alias} in namespace {self.namespace}")
        return max(holders, key=lambda j: j["status"]["promotion"].get("promotedAt") or "")

    def revoke(self, name: str, revoked: bool = True) -> dict:
        """spec.promotion.revoked: the operator moves the alias back (or forward again) and the targets follow."""
        patch = {"spec": {"promotion": {"revoked": revoked}}}
        return self._call(self.custom.patch_namespaced_custom_object, GROUP, VERSION, self.namespace,
                          "finetunejobs", name, patch, what=f"FineTuneJob {name}")

    # --- pods ---------------------------------------------------------------------------------
    def trainer_pod(self, name: str) -> str:
        """The newest pod of the FineTuneJob's current trainer Job."""
        job = self.get("FineTuneJob", name)
        status = job.get("status") or {}
        trainer_job = status.get("trainerJob")
        if not trainer_job:
            raise FtctlError(f"FineTuneJob {name} has no trainer Job yet (phase {status.get('phase', 'Pending')})")
        selector = f"job-name={trainer_job}"
        # Raw JSON, not the client's models: a pod in an odd state must not break `ftctl logs`.
        resp = self._call(self.core.list_namespaced_pod, self.namespace, label_selector=selector,
                          _preload_content=False, what=f"pods of Job {trainer_job}")
        pods = json.loads(resp.data).get("items") or []
        # Filter here too: a selector the server ignores must not show another job's logs.
        pods = [p for p in pods if trainer_job in (((p.get("metadata") or {}).get("labels") or {}).get("job-name"),
                                                   ((p.get("metadata") or {}).get("labels") or {})
                                                   .get("batch.kubernetes.io/job-name"))]
        if not pods:
            raise FtctlError(f"FineTuneJob {name}: trainer Job {trainer_job} has no pod yet")
        pods.sort(key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))
        return pods[-1]["metadata"]["name"]

    def logs(self, pod: str, follow: bool = False) -> Iterator[str]:
        resp = self._call(self.core.read_namespaced_pod_log, pod, self.namespace, follow=follow,
                          _preload_content=False, what=f"logs of pod {pod}")
        try:
            for chunk in resp.stream(4096, decode_content=True):
                yield chunk.decode("utf-8", errors="replace")
        finally:
            resp.release_conn()


def approval_user(cluster: Cluster, by: Optional[str]) -> Optional[str]:
    return by or cluster.user

