"""A small async Kubernetes API client: create-or-adopt, merge-patch status, delete.

Kopf has no public write API besides events, so the operator keeps its own aiohttp
session, authenticated with the same credentials Kopf logged in with (see handlers.login).
"""

from __future__ import annotations

import json
from typing import Any, Optional

import aiohttp

from .api import KINDS
from .api.meta import GROUP, VERSION

#: Every kind of our API (from the API models, so a new kind cannot be forgotten), and the others we address.
PLURALS = {**{k.KIND: k.PLURAL for k in KINDS}, "LLMInferenceService": "llminferenceservices"}
#: Server-side apply's field manager: what `kubectl get --show-managed-fields` names as the writer.
FIELD_MANAGER = "finetune-operator"


class ApiError(Exception):
    def __init__(self, status: int, body: Any, what: str = ""):
        super().__init__(f"HTTP {status}: {body.get('message') if isinstance(body, dict) else body}")
        self.status = status
        self.body = body
        #: The object the failed request was about ("Job j-train-1"), where the caller knows it.
        self.what = what

    @property
    def message(self) -> str:
        """The server's own message (a Status object's .message), e.g. naming the invalid field."""
        return str(self.body.get("message") if isinstance(self.body, dict) else self.body)


def path_of(api_version: str, kind: str, namespace: Optional[str], name: Optional[str] = None,
            subresource: Optional[str] = None) -> str:
    plural = PLURALS.get(kind) or {"ConfigMap": "configmaps", "Job": "jobs", "Event": "events",
                                   "Secret": "secrets", "Pod": "pods", "Service": "services",
                                   "NetworkPolicy": "networkpolicies", "ServiceAccount": "serviceaccounts"}[kind]
    root = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    parts = [root]
    if namespace:
        parts.append(f"namespaces/{namespace}")
    parts.append(plural)
    if name:
        parts.append(name)
    if subresource:
        parts.append(subresource)
    return "/".join(parts)


class Client:
    """One aiohttp session per operator process (created lazily in the running loop)."""

    def __init__(self, info: Any):
        # kopf.ConnectionInfo knows how to turn itself into headers and an SSL context.
        self.server = info.server.rstrip("/")
        self.headers = {"Accept": "application/json", **info.as_http_headers()}
        self._ssl: Any = info.as_ssl_context() if self.server.startswith("https") else None
        self._session: Optional[aiohttp.ClientSession] = None

    async def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                      params: Optional[dict] = None, parse: bool = True) -> Any:
        """The decoded JSON answer; with parse=False (the caller does not need it) None on success."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self.headers, timeout=aiohttp.ClientTimeout(total=60),
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=50))
        data = json.dumps(body) if body is not None else None
        async with self._session.request(method, self.server + path, data=data, params=params,
                                         headers={"Content-Type": content_type}) as resp:
            raw = await resp.read()
            if resp.status < 400 and not parse:
                return None
            payload = json.loads(raw) if raw else {}
            if resp.status >= 400:
                raise ApiError(resp.status, payload)
            return payload

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # --- the operations the operator needs ---------------------------------------------------

    async def create_or_adopt(self, manifest: dict) -> str:
        """Create an object; on 409 (it exists: we made it before a restart) adopt it.

        Returns "created" or "adopted". An existing object owned by someone else is an error,
        so a name clash never hijacks another object.
        """
        meta = manifest["metadata"]
        path = path_of(manifest["apiVersion"], manifest["kind"], meta.get("namespace"))
        for _ in range(3):
            try:
                await self.request("POST", path, manifest, parse=False)
                return "created"
            except ApiError as exc:
                if exc.status != 409:
                    exc.what = f"{manifest['kind']} {meta['name']}"
                    raise
            try:
                existing = await self.request("GET", f"{path}/{meta['name']}")
                break
            except ApiError as exc:
                if exc.status != 404:  # 404: deleted between our POST and GET (e.g. garbage collected)
                    raise
        else:
            raise ApiError(409, {"message": f"{manifest['kind']} {meta['name']} keeps appearing and disappearing"})
        wanted = {o.get("uid") for o in meta.get("ownerReferences") or []}
        owners = {o.get("uid") for o in (existing.get("metadata") or {}).get("ownerReferences") or []}
        if wanted and not wanted & owners:
            raise ApiError(409, {"message": f"{manifest['kind']} {meta['name']} exists and belongs to another owner"})
        return "adopted"

    async def admit_pod_template(self, job: dict) -> None:
        """A server-side dry run of the Job's pod (POST pods?dryRun=All: validation and every
        admission plugin and webhook, nothing stored). The Job API does not admit its pod template:
        a template that admission refuses (e.g. a PriorityClass that does not exist) makes a Job
        that the Job controller can never give a pod, and says so only in Events on the Job.
        Raises ApiError (what: the Job) when the pod would be refused."""
        meta = job["metadata"]
        template = job["spec"]["template"]
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"generateName": f"{meta['name'][:50]}-", "namespace": meta.get("namespace"),
                            "labels": dict((template.get("metadata") or {}).get("labels") or {})},
               "spec": template["spec"]}
        try:
            await self.request("POST", path_of("v1", "Pod", meta.get("namespace")), pod,
                               params={"dryRun": "All"}, parse=False)
        except ApiError as exc:
            exc.what = f"Job {meta['name']} (its pod template)"
            raise

    async def patch_status(self, obj: dict, status: dict, parse: bool = True) -> Optional[dict]:
        meta = obj["metadata"]
        path = path_of(obj.get("apiVersion", f"{GROUP}/{VERSION}"), obj["kind"], meta.get("namespace"),
                       meta["name"], "status")
        try:
            return await self.request("PATCH", path, {"status": status}, "application/merge-patch+json", parse=parse)
        except ApiError as exc:
            exc.what = f"the status of {obj['kind']} {meta['name']}"
            raise

    async def patch(self, api_version: str, kind: str, namespace: str, name: str, body: dict) -> dict:
        try:
            return await self.request("PATCH", path_of(api_version, kind, namespace, name), body,
                                      "application/merge-patch+json")
        except ApiError as exc:
            exc.what = f"a patch of {kind} {name}"
            raise

    async def apply(self, manifest: dict, force: bool = True) -> dict:
        """Server-side apply of the fields `manifest` names, owned by FIELD_MANAGER."""
        meta = manifest["metadata"]
        try:
            return await self.request("PATCH", path_of(manifest["apiVersion"], manifest["kind"], meta.get("namespace"),
                                                       meta["name"]), manifest, "application/apply-patch+yaml",
                                      params={"fieldManager": FIELD_MANAGER, "force": "true" if force else "false"})
        except ApiError as exc:
            exc.what = f"{manifest['kind']} {meta['name']}"
            raise

    async def delete(self, api_version: str, kind: str, namespace: str, name: str,
                     propagation: str = "Background") -> bool:
        """Delete; False if it was already gone."""
        try:
            await self.request("DELETE", path_of(api_version, kind, namespace, name),
                               {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation})
            return True
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise

    async def get(self, api_version: str, kind: str, namespace: Optional[str], name: str) -> Optional[dict]:
        try:
            return await self.request("GET", path_of(api_version, kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise


def event_body(obj: dict, type_: str, reason: str, message: str, component: str, instance: str,
               now: str) -> dict:
    """A core/v1 Event about obj, as Kopf's poster writes it (kubectl describe shows it)."""
    meta = obj["metadata"]
    ref = {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "name": meta.get("name"),
           "uid": meta.get("uid"), "namespace": meta.get("namespace")}
    namespace = meta.get("namespace") or "default"
    return {"apiVersion": "v1", "kind": "Event",
            "metadata": {"namespace": namespace, "generateName": "kopf-event-"},
            "action": "Action?", "type": type_, "reason": reason, "message": message,
            "reportingComponent": component, "reportingInstance": instance, "source": {"component": component},
            "involvedObject": {**{k: v for k, v in ref.items() if v}, "namespace": namespace},
            "firstTimestamp": now, "lastTimestamp": now, "eventTime": now}


_client: Optional[Client] = None


def set_connection(info: Any) -> None:
    global _client
    _client = Client(info)


def client() -> Client:
    if _client is None:
        raise RuntimeError("not logged in to the Kubernetes API yet")
    return _client
