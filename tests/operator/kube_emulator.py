"""A Kubernetes API for tests: kmock's KubernetesEmulator served over HTTP from a background thread.

The emulator keeps objects in memory and serves list/watch/create/patch/delete like an API
server (simplified: no defaulting, no resourceVersion checks, no garbage collector -- the fake
kubelet plays the collector). Our CRDs are registered with a status subresource, as in the
generated CRDs. Tests and the benchmark talk to it through plain synchronous HTTP calls.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import aiohttp.web
import attrs
import kmock
import urllib3

from finetune_operator.api import KINDS
from finetune_operator.api.meta import GROUP, VERSION


def _path(api_version: str, plural: str, namespace: Optional[str], name: Optional[str] = None,
          sub: Optional[str] = None) -> str:
    root = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    parts = [root] + ([f"namespaces/{namespace}"] if namespace else []) + [plural] + ([name] if name else []) \
        + ([sub] if sub else [])
    return "/".join(parts)


# The request being routed in this task (fast routing only).
_ROUTING: contextvars.ContextVar = contextvars.ContextVar("routing", default=None)


@attrs.define(kw_only=True)
class ApiServerEmulator(kmock.KubernetesEmulator):
    """The emulator plus the bits of API-server behaviour operators rely on: metadata.generateName
    (Kopf names its Events that way), uid, creationTimestamp, resourceVersion, and
    metadata.generation that starts at 1 and grows on every spec change."""

    # Requests being served right now. kmock routes a request by checking that it is among the
    # requests each reaction's filter sees, which walks the whole history: O(N) per request, so
    # 1,000s of objects slow to a crawl. Routing only needs the in-flight ones; the full history
    # stays in `_requests` (see Cluster.write_requests). Views over kmock's history are not used.
    # Only for the 1,000-object benchmark: with several requests in flight at once, routing by the
    # in-flight list was seen to answer 404 for objects that exist (a GET beside concurrent POSTs),
    # so the tests keep kmock's own routing.
    fast_routing: bool = attrs.field(default=False)
    _inflight: list = attrs.field(factory=list, init=False)
    # time.monotonic() of the latest write request answered (the benchmark's "all writes done").
    last_write_at: float = attrs.field(default=0.0, init=False)

    def __iter__(self):
        if not self.fast_routing:
            return super().__iter__()
        # kmock asks "is this request among those each reaction's filter sees?" (by identity), so
        # the request being routed is all a routing decision needs: O(1) instead of O(in flight).
        # Scanning every in-flight request made each request cost more the more were in flight,
        # i.e. it charged an operator for its concurrency; an API server does not.
        current = _ROUTING.get()
        return iter([current] if current is not None else list(self._inflight))

    async def _handle(self, request):  # type: ignore[override]
        self._inflight.append(request)
        token = _ROUTING.set(request)
        try:
            return await self._handle_tracked(request)
        finally:
            _ROUTING.reset(token)
            self._inflight.remove(request)
            if request.method in (kmock.method.POST, kmock.method.PATCH, kmock.method.PUT, kmock.method.DELETE):
                self.last_write_at = time.monotonic()

    async def _handle_tracked(self, request):
        data = request.data if isinstance(request.data, dict) else None
        if request.resource is not None and data is not None:
            meta = data.setdefault("metadata", {})
            if request.action == kmock.action.CREATE:
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:10]
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("generation", 1)
                # Constant: enough for Kopf's JSON-patch "test" op; the emulator has no optimistic locking.
                meta.setdefault("resourceVersion", "1")
                meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
                if (request.params or {}).get("dryRun"):
                    # A server-side dry run (the operator admits a Job's pod template this way): answered,
                    # never stored. The emulator validates nothing, so every dry run passes.
                    return aiohttp.web.json_response(data, status=201)
            elif request.action == kmock.action.UPDATE and not request.subresource and "spec" in data:
                try:
                    current = self.objects[request.resource, request.namespace, request.name]
                    meta["generation"] = (current.get("metadata", {}).get("generation") or 1) + 1
                except (KeyError, LookupError):
                    pass
        return await super()._handle(request)

    def _KubernetesEmulator__get_objs(self, request, strict: bool) -> list:
        # The emulator scans every stored object per request (O(N)); an API server looks one up by
        # key. Named lookups go straight to the dict, so 1,000s of objects stay fast.
        if request.name is not None and request.resource is not None and (strict or request.namespace):
            obj = self.objects._objects.get((request.resource, request.namespace, request.name))
            if obj is not None:
                return [obj]
            # A miss is confirmed by kmock's own scan: objects created by requests still in
            # flight were seen missing from the dict (a GET right after a concurrent POST).
        return kmock.KubernetesEmulator._KubernetesEmulator__get_objs(self, request, strict)


class Cluster:
    def __init__(self, fast_routing: bool = False) -> None:
        self.emulator = ApiServerEmulator(fast_routing=fast_routing)
        self.emulator.resources.load_bundled()
        for kind in KINDS:
            self.emulator.resources[f"{GROUP}/{VERSION}/{kind.PLURAL}"] = kmock.ResourceInfo(
                kind=kind.KIND, singular=kind.KIND.lower(), namespaced=kind.SCOPE == "Namespaced",
                verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
                shortnames=set(kind.SHORT_NAMES), subresources={"status"})
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: Optional[asyncio.Event] = None
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the emulator did not start")
        self.http = urllib3.PoolManager(maxsize=8)
        self.user_agent = "kube-emulator-tests"  # tells our own requests apart in the request log

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with self.emulator, kmock.Server(self.emulator) as server:
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def close(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def write_kubeconfig(self, path: Path) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "test-token"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester",
                                                          "namespace": "default"}}],
        }))
        return path

    # --- synchronous API calls --------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        resp = self.http.request(method, self.url + path, body=json.dumps(body) if body is not None else None,
                                 headers={"Content-Type": content_type, "User-Agent": self.user_agent}, timeout=30)
        data = json.loads(resp.data) if resp.data else {}
        if resp.status >= 400:
            raise LookupError(f"{method} {path}: HTTP {resp.status}: {data.get('message')}")
        return data

    def create(self, obj: dict) -> dict:
        meta = obj.setdefault("metadata", {})
        if obj["kind"] != "GovernancePolicy":
            meta.setdefault("namespace", "default")
        plural = {"Dataset": "datasets", "FineTuneJob": "finetunejobs", "GovernancePolicy": "governancepolicies",
                  "FederatedFineTuneJob": "federatedfinetunejobs", "Secret": "secrets"}[obj["kind"]]
        return self.request("POST", _path(obj["apiVersion"], plural, meta.get("namespace")), obj)

    def secret(self, name: str, data: dict[str, str], namespace: str = "default") -> dict:
        return self.request("POST", _path("v1", "secrets", namespace), {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})

    def get(self, api_version: str, plural: str, namespace: Optional[str], name: str) -> Optional[dict]:
        try:
            return self.request("GET", _path(api_version, plural, namespace, name))
        except LookupError:
            return None

    def list(self, api_version: str, plural: str, namespace: Optional[str] = None) -> list[dict]:
        return self.request("GET", _path(api_version, plural, namespace))["items"]

    def ftj(self, name: str, namespace: str = "default") -> Optional[dict]:
        return self.get(f"{GROUP}/{VERSION}", "finetunejobs", namespace, name)

    def dataset(self, name: str, namespace: str = "default") -> Optional[dict]:
        return self.get(f"{GROUP}/{VERSION}", "datasets", namespace, name)

    def update_spec(self, plural: str, name: str, spec: dict, namespace: str = "default") -> dict:
        """Merge-patch the spec (the emulator bumps metadata.generation)."""
        return self.request("PATCH", _path(f"{GROUP}/{VERSION}", plural, namespace, name), {"spec": spec},
                            "application/merge-patch+json")

    def delete(self, api_version: str, plural: str, namespace: Optional[str], name: str) -> None:
        self.request("DELETE", _path(api_version, plural, namespace, name))

    def events(self, namespace: str = "default", name: Optional[str] = None) -> list[dict]:
        items = self.list("v1", "events", namespace)
        return [e for e in items if name is None or (e.get("involvedObject") or {}).get("name") == name]

    def write_requests(self) -> list[Any]:
        return [r for r in list(self.emulator._requests) if r.method in ("POST", "PATCH", "PUT", "DELETE")]


def wait_for(what: Callable[[], Any], timeout: float, message: str = "", interval: float = 0.2) -> Any:
    """Poll until `what()` returns something truthy; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = what()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message or what}: last={last!r}")
