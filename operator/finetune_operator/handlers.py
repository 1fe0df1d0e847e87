"""Kopf handlers: observe, call decisions, apply the plan. Nothing is decided here.

Reconciliation is level-triggered. Every watch event of a FineTuneJob, a Dataset, or a Job
or pod the operator owns leads to one `reconcile_*` call for the owning object, serialized
per object. State comes from Kopf's in-memory indices of Datasets, policies, Jobs and pods
(Kopf runs no handler before they are filled, so a restarted operator sees its existing Jobs)
and from the FineTuneJob events themselves: no extra reads per event. Deterministic child names
plus create-or-adopt mean a restart never duplicates a Job.

API writes on the happy path until Training: one ConfigMap, one Job, one status patch and
one Event per FineTuneJob (no Kopf bookkeeping: on-event handlers store no state; the Kopf
finalizer is only added once training has started and checkpoints may exist).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Optional

import kopf

from finetune_trainer import storage

from . import children, config as config_mod, decisions, kube, metrics
from .api.meta import GROUP, VERSION
from .conditions import now_iso

log = logging.getLogger("finetune_operator")

CONFIG = config_mod.load()
FINALIZER = f"{GROUP}/cleanup"
MANAGED = {children.MANAGED_BY: children.OPERATOR}


class _State:
    """Per-process memory, rebuilt on every operator start (a restart forgets it safely)."""

    def __init__(self) -> None:
        self.locks: dict[tuple, asyncio.Lock] = {}
        # Status we wrote last, by uid: watch events can lag behind our own patches.
        self.written: dict[str, dict] = {}
        # Children we created or adopted, until the watch shows them (avoids a second POST -> 409).
        self.created: set[tuple[str, str]] = set()
        # Latest FineTuneJob bodies, kept by the FineTuneJob event handler (cheaper than a Kopf index:
        # one handler per event instead of two). A Job event for an unknown owner is simply skipped:
        # the owner's own event reconciles it.
        self.finetunejobs: dict[tuple[str, str], dict] = {}

    def lock(self, key: tuple) -> asyncio.Lock:
        return self.locks.setdefault(key, asyncio.Lock())


STATE = _State()


# --- startup, login, indices -----------------------------------------------------------------

async def _expire_metrics() -> None:
    """Drop per-job metric series some time after the job finished (metrics.py keeps the retention)."""
    while True:
        await asyncio.sleep(60)
        metrics.expire()


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    global CONFIG, STATE
    CONFIG = config_mod.load()
    STATE = _State()
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP, key="last-handled")
    settings.posting.level = logging.WARNING  # Kopf's own log lines are not Events; ours are posted explicitly
    settings.scanning.disabled = True  # our resources are known; no cluster-wide CRD discovery needed
    settings.posting.reporting_component = "finetune-operator"
    settings.peering.lifetime = CONFIG.peering_lifetime
    if CONFIG.s3_endpoint:
        import os

        os.environ.setdefault("AWS_ENDPOINT_URL", CONFIG.s3_endpoint)
        storage.reset_client()
    if CONFIG.metrics_port:
        metrics.start_server(CONFIG.metrics_port)
    memo["expiry"] = asyncio.create_task(_expire_metrics())


@kopf.on.login()
def login(**kwargs: Any) -> Optional[kopf.ConnectionInfo]:
    info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if info is not None:
        kube.set_connection(info)
    return info


@kopf.on.cleanup()
async def close_client(memo: kopf.Memo, **_: Any) -> None:
    if memo.get("expiry") is not None:
        memo["expiry"].cancel()
    try:
        await kube.client().close()
    except RuntimeError:
        pass


def _plain(body: Any) -> dict:
    return {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec", "status") if k in body}


@kopf.index(GROUP, VERSION, "datasets")
def datasets_idx(body: kopf.Body, namespace: str, name: str, **_: Any) -> dict:
    return {(namespace, name): _plain(body)}


@kopf.index(GROUP, VERSION, "governancepolicies")
def policies_idx(body: kopf.Body, **_: Any) -> dict:
    return {None: _plain(body)}


@kopf.index("batch", "v1", "jobs", labels=MANAGED)
def jobs_idx(body: kopf.Body, namespace: str, name: str, **_: Any) -> dict:
    return {(namespace, name): decisions.summarize_job(_plain(body))}


@kopf.index("v1", "pods", labels=MANAGED)
def pods_idx(body: kopf.Body, namespace: str, labels: dict, **_: Any) -> dict:
    job = labels.get("batch.kubernetes.io/job-name") or labels.get("job-name")
    return {(namespace, job): decisions.summarize_pod(_plain(body))} if job else {}


def _one(index: Any, key: Any) -> Optional[Any]:
    store = index.get(key) if index is not None else None
    return next(iter(store), None) if store else None


def _job(indices: dict, namespace: str, name: Optional[str]) -> Optional[dict]:
    if not name:
        return None
    found = _one(indices["jobs_idx"], (namespace, name))
    if found is None and (namespace, name) in STATE.created:
        # Created moments ago; the watch has not shown it yet.
        return decisions.summarize_job({"metadata": {"name": name}})
    return found


def _pods(indices: dict, namespace: str, name: Optional[str]) -> list[dict]:
    store = indices["pods_idx"].get((namespace, name)) if name else None
    return list(store or [])


def _with_written_status(body: dict) -> dict:
    uid = body["metadata"].get("uid")
    written = STATE.written.get(uid)
    return {**body, "status": written} if written is not None else body


async def _read_json(uri: str) -> Optional[dict]:
    try:
        return json.loads(await asyncio.to_thread(storage.read_text, uri))
    except FileNotFoundError:
        return None
    except Exception as exc:  # storage trouble must not crash the reconcile loop; retried on the next event
        log.warning("cannot read %s: %s", uri, type(exc).__name__)
        return None


# --- applying a plan -------------------------------------------------------------------------

async def _apply(plan: decisions.Plan, body: dict, logger: Any) -> None:
    client = kube.client()
    ns = body["metadata"].get("namespace")
    for manifest in plan.create:
        outcome = await client.create_or_adopt(manifest)
        STATE.created.add((ns, manifest["metadata"]["name"]))
        logger.info(f"{manifest['kind']} {manifest['metadata']['name']} {outcome}")
    for name in plan.suspend_jobs:
        await client.patch("batch/v1", "Job", ns, name, {"spec": {"suspend": True}})
    for name in plan.delete_jobs:
        # Background propagation: the pod gets SIGTERM and the trainer writes a checkpoint.
        await client.delete("batch/v1", "Job", ns, name, propagation="Background")
        STATE.created.discard((ns, name))
    if plan.alias is not None:
        uri, record = plan.alias
        await asyncio.to_thread(storage.write_text, uri, json.dumps(record, indent=1, sort_keys=True))
    if plan.status is not None:
        old = body.get("status") or {}
        patch = {**plan.status, **{k: None for k in old if k not in plan.status}}
        await client.patch_status(body, patch)
        STATE.written[body["metadata"]["uid"]] = plan.status
    for type_, reason, message in plan.events:
        kopf.event(body, type=type_, reason=reason, message=message[:1000])


# --- Datasets --------------------------------------------------------------------------------

async def reconcile_dataset(namespace: str, name: str, indices: dict, logger: Any,
                            body: Optional[dict] = None) -> bool:
    """Reconcile one Dataset; True when its status changed (jobs waiting for it should look again)."""
    async with STATE.lock(("Dataset", namespace, name)):
        body = body or _one(indices["datasets_idx"], (namespace, name))
        if body is None or body["metadata"].get("deletionTimestamp"):
            return False
        body = _with_written_status(body)
        with metrics.reconcile_timer("Dataset"):
            generation = body["metadata"].get("generation") or 1
            job_name = children.validation_job_name(name, generation)
            job = _job(indices, namespace, job_name)
            pods = _pods(indices, namespace, job_name)
            state = decisions.job_state(job, pods)
            report = None
            if state.state in ("Succeeded", "Failed"):
                try:
                    report = await _read_json(f"{children.dataset_output_uri(body, CONFIG)}/report.json")
                except ValueError:
                    report = None
            plan = decisions.plan_dataset(body, job, pods, report, CONFIG, now_iso())
            await _apply(plan, body, logger)
        if plan.status is None:
            return False
        metrics.dataset_phase(namespace, name, plan.status.get("phase", "Pending"),
                              (plan.status.get("stats") or {}).get("examples"))
        return True


async def _wake_waiting_jobs(namespace: str, dataset: str, indices: dict, logger: Any) -> None:
    """A Dataset changed: reconcile the FineTuneJobs that wait for it (they have no trainer Job yet)."""
    waiting = []
    for (ns, name), ftj in list(STATE.finetunejobs.items()):
        if ns == namespace and ftj["spec"].get("datasetRef", {}).get("name") == dataset:
            if not (_with_written_status(ftj).get("status") or {}).get("trainerJob"):
                waiting.append(name)
    for name in waiting:
        await reconcile_finetunejob(namespace, name, indices, logger)


@kopf.on.event(GROUP, VERSION, "datasets")
async def dataset_event(type: str, body: kopf.Body, namespace: str, name: str, logger: Any, **kwargs: Any) -> None:
    if type == "DELETED":
        STATE.written.pop(body["metadata"].get("uid"), None)
        metrics.forget("Dataset", namespace, name)
        return
    if await reconcile_dataset(namespace, name, kwargs, logger, _plain(body)):
        await _wake_waiting_jobs(namespace, name, kwargs, logger)


# --- FineTuneJobs ----------------------------------------------------------------------------

async def reconcile_finetunejob(namespace: str, name: str, indices: dict, logger: Any,
                                body: Optional[dict] = None, read_progress: bool = False) -> None:
    async with STATE.lock(("FineTuneJob", namespace, name)):
        body = body or STATE.finetunejobs.get((namespace, name))
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        body = _with_written_status(body)
        with metrics.reconcile_timer("FineTuneJob"):
            await _reconcile_finetunejob(body, indices, logger, read_progress)


async def _reconcile_finetunejob(body: dict, indices: dict, logger: Any, read_progress: bool) -> None:
    meta, spec, status = body["metadata"], body["spec"], body.get("status") or {}
    ns, phase = meta.get("namespace"), status.get("phase", "Pending")
    policies = [p for store in indices["policies_idx"].values() for p in store]
    if (phase in ("Succeeded", "Failed") and status.get("observedGeneration") == (meta.get("generation") or 1)
            and not decisions.governance_rerun_due(body, policies, CONFIG)):
        return
    output = spec["output"]["uri"].rstrip("/")
    inputs = decisions.JobInputs(dataset=_one(indices["datasets_idx"], (ns, spec["datasetRef"]["name"])))
    if inputs.dataset is not None:
        inputs.dataset = _with_written_status(inputs.dataset)
    trainer = status.get("trainerJob")
    inputs.trainer_job = _job(indices, ns, trainer)
    inputs.trainer_pods = _pods(indices, ns, trainer)
    state = decisions.job_state(inputs.trainer_job, inputs.trainer_pods)
    if phase in ("Queued", "Training") and (read_progress or state.state in ("Running", "Succeeded")):
        inputs.progress = await _read_json(f"{output}/progress.json")
    adapter_digest = (status.get("adapter") or {}).get("digest")
    adapter_uri = (status.get("adapter") or {}).get("uri")
    if state.state == "Succeeded" and phase in ("Queued", "Training"):
        inputs.result = await _read_json(f"{output}/result.json")
        if inputs.result:
            adapter_digest, adapter_uri = inputs.result.get("digest"), inputs.result.get("adapterURI")
    if adapter_digest and adapter_uri:
        run = decisions.governance_run(body, status.get("governance") or {}, adapter_uri, adapter_digest,
                                       policies, CONFIG)
        inputs.governance_job = _job(indices, ns, run.job_name)
        inputs.governance_pods = _pods(indices, ns, run.job_name)
        gov_state = decisions.job_state(inputs.governance_job, inputs.governance_pods)
        if gov_state.state in ("Succeeded", "Failed") or phase in ("AwaitingApproval", "Failed"):
            inputs.report = await _read_json(run.report_uri)
            if inputs.report is not None:
                from finetune_trainer import adapter as adapter_mod

                inputs.manifest_ok = await asyncio.to_thread(adapter_mod.verify, adapter_uri)
    inputs.policies = policies
    plan = decisions.plan_finetunejob(body, inputs, CONFIG, now_iso())
    await _apply(plan, body, logger)
    new = plan.status
    if new is None:
        return
    metrics.job_phase(ns, meta["name"], new.get("phase", "Pending"))
    if new.get("gpuHours"):
        metrics.gpu_hours(ns, meta["name"], new["gpuHours"])
    runs = int((new.get("governance") or {}).get("runs") or 0)
    if runs > int((status.get("governance") or {}).get("runs") or 0):
        metrics.governance_run("first" if runs == 1 else "policy_change")
    if new.get("phase") != phase:
        eval_loss = (new.get("progress") or {}).get("evalLoss")
        if new.get("phase") == "Evaluating" and eval_loss is not None:
            metrics.final_eval_loss(ns, meta["name"], eval_loss)
        promo = new.get("promotion") or {}
        if new.get("phase") in ("Succeeded", "AwaitingApproval", "Failed") and promo.get("state"):
            outcome = {"Promoted": "promoted", "AwaitingApproval": "awaiting_approval"}.get(promo["state"], "blocked")
            metrics.promotion(outcome)
            for check in (new.get("governance") or {}).get("checks") or []:
                metrics.governance_check(check["name"], bool(check.get("passed")))


@kopf.on.event(GROUP, VERSION, "finetunejobs")
async def finetunejob_event(type: str, body: kopf.Body, namespace: str, name: str, logger: Any,
                            **kwargs: Any) -> None:
    if type == "DELETED":
        STATE.written.pop(body["metadata"].get("uid"), None)
        STATE.locks.pop(("FineTuneJob", namespace, name), None)
        STATE.finetunejobs.pop((namespace, name), None)
        metrics.forget("FineTuneJob", namespace, name)
        return
    plain = _plain(body)
    STATE.finetunejobs[(namespace, name)] = plain
    written = STATE.written.get(body["metadata"].get("uid"))
    if (written is not None and dict(body.get("status") or {}) == written
            and written.get("observedGeneration") == (body["metadata"].get("generation") or 1)):
        return  # the echo of our own status patch: nothing new to act on
    await reconcile_finetunejob(namespace, name, kwargs, logger, plain)


GOVERNED_PHASES = ("Evaluating", "AwaitingApproval", "Failed")


@kopf.on.event(GROUP, VERSION, "governancepolicies")
async def policy_event(logger: Any, **kwargs: Any) -> None:
    """A GovernancePolicy changed (Kopf updated the policies index first): the jobs whose
    governance is running, waiting or failed look again; a changed effective policy re-runs
    their checks (decisions.governance_run). Promoted jobs keep their result."""
    for (ns, name), ftj in list(STATE.finetunejobs.items()):
        status = _with_written_status(ftj).get("status") or {}
        if status.get("phase") in GOVERNED_PHASES and (status.get("governance") or {}).get("runs"):
            await reconcile_finetunejob(ns, name, kwargs, logger)


def _training(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") == "Training"


@kopf.timer(GROUP, VERSION, "finetunejobs", interval=min(CONFIG.progress_interval, 30.0), when=_training)
async def refresh_progress(namespace: str, name: str, logger: Any, **kwargs: Any) -> None:
    """Progress (and GPU-hours) from the trainer's progress.json while it trains."""
    await reconcile_finetunejob(namespace, name, kwargs, logger, read_progress=True)


def _has_checkpoints_to_delete(spec: kopf.Spec, status: kopf.Status, **_: Any) -> bool:
    # Only once training started can checkpoints exist: before that no finalizer is needed.
    return bool(status.get("startTime")) and (spec.get("output") or {}).get("checkpointsOnDelete", "Delete") == "Delete"


@kopf.on.delete(GROUP, VERSION, "finetunejobs", when=_has_checkpoints_to_delete)
async def delete_checkpoints(spec: kopf.Spec, logger: Any, **_: Any) -> None:
    """Remove the run's checkpoints; adapters (and so any promoted adapter) are never touched."""
    uri = storage.join(spec["output"]["uri"], "checkpoints")
    await asyncio.to_thread(storage.delete_prefix, uri)
    logger.info(f"deleted checkpoints under {uri}")


# --- owned Jobs and pods ---------------------------------------------------------------------

async def _owner_event(namespace: str, labels: dict, indices: dict, logger: Any) -> None:
    if labels.get(children.ROLE) == "validation" and labels.get(children.DATASET_LABEL):
        dataset = labels[children.DATASET_LABEL]
        if await reconcile_dataset(namespace, dataset, indices, logger):
            await _wake_waiting_jobs(namespace, dataset, indices, logger)
    elif labels.get(children.JOB_LABEL):
        await reconcile_finetunejob(namespace, labels[children.JOB_LABEL], indices, logger)


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED)
async def job_event(type: str, name: str, namespace: str, labels: dict, logger: Any, **kwargs: Any) -> None:
    if type == "DELETED":
        STATE.created.discard((namespace, name))
    elif (namespace, name) in STATE.created and not kwargs["body"].get("status"):
        return  # the echo of our own create: the Job has not started, nothing to act on
    await _owner_event(namespace, labels, kwargs, logger)


@kopf.on.event("v1", "pods", labels=MANAGED)
async def pod_event(namespace: str, labels: dict, logger: Any, **kwargs: Any) -> None:
    await _owner_event(namespace, labels, kwargs, logger)
