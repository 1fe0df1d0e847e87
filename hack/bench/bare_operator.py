"""The framework's floor for the operator benchmark: a bare Kopf operator that creates one Job per
FineTuneJob and nothing else (no status, no events, no ConfigMap, no indices).

    kopf run --standalone --all-namespaces hack/bench/bare_operator.py
"""

from __future__ import annotations

from typing import Any, Optional

import aiohttp
import kopf

_session: dict[str, Any] = {}


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.scanning.disabled = True


@kopf.on.login()
def login(**kwargs: Any) -> Optional[kopf.ConnectionInfo]:
    info = kopf.login_with_kubeconfig(**kwargs)
    _session["info"] = info
    return info


@kopf.on.create("finetune.dev", "v1alpha1", "finetunejobs")
async def create_job(body: kopf.Body, name: str, namespace: str, **_: Any) -> None:
    info = _session["info"]
    if "http" not in _session:
        _session["http"] = aiohttp.ClientSession(headers=info.as_http_headers())
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"{name}-train-1"},
           "spec": {"template": {"spec": {"restartPolicy": "Never",
                                          "containers": [{"name": "main", "image": "trainer"}]}}}}
    kopf.adopt(job, owner=body)
    url = f"{info.server.rstrip('/')}/apis/batch/v1/namespaces/{namespace}/jobs"
    async with _session["http"].post(url, json=job) as resp:
        if resp.status >= 400 and resp.status != 409:
            raise kopf.TemporaryError(f"HTTP {resp.status}", delay=1)


@kopf.on.cleanup()
async def close(**_: Any) -> None:
    if "http" in _session:
        await _session["http"].close()
