"""Kopf handlers of FederatedFineTuneJobs: observe, call federation.plan_federation, apply the plan.

Level-triggered like handlers.py (whose client, indices, Events and retries this module shares):
an event of a FederatedFineTuneJob, of a participant's Dataset, or of a Job or pod labelled
finetune.dev/federation leads to one reconcile of the federation, serialized per object. While it
runs, progress.json is read every progress interval (a task per running federation, not a Kopf
timer: a timer would put Kopf's own finalizer on the object).

Deletion: the site objects live in the participants' namespaces, out of reach of owner
references, so our finalizer stays on the object until they are deleted (by label).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Optional

import kopf

from finetune_trainer import storage

from . import federation, handlers, kube, metrics
from .api.meta import GROUP, VERSION
from .conditions import now_iso
from .decisions import permanent_api_error, plan_rejected

log = logging.getLogger("finetune_operator")
PLURAL = "federatedfinetunejobs"


class _State:
    def __init__(self) -> None:
        self.bodies: dict[tuple[str, str], dict] = {}
        self.written: dict[str, dict] = {}  # uid -> the status we wrote last
        self.finalizing: dict[str, tuple] = {}  # uid -> the finalizers the object had when we patched
        self.polls: dict[tuple[str, str], asyncio.Task] = {}


STATE = _State()


def _key(namespace: str, name: str) -> tuple:
    return ("FederatedFineTuneJob", namespace, name)


def _with_written(body: dict) -> dict:
    written = STATE.written.get(body["metadata"].get("uid"))
    return {**body, "status": written} if written is not None else body


# --- the typed object and what a reconcile observes --------------------------------------------

def typed(body: dict) -> tuple[Optional[Any], Optional[str]]:
    """(the typed object, None) or (None, a message naming the field at fault)."""
    from pydantic import ValidationError

    from .api.federated import FederatedFineTuneJob

    try:
        return FederatedFineTuneJob.model_validate({k: body[k] for k in ("apiVersion", "kind", "metadata", "spec")
                                                    if k in body}), None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc") or ())
        return None, f"{where}: {first.get('msg')}"


def _observe_jobs(indices: dict, observed: federation.Observed, namespace: str, names: list[str]) -> None:
    for job in names:
        found = handlers._job(indices, namespace, job)
        if found is not None:
            observed.jobs[(namespace, job)] = found
        observed.pods[(namespace, job)] = handlers._pods(indices, namespace, job)


async def _observe(body: dict, job: Any, indices: dict) -> federation.Observed:
    from finetune_trainer.federated.config import progress_uri

    meta, status = body["metadata"], body.get("status") or {}
    ns, name = meta["namespace"], meta["name"]
    observed = federation.Observed(policies=[p for store in indices["policies_idx"].values() for p in store])
    for p in job.spec.participants:
        if p.remote is not None:
            continue
        ds = handlers._one(indices["datasets_idx"], (p.namespace, p.dataset))
        if ds is not None:
            observed.datasets[(p.namespace, p.dataset)] = handlers._with_written_status(ds)
        _observe_jobs(indices, observed, p.namespace, [federation.site_job_name(ns, name, p.name)])
    _observe_jobs(indices, observed, ns, [federation.superlink_name(name), federation.server_name(name)])
    if status.get("startTime") and status.get("phase") not in ("Succeeded", "Failed"):
        observed.progress = await handlers._read_json(progress_uri(job.spec.output.uri))
    progress = federation.read_progress(observed.progress)
    adapter = (status.get("adapter") or {}).get("uri") or (progress.adapter.uri if progress and progress.adapter else None)
    server = observed.jobs.get((ns, federation.server_name(name))) or {}
    if adapter and (server.get("complete") or status.get("adapter")):
        from finetune_trainer import adapter as adapter_mod

        observed.manifest_ok = await asyncio.to_thread(adapter_mod.verify, adapter)
        observed.alias_current = await handlers._read_alias(federation.alias_uri_of(body))
    return observed


# --- applying -----------------------------------------------------------------------------------

async def _apply(plan: Any, body: dict, logger: Any) -> None:
    client = kube.client()
    ns = body["metadata"]["namespace"]
    outcomes = []
    # ServiceAccounts and ConfigMaps before the Jobs whose pods name them (a pod whose
    # ServiceAccount does not exist yet is refused by admission).
    order = {"ServiceAccount": 0, "NetworkPolicy": 1, "Service": 1, "ConfigMap": 2, "Job": 3}
    for manifest in sorted(plan.create, key=lambda m: order.get(m["kind"], 2)):
        where = manifest["metadata"]["namespace"]
        if manifest["kind"] == "Job" and (where, manifest["metadata"]["name"]) not in handlers.STATE.created:
            await handlers._admit(client, manifest)
        outcome = await client.create_or_adopt(manifest)
        handlers.STATE.created.add((where, manifest["metadata"]["name"]))
        outcomes.append(f"{manifest['kind']} {where}/{manifest['metadata']['name']} {outcome}")
    if outcomes:
        logger.info(", ".join(outcomes))
    for name in plan.delete_jobs:
        await client.delete("batch/v1", "Job", ns, name, propagation="Background")
        handlers.STATE.created.discard((ns, name))
    if plan.alias is not None:
        uri, record = plan.alias
        await asyncio.to_thread(storage.write_text, uri, json.dumps(record, indent=1, sort_keys=True))
    if plan.status is not None:
        old = body.get("status") or {}
        await client.patch_status(body, {**plan.status, **{k: None for k in old if k not in plan.status}}, parse=False)
        STATE.written[body["metadata"]["uid"]] = plan.status
    if plan.events:
        handlers._post_events(body, plan.events)


def _record_metrics(ns: str, name: str, old: dict, new: dict) -> None:
    metrics.federation_phase(ns, name, new.get("phase") or "Pending")
    seen = {r.get("round") for r in old.get("rounds") or []}
    for r in new.get("rounds") or []:
        if r.get("round") not in seen:
            metrics.federated_round(r.get("seconds"), max(0, int(r.get("sitesSelected") or 0)
                                                             - int(r.get("sitesReported") or 0)))


async def reconcile(namespace: str, name: str, indices: dict, logger: Any, body: Optional[dict] = None) -> None:
    key = _key(namespace, name)
    try:
        async with handlers.STATE.lock(key):
            body = body or STATE.bodies.get((namespace, name))
            if body is None or body["metadata"].get("deletionTimestamp"):
                return
            body = _with_written(body)
            with metrics.reconcile_timer("FederatedFineTuneJob"):
                await _reconcile(body, indices, logger)
    except Exception as exc:
        current = STATE.bodies.get((namespace, name))
        if isinstance(exc, kube.ApiError) and permanent_api_error(exc.status, exc.message) and current is not None:
            handlers._cancel_retry(key)
            handlers._succeeded(key)
            current = _with_written(current)
            logger.warning(f"{exc.what or 'a request'} rejected by the API server (HTTP {exc.status}): "
                           f"{exc.message[:500]}; not retried until the spec changes")
            plan = plan_rejected(current, exc.what or "a child object", exc.message, now_iso())
            await _apply(plan, current, logger)
            return
        handlers._retry_later(key, lambda: reconcile(namespace, name, indices, logger), logger, exc, current)
        return
    handlers._succeeded(key)


async def _reconcile(body: dict, indices: dict, logger: Any) -> None:
    meta, old = body["metadata"], body.get("status") or {}
    ns, name = meta["namespace"], meta["name"]
    if ((old.get("phase") == "Succeeded" or (old.get("phase") == "Failed" and old.get("startTime")))
            and old.get("observedGeneration") == (meta.get("generation") or 1)):
        metrics.federation_phase(ns, name, old["phase"])
        return  # final, and already said so for this generation: nothing to read again
    job, error = typed(body)
    if job is None:
        plan = plan_rejected(body, "the spec", error or "it does not validate", now_iso())
    else:
        observed = await _observe(body, job, indices)
        plan = federation.plan_federation(body, job, observed, handlers.CONFIG, now_iso())
    await _apply(plan, body, logger)
    new = plan.status if plan.status is not None else old
    _record_metrics(ns, name, old, new)
    _poll_while_running(ns, name, new, indices, logger)


def _poll_while_running(ns: str, name: str, status: dict, indices: dict, logger: Any) -> None:
    task = STATE.polls.pop((ns, name), None)
    if task is not None and task is not asyncio.current_task():
        task.cancel()
    if status.get("phase") not in ("Starting", "Training", "Evaluating"):
        return

    async def again() -> None:
        await asyncio.sleep(min(handlers.CONFIG.progress_interval, 30.0))
        STATE.polls.pop((ns, name), None)
        await reconcile(ns, name, indices, logger)

    STATE.polls[(ns, name)] = asyncio.create_task(again())


# --- the finalizer --------------------------------------------------------------------------------

async def _patch_finalizers(body: dict, add: bool, logger: Any) -> None:
    meta = body["metadata"]
    current = list(meta.get("finalizers") or [])
    if add:
        ops = [{"op": "add", "path": "/metadata/finalizers/-" if current else "/metadata/finalizers",
                "value": federation.FINALIZER if current else [federation.FINALIZER]}]
    else:
        index = current.index(federation.FINALIZER)
        ops = [{"op": "test", "path": f"/metadata/finalizers/{index}", "value": federation.FINALIZER},
               {"op": "remove", "path": f"/metadata/finalizers/{index}"}]
    if meta.get("resourceVersion"):
        ops.insert(0, {"op": "test", "path": "/metadata/resourceVersion", "value": meta["resourceVersion"]})
    path = kube.path_of(body.get("apiVersion") or f"{GROUP}/{VERSION}", "FederatedFineTuneJob", meta["namespace"],
                        meta["name"])
    try:
        await kube.client().request("PATCH", path, ops, "application/json-patch+json")
    except kube.ApiError as exc:
        if exc.status in (404, 409, 422):
            logger.debug(f"finalizer patch not applied ({exc}); waiting for a newer event")
            return
        raise
    STATE.finalizing[meta["uid"]] = (tuple(current), add)


def site_namespaces(body: dict) -> list[str]:
    """Where site objects may be: the participants' namespaces (spec.participants cannot lose a site
    unnoticed: a site removed after the start keeps its objects until the federation is deleted, and
    the finalizer then only finds the current ones -- see docs/federated.md)."""
    found = [p.get("namespace") for p in ((body.get("spec") or {}).get("participants") or [])
             if isinstance(p, dict) and not p.get("remote")]
    return [ns for ns in dict.fromkeys(found) if isinstance(ns, str) and ns]


async def delete_site_objects(body: dict) -> int:
    """Delete what the federation made in each participant namespace (by label); how many."""
    client = kube.client()
    meta = body["metadata"]
    selector = federation.site_selector(meta["namespace"], meta["name"])
    deleted = 0
    for ns in site_namespaces(body):
        for api_version, kind in federation.SITE_KINDS:
            found = await client.request("GET", kube.path_of(api_version, kind, ns), params={"labelSelector": selector})
            for obj in (found or {}).get("items") or []:
                if await client.delete(api_version, kind, ns, obj["metadata"]["name"], propagation="Background"):
                    deleted += 1
                handlers.STATE.created.discard((ns, obj["metadata"]["name"]))
    return deleted


async def _finalize(body: dict, logger: Any) -> None:
    if federation.FINALIZER not in (body["metadata"].get("finalizers") or []):
        return
    deleted = await delete_site_objects(body)
    logger.info(f"deleted {deleted} site objects of federation {body['metadata']['name']}")
    await _patch_finalizers(body, False, logger)


# --- events ---------------------------------------------------------------------------------------

@kopf.on.event(GROUP, VERSION, PLURAL)
async def federation_event(type: str, body: kopf.Body, namespace: str, name: str, logger: Any, **kwargs: Any) -> None:
    uid = body["metadata"].get("uid")
    if type == "DELETED":
        STATE.written.pop(uid, None)
        STATE.finalizing.pop(uid, None)
        STATE.bodies.pop((namespace, name), None)
        task = STATE.polls.pop((namespace, name), None)
        if task is not None:
            task.cancel()
        handlers._cancel_retry(_key(namespace, name))
        handlers.STATE.locks.pop(_key(namespace, name), None)
        metrics.federation_phase(namespace, name, None)
        return
    plain = handlers._plain(body)
    STATE.bodies[(namespace, name)] = plain
    async with handlers.STATE.lock(_key(namespace, name)):
        if plain["metadata"].get("deletionTimestamp"):
            try:
                await _finalize(_with_written(plain), logger)
            except Exception as exc:
                handlers._retry_later(_key(namespace, name),
                                      lambda: _finalize(_with_written(STATE.bodies.get((namespace, name)) or plain),
                                                        logger), logger, exc, plain)
            return
        current = tuple(plain["metadata"].get("finalizers") or [])
        if federation.FINALIZER not in current and STATE.finalizing.get(uid) != (current, True):
            await _patch_finalizers(plain, True, logger)  # before any site object exists
    written = STATE.written.get(uid)
    if (written is not None and dict(body.get("status") or {}) == written
            and written.get("observedGeneration") == (body["metadata"].get("generation") or 1)):
        return  # the echo of our own status patch
    await reconcile(namespace, name, kwargs, logger, plain)


def _federations_of_dataset(namespace: str, dataset: str) -> list[tuple[str, str]]:
    out = []
    for (ns, name), body in list(STATE.bodies.items()):
        for p in (body.get("spec") or {}).get("participants") or []:
            if p.get("namespace") == namespace and p.get("dataset") == dataset:
                out.append((ns, name))
                break
    return out


@kopf.on.event(GROUP, VERSION, "datasets")
async def federation_dataset_event(namespace: str, name: str, logger: Any, **kwargs: Any) -> None:
    """A participant's Dataset changed (validated, re-validated, its consent annotation edited)."""
    for ns, fed in _federations_of_dataset(namespace, name):
        await reconcile(ns, fed, kwargs, logger)


def _federation_by_label(value: Optional[str]) -> Optional[tuple[str, str]]:
    for (ns, name) in list(STATE.bodies):
        if federation.federation_key(ns, name) == value:
            return ns, name
    return None


@kopf.on.event("batch", "v1", "jobs", labels={federation.FEDERATION_LABEL: kopf.PRESENT})
async def federation_job_event(labels: dict, logger: Any, **kwargs: Any) -> None:
    found = _federation_by_label(labels.get(federation.FEDERATION_LABEL))
    if found is not None:
        await reconcile(*found, kwargs, logger)


@kopf.on.event("v1", "pods", labels={federation.FEDERATION_LABEL: kopf.PRESENT})
async def federation_pod_event(labels: dict, logger: Any, **kwargs: Any) -> None:
    found = _federation_by_label(labels.get(federation.FEDERATION_LABEL))
    if found is not None:
        await reconcile(*found, kwargs, logger)


handlers._NoEventHandlerSuccessLines.LINES |= {
    f"Handler '{h}' succeeded." for h in ("federation_event", "federation_dataset_event", "federation_job_event",
                                          "federation_pod_event")}
