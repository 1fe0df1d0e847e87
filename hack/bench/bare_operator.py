"""The framework's floor for the operator benchmark: a bare Kopf operator that creates one Job per
FineTuneJob and nothing else (no status, no events, no ConfigMap, no indices).

    kopf run --standalone --all-namespaces hack/bench/bare_operator.py

With BARE_WRITES=same it makes the writes our operator must make until a job is Queued instead
(POST Job, POST ConfigMap, PATCH status, POST Event), level-triggered on events like ours and with
no Kopf bookkeeping write, and still nothing else (no indices, no other watches, no decisions):
the floor for the same API work, which tells the framework's and the API's share of the time
from our code's share. BARE_WATCH_JOBS=1 also watches Jobs (a handler that does nothing), as ours
does for its Jobs index: an experiment. BARE_WRITES=identical is the strictest floor: the same four
requests with byte-identical bodies (the trainer Job and ConfigMap built by
finetune_operator.children from the same configuration, the same status and Event), and a watch on
Jobs (an operator must see its children): what remains between it and ours is our code alone. It speaks to the emulator over HTTP and to a real
kube-apiserver over HTTPS with the kubeconfig's client certificate (operator_bench.py --api real).
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Optional

import aiohttp
import kopf

_session: dict[str, Any] = {}
_done: set[str] = set()  # BARE_WRITES=same: objects already handled (watch replays, event echoes)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.scanning.disabled = True


@kopf.on.login()
def login(**kwargs: Any) -> Optional[kopf.ConnectionInfo]:
    info = kopf.login_with_kubeconfig(**kwargs)
    _session["info"] = info
    return info


async def _write(method: str, path: str, body: dict, content_type: str = "application/json") -> None:
    info = _session["info"]
    if "http" not in _session:
        # The same session as our operator's client (finetune_operator.kube.Client): the kubeconfig's
        # CA and client certificate over HTTPS (a real kube-apiserver), 50 connections at most.
        ssl = info.as_ssl_context() if info.server.startswith("https") else None
        _session["http"] = aiohttp.ClientSession(headers=info.as_http_headers(),
                                                 connector=aiohttp.TCPConnector(ssl=ssl, limit=50))
    async with _session["http"].request(method, info.server.rstrip("/") + path, json=body,
                                        headers={"Content-Type": content_type}) as resp:
        if resp.status >= 400 and resp.status != 409:
            raise kopf.TemporaryError(f"HTTP {resp.status}", delay=1)


def _job(body: kopf.Body, name: str) -> dict:
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"{name}-train-1"},
           "spec": {"template": {"spec": {"restartPolicy": "Never",
                                          "containers": [{"name": "main", "image": "trainer"}]}}}}
    kopf.adopt(job, owner=body)
    return job


if os.environ.get("BARE_WRITES") not in ("same", "identical"):
    @kopf.on.create("finetune.dev", "v1alpha1", "finetunejobs")
    async def create_job(body: kopf.Body, name: str, namespace: str, **_: Any) -> None:
        await _write("POST", f"/apis/batch/v1/namespaces/{namespace}/jobs", _job(body, name))
else:
    def _children(body: kopf.Body, name: str) -> tuple[dict, dict]:
        if os.environ.get("BARE_WRITES") != "identical":
            cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-train-1"},
                  "data": {"job.json": "{}"}}
            kopf.adopt(cm, owner=body)
            return _job(body, name), cm
        from finetune_operator import children, config  # the objects ours creates, byte for byte

        if "config" not in _session:  # read once, as ours does at startup
            _session["config"] = config.load()
        obj = {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec")}
        train_cfg = children.trainer_config(obj, "s3://bench/validated", "chat", "sha256:" + "0" * 64, 10.0)
        cm, job = children.trainer_children(obj, 1, train_cfg, _session["config"])
        return job, cm

    @kopf.on.event("finetune.dev", "v1alpha1", "finetunejobs")
    async def create_children(type: str, body: kopf.Body, name: str, namespace: str, **_: Any) -> None:
        uid = body["metadata"]["uid"]
        if type == "DELETED" or body.get("status") or uid in _done:
            return  # the echo of our status patch, or a replayed event of an object already handled
        _done.add(uid)
        job, cm = _children(body, name)
        await _write("POST", f"/apis/batch/v1/namespaces/{namespace}/jobs", job)
        await _write("POST", f"/api/v1/namespaces/{namespace}/configmaps", cm)
        await _write("PATCH", f"/apis/finetune.dev/v1alpha1/namespaces/{namespace}/finetunejobs/{name}/status",
                     {"status": {"phase": "Queued", "trainerJob": f"{name}-train-1"}},
                     "application/merge-patch+json")
        now = datetime.datetime.now(datetime.timezone.utc).isoformat()
        await _write("POST", f"/api/v1/namespaces/{namespace}/events", {
            "apiVersion": "v1", "kind": "Event", "metadata": {"generateName": "bare-", "namespace": namespace},
            "type": "Normal", "reason": "TrainerJobCreated", "message": f"trainer Job {name}-train-1 created",
            "involvedObject": {"apiVersion": body["apiVersion"], "kind": body["kind"], "name": name,
                               "namespace": namespace, "uid": body["metadata"]["uid"]},
            "source": {"component": "bare"}, "firstTimestamp": now, "lastTimestamp": now})


if os.environ.get("BARE_WATCH_JOBS") or os.environ.get("BARE_WRITES") == "identical":
    # An experiment: also watch the Jobs (as ours does, for its Jobs index), to see what receiving
    # 1,000 full Job objects costs; the handler does nothing.
    @kopf.on.event("batch", "v1", "jobs")
    async def job_seen(**_: Any) -> None:
        pass


@kopf.on.cleanup()
async def close(**_: Any) -> None:
    if "http" in _session:
        await _session["http"].close()
