"""Kopf handlers: observe, call decisions, apply the plan. Nothing is decided here.

Reconciliation is level-triggered. Every watch event of a FineTuneJob, a Dataset, or a Job
or pod the operator owns leads to one `reconcile_*` call for the owning object, serialized
per object. State comes from Kopf's in-memory indices of Datasets, policies, Jobs and pods
(Kopf runs no handler before they are filled, so a restarted operator sees its existing Jobs)
and from the FineTuneJob events themselves: no extra reads per event. Deterministic child names
plus create-or-adopt mean a restart never duplicates a Job.

API writes on the happy path until Training: one Job, one ConfigMap (created in that order),
one status patch and one Event per FineTuneJob (no Kopf bookkeeping: on-event handlers store no
state and Kopf's change detection is off). When training starts: our finalizer (a JSON patch,
before the status patch that records the start) and Kopf's own finalizer for the progress timer
(Kopf's patch; Kopf removes it when training ends). On deletion, once checkpoints are deleted:
our finalizer is removed (after Kopf has removed its own, if it was still there).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from typing import Any, Awaitable, Callable, Optional

import aiohttp
import kopf

from finetune_trainer import storage

from . import attestation, children, config as config_mod, decisions, kube, lineage, metrics
from .serving import plan as serving_plan, publish as serving_publish
from .api.meta import GROUP, VERSION
from .conditions import bounded, now_iso
from .governance import policy_eval_sets

log = logging.getLogger("finetune_operator")

CONFIG = config_mod.load()
# Ours, managed by hand (see _ensure_finalizer): guards the checkpoint cleanup once training started.
FINALIZER = f"{GROUP}/cleanup"
# Kopf's own, only for its progress timer while a FineTuneJob trains (Kopf blocks deletion until
# the timer is stopped). A different name, so Kopf never removes ours.
KOPF_FINALIZER = f"{GROUP}/kopf"
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
        # Our finalizer patches, by uid: (the finalizers the object had, whether ours was added),
        # so events that predate the patch's echo do not repeat it.
        self.finalizing: dict[str, tuple[tuple, bool]] = {}
        # FineTuneJobs being deleted whose checkpoints are already deleted.
        self.cleaned: set[str] = set()
        # Events being posted in the background (see _post_events), a few at a time.
        self.event_tasks: set[asyncio.Task] = set()
        self.event_slots = asyncio.Semaphore(8)
        # Reconciles that failed and wait to run again (see _retry_later), and how often they failed.
        self.retry_tasks: dict[tuple, asyncio.Task] = {}
        self.retries: dict[tuple, int] = {}
        # Set when RBAC forbids the admission dry run of Job pods (see _apply): not tried again.
        self.no_dry_run = False
        # Pod-template shapes admitted by a dry run, with when that answer expires (see _admit).
        self.admitted: dict[str, float] = {}
        self.admitting: dict[str, asyncio.Future] = {}  # dry runs in flight, by shape
        # The report-verifying keys and when they were read (see _keyring); namespaces whose Job
        # NetworkPolicy is in place (see _ensure_network_policy).
        self.keyring: Optional[attestation.Keyring] = None
        self.keyring_at = 0.0
        self.keyring_lock = asyncio.Lock()
        self.network_policies: set[str] = set()

    def lock(self, key: tuple) -> asyncio.Lock:
        return self.locks.setdefault(key, asyncio.Lock())


STATE = _State()


class _NoChangeDetection(kopf.AnnotationsDiffBaseStorage):
    """Kopf computes a diff of every watch event's body against a stored essence (a deep copy of
    the object) for change-detecting handlers (on.create/update/resume/delete, idle timers). We
    register none -- every handler is level-triggered -- so the essence is empty and nothing is
    stored. tests/test_handlers_registry.py keeps it that way."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> Optional[kopf.BodyEssence]:
        return kopf.BodyEssence()

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        pass


# --- startup, login, indices -----------------------------------------------------------------

async def _expire_metrics() -> None:
    """Drop per-job metric series some time after the job finished (metrics.py keeps the retention)."""
    while True:
        await asyncio.sleep(60)
        metrics.expire()


class _NoEventHandlerSuccessLines(logging.Filter):
    """Kopf logs "Handler 'x' succeeded." at INFO after every handler call: for our on-event
    handlers that is a JSON line per watch event saying nothing (a failure is still logged)."""

    LINES = {f"Handler '{h}' succeeded." for h in ("finetunejob_event", "dataset_event", "job_event", "pod_event",
                                                     "policy_event")} | {"Timer 'refresh_progress' succeeded."}

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg in self.LINES)


_QUIET = _NoEventHandlerSuccessLines()


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    global CONFIG, STATE
    CONFIG = config_mod.load()
    STATE = _State()
    settings.persistence.finalizer = KOPF_FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = _NoChangeDetection(prefix=GROUP, key="last-handled")
    if _QUIET not in logging.getLogger("kopf.objects").filters:
        logging.getLogger("kopf.objects").addFilter(_QUIET)
    settings.posting.level = logging.WARNING  # Kopf's own log lines are not Events; ours are posted explicitly
    # Our resources are known: no cluster-wide CRD discovery. But Kopf also expands namespace globs
    # (FINETUNE_NAMESPACES=team-*) by that scan: with it off, a glob silently serves nothing.
    settings.scanning.disabled = not config_mod.has_namespace_patterns(CONFIG.namespaces)
    settings.posting.reporting_component = "finetune-operator"
    _EVENTS_REPORTER.update(component=settings.posting.reporting_component,
                            instance=settings.posting.reporting_instance)
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
    if info is not None and info.server == "https://kubernetes.default.svc":
        import dataclasses
        import os

        # Kopf's service-account login hard-codes the Service's DNS name; in-cluster clients
        # (client-go, the kubernetes package) use the address the kubelet sets, no DNS needed.
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        if host and port:
            info = dataclasses.replace(info, server=f"https://{f'[{host}]' if ':' in host else host}:{port}")
    if info is not None:
        kube.set_connection(info)
    return info


@kopf.on.cleanup()
async def close_client(memo: kopf.Memo, **_: Any) -> None:
    if memo.get("expiry") is not None:
        memo["expiry"].cancel()
    for task in list(STATE.retry_tasks.values()):  # the next operator start reconciles everything anyway
        task.cancel()
    if STATE.event_tasks:  # let pending Events go out
        await asyncio.wait(list(STATE.event_tasks), timeout=5)
    try:
        await kube.client().close()
    except RuntimeError:
        pass


def _plain(body: Any) -> dict:
    return {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec", "status") if k in body}


# Index (and all other) handlers are coroutines: Kopf runs plain functions in a thread pool, a thread
# hop per event.
@kopf.index(GROUP, VERSION, "datasets")
async def datasets_idx(body: kopf.Body, namespace: str, name: str, **_: Any) -> dict:
    return {(namespace, name): _plain(body)}


@kopf.index(GROUP, VERSION, "governancepolicies")
async def policies_idx(body: kopf.Body, **_: Any) -> dict:
    return {None: _plain(body)}


@kopf.index("batch", "v1", "jobs", labels=MANAGED)
async def jobs_idx(body: kopf.Body, namespace: str, name: str, **_: Any) -> dict:
    return {(namespace, name): decisions.summarize_job(_plain(body))}


@kopf.index("v1", "pods", labels=MANAGED)
async def pods_idx(body: kopf.Body, namespace: str, labels: dict, **_: Any) -> dict:
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


_MODEL_CONFIGS: dict[str, Optional[dict]] = {}


async def _model_config(base_uri: str) -> Optional[dict]:
    """The base model's config.json (memoized per URI; None when the operator cannot read it)."""
    if base_uri not in _MODEL_CONFIGS:
        found = await _read_json(f"{base_uri.rstrip('/')}/config.json")
        if found is None:
            return None  # unreadable now (or never): no plan, and asked again next time
        if len(_MODEL_CONFIGS) > 256:
            _MODEL_CONFIGS.clear()
        _MODEL_CONFIGS[base_uri] = found
    return _MODEL_CONFIGS[base_uri]


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
    # Jobs before their ConfigMaps: the Job (and its pod's scheduling) starts a round trip sooner, and
    # a pod waits for its ConfigMap volume to exist (the kubelet retries the mount). After a crash in
    # between, the status has no record of the Job yet, so the next reconcile creates or adopts both.
    outcomes = []
    for manifest in sorted(plan.create, key=lambda m: m["kind"] != "Job"):
        where = manifest["metadata"].get("namespace") or ns  # governance Jobs: the operator's namespace
        if manifest["kind"] == "Job" and (where, manifest["metadata"]["name"]) not in STATE.created:
            await _ensure_network_policy(client, where)
            await _admit(client, manifest)
        outcome = await client.create_or_adopt(manifest)
        STATE.created.add((where, manifest["metadata"]["name"]))
        outcomes.append(f"{manifest['kind']} {manifest['metadata']['name']} {outcome}")
    if outcomes:
        logger.info(", ".join(outcomes))  # one line per reconcile
    for api_version, kind, name, obj_patch in plan.patches:
        await client.patch(api_version, kind, ns, name, obj_patch)
    for name in plan.suspend_jobs:
        await client.patch("batch/v1", "Job", ns, name, {"spec": {"suspend": True}})
    for name, job_patch in plan.job_patches.items():
        await client.patch("batch/v1", "Job", ns, name, job_patch)
    for name in plan.delete_jobs:
        # Background propagation: the pod gets SIGTERM and the trainer writes a checkpoint.
        await client.delete("batch/v1", "Job", ns, name, propagation="Background")
        STATE.created.discard((ns, name))
    for name in plan.delete_governance_jobs:
        await client.delete("batch/v1", "Job", CONFIG.namespace, name, propagation="Background")
        STATE.created.discard((CONFIG.namespace, name))
    if plan.model_card is not None:  # before the alias: a promoted adapter always has its card
        await asyncio.to_thread(storage.write_text, *plan.model_card)
    if plan.alias is not None:
        uri, record = plan.alias
        await asyncio.to_thread(storage.write_text, uri, json.dumps(record, indent=1, sort_keys=True))
    if plan.status is not None:
        old = body.get("status") or {}
        patch = {**plan.status, **{k: None for k in old if k not in plan.status}}
        await client.patch_status(body, patch, parse=False)
        STATE.written[body["metadata"]["uid"]] = plan.status
    if plan.events:
        _post_events(body, plan.events)


async def _ensure_network_policy(client: Any, namespace: str) -> None:
    """The Job pods' NetworkPolicy in `namespace`, once per operator process (created, or brought back
    to what this configuration says: an edited or loosened copy is overwritten)."""
    if not CONFIG.job_network_policy or namespace in STATE.network_policies:
        return
    policy = children.job_network_policy(namespace, CONFIG)
    try:
        if await client.create_or_adopt(policy) == "adopted":
            await client.patch("networking.k8s.io/v1", "NetworkPolicy", namespace, policy["metadata"]["name"],
                               {"metadata": {"labels": policy["metadata"]["labels"]}, "spec": policy["spec"]})
    except kube.ApiError as exc:
        if not decisions.rbac_denied(exc.message):
            raise
        # RBAC without networkpolicies (an older chart): the Jobs still run, without the policy.
        log.warning("cannot manage the Job NetworkPolicy in %s: %s", namespace, exc.message[:300])
    STATE.network_policies.add(namespace)


def _signed_by_unknown_key(report: Any, keys: Optional[attestation.Keyring]) -> bool:
    signatures = report.get("signatures") if isinstance(report, dict) else None
    ids = {s.get("keyid") for s in signatures if isinstance(s, dict)} if isinstance(signatures, list) else set()
    return bool(ids) and keys is not None and not ids & set(keys.trusted)


#: How often the verifying keys are read again: a rotation is seen within this time.
KEYRING_REFRESH_SECONDS = 60.0


async def _keyring(refresh: bool = False) -> attestation.Keyring:
    """The keys governance reports are signed and verified with: the signing Secret in the operator's
    namespace, created with a new Ed25519 key on first use (or a local folder, config.signing_keys_dir).
    Only public keys stay in memory; the private key is for the governance Job's volume."""
    import time

    async with STATE.keyring_lock:
        if (not refresh and STATE.keyring is not None
                and time.monotonic() - STATE.keyring_at < KEYRING_REFRESH_SECONDS):
            return STATE.keyring
        if CONFIG.signing_keys_dir:
            from pathlib import Path

            ring = attestation.Keyring.from_folder(Path(CONFIG.signing_keys_dir))
        else:
            ring = await _signing_secret_keyring()
        STATE.keyring = attestation.Keyring(trusted=dict(ring.trusted))
        STATE.keyring_at = time.monotonic()
        return STATE.keyring


async def _signing_secret_keyring() -> attestation.Keyring:
    client = kube.client()
    secret = await client.get("v1", "Secret", CONFIG.namespace, CONFIG.signing_secret)
    if secret is None:
        import base64

        key = attestation.generate_key()
        body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": CONFIG.signing_secret, "namespace": CONFIG.namespace,
                             "labels": {children.MANAGED_BY: children.OPERATOR}},
                "data": {attestation.SIGNING_KEY: base64.b64encode(attestation.private_pem(key)).decode()}}
        try:
            await client.request("POST", kube.path_of("v1", "Secret", CONFIG.namespace), body, parse=False)
            log.info("created the report signing key %s in Secret %s/%s", attestation.key_id(key.public_key()),
                     CONFIG.namespace, CONFIG.signing_secret)
        except kube.ApiError as exc:
            if exc.status != 409:  # 409: another replica created it first
                raise
        secret = await client.get("v1", "Secret", CONFIG.namespace, CONFIG.signing_secret)
    return attestation.Keyring.from_secret_data((secret or {}).get("data") or {})


#: How long a dry run's "admitted" stands for other Jobs of the same pod-template shape. A PriorityClass
#: or policy removed meanwhile is noticed on the next shape check, at most this much later.
ADMITTED_FOR_SECONDS = 300.0


async def _admit(client: Any, job: dict) -> None:
    """Dry-run the Job's pod unless a pod of the same shape in the same namespace was admitted in the
    last ADMITTED_FOR_SECONDS: a refusal raises (the FineTuneJob fails with the server's words), and
    1,000 jobs of one template cost one dry run, not 1,000 (the benchmark measured 1.4-2.3x the
    floor with a dry run per Job)."""
    if not CONFIG.admission_check or STATE.no_dry_run:
        return
    shape, loop = children.pod_template_shape(job), asyncio.get_running_loop()
    if STATE.admitted.get(shape, 0.0) > loop.time():
        return
    # Reconciles of many new jobs run at once: the first of a shape asks, the others wait for its
    # answer (a refusal is raised in each of them: each FineTuneJob fails with the server's words).
    asking = STATE.admitting.get(shape)
    if asking is None:
        asking = STATE.admitting[shape] = asyncio.ensure_future(client.admit_pod_template(job))
        asking.add_done_callback(lambda _: STATE.admitting.pop(shape, None))
    try:
        await asyncio.shield(asking)
    except kube.ApiError as exc:
        if not (exc.status == 403 and decisions.rbac_denied(exc.message)):
            # The server's answer, about this job's Job (the shared request named the first one's).
            raise kube.ApiError(exc.status, exc.body, f"Job {job['metadata']['name']} (its pod template)") from None
        # An older chart's Role without `create` on pods: the check is an extra, not a gate.
        STATE.no_dry_run = True
        log.warning("no admission dry run of Job pods: the operator may not create pods (%s)", exc.message[:300])
        return
    now = loop.time()
    if len(STATE.admitted) > 10_000:  # shapes are few; this only bounds memory against odd churn
        STATE.admitted = {k: t for k, t in STATE.admitted.items() if t > now}
    STATE.admitted[shape] = now + ADMITTED_FOR_SECONDS


# --- Events ----------------------------------------------------------------------------------

_EVENTS_REPORTER = {"component": "finetune-operator", "instance": "dev"}  # from Kopf's settings at startup


def _post_events(body: dict, events: list[tuple[str, str, str]]) -> None:
    """Post a plan's Events in the background, in order, through our client (Kopf's poster costs
    ~0.5 ms of CPU per Event: a task per object and its own API machinery). Like Kopf's, a failed
    Event is retried a few times, then logged and dropped: Events are auxiliary."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat()  # MicroTime, as Kopf writes it
    task = asyncio.create_task(_post_events_now(body, events, now))
    STATE.event_tasks.add(task)
    task.add_done_callback(STATE.event_tasks.discard)


async def _post_events_now(body: dict, events: list[tuple[str, str, str]], now: str) -> None:
    client = kube.client()
    async with STATE.event_slots:
        for type_, reason, message in events:
            event = kube.event_body(body, type_, reason, bounded(message), _EVENTS_REPORTER["component"],
                                    _EVENTS_REPORTER["instance"], now)
            for delay in (1, 2, 4, None):
                try:
                    await client.request("POST", kube.path_of("v1", "Event", event["metadata"]["namespace"]), event,
                                         parse=False)
                    break
                except (kube.ApiError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    if delay is None or (isinstance(exc, kube.ApiError) and exc.status < 500):
                        log.warning("cannot post Event %s for %s: %s", reason, body["metadata"].get("name"), exc)
                        break
                    await asyncio.sleep(delay)


# --- retries ---------------------------------------------------------------------------------

RETRY_DELAYS = (1, 2, 5, 10, 30, 60)


def _retry_later(key: tuple, again: Callable[[], Awaitable[Any]], logger: Any, exc: Exception,
                 body: Optional[dict] = None) -> None:
    """Kopf does not retry on-event handlers: a reconcile that failed (the API server or storage
    answered with an error) runs again after a growing delay, until it succeeds. Without this, an
    object whose last event found trouble would wait for an event that may never come. The first
    failure of a streak is also a Warning Event on the object, so `kubectl describe` says why it
    does not move."""
    attempt = STATE.retries.get(key, 0)
    STATE.retries[key] = attempt + 1
    delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
    message = f"reconcile failed ({type(exc).__name__}: {str(exc)[:300]}); retrying in {delay}s"
    logger.warning(message)
    if attempt == 0 and body is not None:
        _post_events(body, [("Warning", "ReconcileError", message)])
    _cancel_retry(key)

    async def run() -> None:
        await asyncio.sleep(delay)
        STATE.retry_tasks.pop(key, None)
        await again()

    STATE.retry_tasks[key] = asyncio.create_task(run())


def _cancel_retry(key: tuple) -> None:
    task = STATE.retry_tasks.pop(key, None)
    if task is not None and task is not asyncio.current_task():
        task.cancel()


def _succeeded(key: tuple) -> None:
    STATE.retries.pop(key, None)


# --- Datasets --------------------------------------------------------------------------------

async def reconcile_dataset(namespace: str, name: str, indices: dict, logger: Any,
                            body: Optional[dict] = None) -> bool:
    """Reconcile one Dataset; True when its status changed (jobs waiting for it should look again)."""
    key = ("Dataset", namespace, name)
    try:
        changed = await _reconcile_dataset(namespace, name, indices, logger, body)
    except Exception as exc:
        async def again() -> None:
            if await reconcile_dataset(namespace, name, indices, logger):
                await _wake_waiting_jobs(namespace, name, indices, logger)

        current = body or _one(indices["datasets_idx"], (namespace, name))
        if (isinstance(exc, kube.ApiError) and decisions.permanent_api_error(exc.status, exc.message)
                and current is not None):
            # The same request would fail the same way: Failed for this generation (see plan_rejected).
            _cancel_retry(key)
            _succeeded(key)
            try:
                async with STATE.lock(key):
                    current = _with_written_status(current)
                    logger.warning(f"{exc.what or 'a request'} rejected by the API server (HTTP {exc.status}): "
                                   f"{exc.message[:500]}; not retried until the spec changes")
                    await _apply(decisions.plan_rejected(current, exc.what or "a child object", exc.message,
                                                         now_iso()), current, logger)
                return True
            except Exception as again_exc:
                exc = again_exc
        _retry_later(key, again, logger, exc, current)
        return False
    _succeeded(key)
    return changed


async def _reconcile_dataset(namespace: str, name: str, indices: dict, logger: Any, body: Optional[dict]) -> bool:
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
            policies = [p for store in indices["policies_idx"].values() for p in store]
            plan = decisions.plan_dataset(body, job, pods, report, CONFIG, now_iso(),
                                          eval_set_uris=policy_eval_sets(policies, namespace))
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
        replay = ((ftj["spec"].get("training") or {}).get("replay") or {}).get("datasets") or []
        if ns == namespace and (ftj["spec"].get("datasetRef", {}).get("name") == dataset or dataset in replay):
            if not (_with_written_status(ftj).get("status") or {}).get("trainerJob"):
                waiting.append(name)
    for name in waiting:
        await reconcile_finetunejob(namespace, name, indices, logger)
    # ... and the SyntheticDatasets it is the seed (or the result) of.
    await synthetic_handlers.wake_and_reconcile(namespace, indices, logger, dataset=dataset)


@kopf.on.event(GROUP, VERSION, "datasets")
async def dataset_event(type: str, body: kopf.Body, namespace: str, name: str, logger: Any, **kwargs: Any) -> None:
    if type == "DELETED":
        STATE.written.pop(body["metadata"].get("uid"), None)
        metrics.forget("Dataset", namespace, name)
        _cancel_retry(("Dataset", namespace, name))
        STATE.retries.pop(("Dataset", namespace, name), None)
        return
    if await reconcile_dataset(namespace, name, kwargs, logger, _plain(body)):
        await _wake_waiting_jobs(namespace, name, kwargs, logger)


# --- FineTuneJobs ----------------------------------------------------------------------------

async def reconcile_finetunejob(namespace: str, name: str, indices: dict, logger: Any,
                                body: Optional[dict] = None, read_progress: bool = False) -> None:
    key = ("FineTuneJob", namespace, name)
    try:
        async with STATE.lock(key):
            body = body or STATE.finetunejobs.get((namespace, name))
            if body is None or body["metadata"].get("deletionTimestamp"):
                return
            body = _with_written_status(body)
            with metrics.reconcile_timer("FineTuneJob"):
                await _reconcile_finetunejob(body, indices, logger, read_progress)
    except Exception as exc:  # the retry reads the latest body (STATE.finetunejobs)
        if isinstance(exc, kube.ApiError) and decisions.permanent_api_error(exc.status, exc.message):
            # Retrying the same request can only fail the same way: Failed until the spec changes.
            await _rejected(key, exc, indices, logger)
            return
        _retry_later(key, lambda: reconcile_finetunejob(namespace, name, indices, logger), logger, exc,
                     STATE.finetunejobs.get((namespace, name)))
        return
    _succeeded(key)


async def _rejected(key: tuple, exc: "kube.ApiError", indices: dict, logger: Any) -> None:
    _, namespace, name = key
    _cancel_retry(key)
    _succeeded(key)
    try:
        async with STATE.lock(key):
            body = STATE.finetunejobs.get((namespace, name))
            if body is None or body["metadata"].get("deletionTimestamp"):
                return
            body = _with_written_status(body)
            plan = decisions.plan_rejected(body, exc.what or "a child object", exc.message, now_iso())
            logger.warning(f"{exc.what or 'a request'} rejected by the API server (HTTP {exc.status}): "
                           f"{exc.message[:500]}; not retried until the spec changes")
            await _apply(plan, body, logger)
            if plan.status is not None:
                metrics.job_phase(namespace, name, "Failed")
    except Exception as again:  # e.g. the status patch itself failed: back to the retry loop
        _retry_later(key, lambda: reconcile_finetunejob(namespace, name, indices, logger), logger, again,
                     STATE.finetunejobs.get((namespace, name)))


async def _reconcile_finetunejob(body: dict, indices: dict, logger: Any, read_progress: bool) -> None:
    meta, spec, status = body["metadata"], body["spec"], body.get("status") or {}
    ns, phase = meta.get("namespace"), status.get("phase", "Pending")
    policies = [p for store in indices["policies_idx"].values() for p in store]
    if (phase in ("Succeeded", "Failed") and status.get("observedGeneration") == (meta.get("generation") or 1)
            and not decisions.governance_rerun_due(body, policies, CONFIG) and not _serving_due(body, status)):
        return
    output = spec["output"]["uri"].rstrip("/")
    inputs = decisions.JobInputs(dataset=_one(indices["datasets_idx"], (ns, spec["datasetRef"]["name"])))
    if inputs.dataset is not None:
        inputs.dataset = _with_written_status(inputs.dataset)
    trainer = status.get("trainerJob")
    if not trainer and phase in ("Pending", "WaitingForDataset", "Failed"):
        inputs.model_config = await _model_config(spec["baseModel"]["uri"])  # the memory plan (memory_plan.py)
    inputs.trainer_job = _job(indices, ns, trainer)
    inputs.trainer_pods = _pods(indices, ns, trainer)
    state = decisions.job_state(inputs.trainer_job, inputs.trainer_pods)
    if phase in ("Queued", "Training") and (read_progress or state.state in ("Running", "Succeeded")):
        inputs.progress = await _read_json(f"{output}/progress.json")
    adapter_digest = (status.get("adapter") or {}).get("digest")
    adapter_uri = (status.get("adapter") or {}).get("uri")
    if state.state == "Succeeded" and phase in ("Queued", "Training", "Suspended"):
        inputs.result = await _read_json(f"{output}/result.json")
        if inputs.result:
            adapter_digest, adapter_uri = inputs.result.get("digest"), inputs.result.get("adapterURI")
    if adapter_digest and adapter_uri:
        run = decisions.governance_run(body, status.get("governance") or {}, adapter_uri, adapter_digest,
                                       policies, CONFIG)
        inputs.keys = await _keyring()  # also makes sure the governance Job's key Secret exists
        inputs.governance_job = _job(indices, CONFIG.namespace, run.job_name)
        inputs.governance_pods = _pods(indices, CONFIG.namespace, run.job_name)
        gov_state = decisions.job_state(inputs.governance_job, inputs.governance_pods)
        if gov_state.state in ("Succeeded", "Failed") or phase in ("AwaitingApproval", "Failed"):
            inputs.report = await _read_json(run.report_uri)
            if _signed_by_unknown_key(inputs.report, inputs.keys):
                inputs.keys = await _keyring(refresh=True)  # rotated moments ago: read the Secret again
            if inputs.report is not None:
                from finetune_trainer import adapter as adapter_mod

                inputs.manifest_ok = await asyncio.to_thread(adapter_mod.verify, adapter_uri)
    inputs.policies = policies
    if phase in ("Evaluating", "AwaitingApproval", "Failed", "Succeeded") and adapter_digest:
        # What the alias points at now: a promotion keeps it in the new record's history, a rollback
        # goes back to it. Storage trouble raises (the reconcile is retried): a history is never dropped.
        inputs.alias_current = await _read_alias(decisions.alias_uri_of(body))
    if (spec.get("initFrom") or (spec.get("training") or {}).get("replay")) and not adapter_digest:
        inputs.continual = await _continual_inputs(body, indices)
    plan = decisions.plan_finetunejob(body, inputs, CONFIG, now_iso())
    if plan.status is not None:
        await _ensure_finalizer(body, plan.status, logger)  # before the status says training started
    await _apply(plan, body, logger)
    await _publish(body, plan.status if plan.status is not None else status, indices, logger)
    new = plan.status
    if new is None:
        return
    if new.get("phase") == "Succeeded" and phase != "Succeeded":  # a promotion: children may wait for it
        task = asyncio.create_task(_wake_children(ns, meta["name"], indices, logger))
        STATE.event_tasks.add(task)
        task.add_done_callback(STATE.event_tasks.discard)
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


def _serving_due(body: dict, status: dict) -> bool:
    try:
        return bool(serving_plan.due(decisions.promotion_targets(body["spec"]), status, now_iso()))
    except ValueError:  # a spec the API server accepted but our models do not: nothing to publish
        return False


async def _read_alias(uri: Optional[str]) -> Optional[dict]:
    if not uri:
        return None
    try:
        record = json.loads(await asyncio.to_thread(storage.read_text, uri))
    except FileNotFoundError:
        return None
    except ValueError:
        log.warning("alias record %s is not JSON; treated as empty", uri)
        return None
    return record if isinstance(record, dict) else None


async def _publish(body: dict, status: dict, indices: dict, logger: Any) -> None:
    """Publish to the serving targets that are due; a failing one is tried again after its backoff."""
    meta = body["metadata"]
    new, events = await serving_publish.run(kube.client(), body, status, CONFIG, now_iso())
    if new is None:
        return
    old = body.get("status") or {}
    await kube.client().patch_status(body, {**new, **{k: None for k in old if k not in new}}, parse=False)
    STATE.written[meta["uid"]] = new
    _post_events(body, events)
    kinds = {e.get("name"): e.get("kind") for e in (new.get("promotion") or {}).get("targets") or []}
    for _, reason, message in events:  # "target <name>: ..."
        name = message.split(":", 1)[0].removeprefix("target ")
        if kinds.get(name):
            metrics.serving_publish(kinds[name], {"Published": "published", "Unpublished": "unpublished"}.get(
                reason, "failed"))
    wake = serving_plan.next_wakeup(new)
    if wake:
        key = ("Publish", meta.get("namespace"), meta["name"])
        delay = max(1.0, (datetime.datetime.fromisoformat(wake.replace("Z", "+00:00"))
                          - datetime.datetime.now(datetime.timezone.utc)).total_seconds())
        _cancel_retry(key)

        async def again() -> None:
            await asyncio.sleep(delay)
            STATE.retry_tasks.pop(key, None)
            await reconcile_finetunejob(meta.get("namespace"), meta["name"], indices, logger)

        STATE.retry_tasks[key] = asyncio.create_task(again())
        logger.info(f"serving target(s) failing; next attempt in {delay:.0f}s")
async def _continual_inputs(body: dict, indices: dict) -> lineage.ContinualInputs:
    """What spec.initFrom and training.replay need observed: the replay Datasets, and (until
    status.lineage records it) the parent: its FineTuneJob or alias record, its manifest, its files."""
    ns, spec = body["metadata"].get("namespace"), body["spec"]
    found = lineage.ContinualInputs()
    for name in ((spec.get("training") or {}).get("replay") or {}).get("datasets") or []:
        ds = _one(indices["datasets_idx"], (ns, name))
        found.replay_datasets[name] = lineage.typed_dataset(_with_written_status(ds) if ds else None)
    job = lineage.typed_job(body)
    if job is None or job.spec.initFrom is None or lineage.parent_from_status(job) is not None:
        return found
    if lineage.replay_data(job.spec, found.replay_datasets)[1]:
        return found  # waiting for a replay Dataset anyway: the parent is read and hashed once they are Ready
    parent_job, record = None, None
    if job.spec.initFrom.fineTuneJob is not None:
        parent = STATE.finetunejobs.get((ns, job.spec.initFrom.fineTuneJob.name))
        parent_job = lineage.typed_job(_with_written_status(parent)) if parent else None
    elif job.spec.initFrom.alias is not None:
        record = await _read_json(lineage.alias_location(job.spec))
    found.resolution = lineage.resolve_init_from(job.spec, parent_job, record)
    if found.resolution.state == "Resolved":
        from finetune_trainer import adapter as adapter_mod

        uri = found.resolution.parent.uri
        try:
            raw = await asyncio.to_thread(storage.read_bytes_limited, storage.join(uri, adapter_mod.MANIFEST),
                                          adapter_mod.MANIFEST_MAX_BYTES)
            found.manifest_digest = lineage.manifest_digest(raw)
            found.manifest = json.loads(raw)
        except (FileNotFoundError, ValueError) as exc:  # missing, too large or not JSON: the plan says why
            why = "missing" if isinstance(exc, FileNotFoundError) else "not a valid manifest"
            found.verified = (False, f"{uri}/{adapter_mod.MANIFEST}: {why}")
            return found
        # Other errors (S3 unreachable) propagate: the reconcile is retried, the job does not fail.
        found.verified = await asyncio.to_thread(adapter_mod.verify, uri)
    return found


async def _wake_children(namespace: str, parent: str, indices: dict, logger: Any) -> None:
    """A FineTuneJob was promoted: reconcile the jobs whose spec.initFrom waits for it (by name, or by
    an alias, which only a promotion writes) and that have not resolved their parent yet."""
    waiting = []
    for (ns, name), ftj in list(STATE.finetunejobs.items()):
        init = ftj["spec"].get("initFrom") or {}
        if ns != namespace or not init or (_with_written_status(ftj).get("status") or {}).get("lineage"):
            continue
        if (init.get("fineTuneJob") or {}).get("name") == parent or init.get("alias"):
            waiting.append(name)
    for name in waiting:
        await reconcile_finetunejob(namespace, name, indices, logger)


@kopf.on.event(GROUP, VERSION, "finetunejobs")
async def finetunejob_event(type: str, body: kopf.Body, namespace: str, name: str, logger: Any,
                            **kwargs: Any) -> None:
    if type == "DELETED":
        STATE.written.pop(body["metadata"].get("uid"), None)
        STATE.finalizing.pop(body["metadata"].get("uid"), None)
        STATE.cleaned.discard(body["metadata"].get("uid"))
        STATE.locks.pop(("FineTuneJob", namespace, name), None)
        STATE.finetunejobs.pop((namespace, name), None)
        _cancel_retry(("FineTuneJob", namespace, name))
        STATE.retries.pop(("FineTuneJob", namespace, name), None)
        metrics.forget("FineTuneJob", namespace, name)
        return
    plain = _plain(body)
    STATE.finetunejobs[(namespace, name)] = plain
    async with STATE.lock(("FineTuneJob", namespace, name)):
        if body["metadata"].get("deletionTimestamp"):
            await _finalize(plain, logger)
            return
        await _ensure_finalizer(plain, _with_written_status(plain).get("status") or {}, logger)
    written = STATE.written.get(body["metadata"].get("uid"))
    if (written is not None and dict(body.get("status") or {}) == written
            and written.get("observedGeneration") == (body["metadata"].get("generation") or 1)):
        return  # the echo of our own status patch: nothing new to act on
    await reconcile_finetunejob(namespace, name, kwargs, logger, plain)
    # A generator whose adapter was just promoted: the SyntheticDatasets waiting for it.
    await synthetic_handlers.wake_and_reconcile(namespace, kwargs, logger, finetunejob=name)


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


# --- the checkpoint finalizer (hand-managed: no Kopf on.delete handler, so no Kopf change detection)

def _deletes_checkpoints(body: dict) -> bool:
    return (body["spec"].get("output") or {}).get("checkpointsOnDelete", "Delete") == "Delete"


async def _patch_finalizers(body: dict, add: bool, logger: Any) -> bool:
    """Add or remove our finalizer with a JSON patch guarded by the resourceVersion (other
    finalizers are left alone). False on a conflict or if the object is gone: a newer event follows."""
    meta = body["metadata"]
    current = list(meta.get("finalizers") or [])
    if add:
        ops = [{"op": "add", "path": "/metadata/finalizers/-" if current else "/metadata/finalizers",
                "value": FINALIZER if current else [FINALIZER]}]
    else:
        index = current.index(FINALIZER)
        ops = [{"op": "test", "path": f"/metadata/finalizers/{index}", "value": FINALIZER},
               {"op": "remove", "path": f"/metadata/finalizers/{index}"}]
    if meta.get("resourceVersion"):
        ops.insert(0, {"op": "test", "path": "/metadata/resourceVersion", "value": meta["resourceVersion"]})
    path = kube.path_of(body.get("apiVersion") or f"{GROUP}/{VERSION}", "FineTuneJob", meta.get("namespace"),
                        meta["name"])
    try:
        await kube.client().request("PATCH", path, ops, "application/json-patch+json")
    except kube.ApiError as exc:
        if exc.status in (404, 409, 422):
            logger.debug(f"finalizer patch not applied ({exc}); waiting for a newer event")
            return False
        raise
    STATE.finalizing[meta["uid"]] = (tuple(current), add)
    return True


async def _ensure_finalizer(body: dict, status: dict, logger: Any) -> None:
    """Once training has started, checkpoints may exist: block deletion until they are deleted.
    Called before the status patch that records the start, and on every event (level-triggered)."""
    meta = body["metadata"]
    current = tuple(meta.get("finalizers") or [])
    wanted = bool(status.get("startTime")) and _deletes_checkpoints(body)
    if wanted == (FINALIZER in current) or meta.get("deletionTimestamp"):
        return
    if STATE.finalizing.get(meta["uid"]) == (current, wanted):
        return  # patched already; this event predates the patch's echo
    await _patch_finalizers(body, wanted, logger)


async def _finalize(body: dict, logger: Any) -> None:
    """The FineTuneJob is being deleted: delete its checkpoints (never its adapters: a promoted
    adapter outlives its job) unless checkpointsOnDelete is Retain, then release it."""
    meta = body["metadata"]
    finalizers = meta.get("finalizers") or []
    if FINALIZER not in finalizers:
        return
    if _deletes_checkpoints(body) and meta["uid"] not in STATE.cleaned:
        uri = storage.join(body["spec"]["output"]["uri"], "checkpoints")
        delay = 1.0
        while True:  # storage trouble: retry; the object stays blocked meanwhile
            try:
                await asyncio.to_thread(storage.delete_prefix, uri)
                break
            except Exception as exc:
                logger.warning(f"cannot delete checkpoints under {uri}: {type(exc).__name__}; retrying in {delay:.0f} s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
        STATE.cleaned.add(meta["uid"])
        logger.info(f"deleted checkpoints under {uri}")
    await _delete_governance_jobs(meta)
    if KOPF_FINALIZER in finalizers:
        return  # Kopf releases its own first (it stops the progress timer); its patch's echo comes back here
    await _patch_finalizers(body, False, logger)


async def _delete_governance_jobs(meta: dict) -> None:
    """The FineTuneJob's governance Jobs live in the operator's namespace, where no owner reference
    can reach: delete them with it (finished ones also expire on their own)."""
    if not meta.get("uid"):
        return
    client = kube.client()
    selector = f"{children.JOB_UID_LABEL}={meta['uid']}"
    found = await client.request("GET", kube.path_of("batch/v1", "Job", CONFIG.namespace),
                                 params={"labelSelector": selector})
    for job in (found or {}).get("items") or []:
        await client.delete("batch/v1", "Job", CONFIG.namespace, job["metadata"]["name"], propagation="Background")


# --- owned Jobs and pods ---------------------------------------------------------------------

async def _owner_event(namespace: str, labels: dict, indices: dict, logger: Any) -> None:
    if labels.get(synthesis_plan.SYNTHETIC_LABEL) and labels.get(children.ROLE) in synthesis_plan.ROLES:
        await synthetic_handlers.reconcile(namespace, labels[synthesis_plan.SYNTHETIC_LABEL], indices, logger)
    elif labels.get(children.ROLE) == "validation" and labels.get(children.DATASET_LABEL):
        dataset = labels[children.DATASET_LABEL]
        if await reconcile_dataset(namespace, dataset, indices, logger):
            await _wake_waiting_jobs(namespace, dataset, indices, logger)
    elif labels.get(children.JOB_LABEL):
        if labels.get(children.ROLE) == "governance":  # runs in the operator's namespace
            if namespace != CONFIG.namespace:
                return  # not ours: only the operator's namespace holds governance Jobs
            namespace = labels.get(children.JOB_NAMESPACE_LABEL) or namespace
        await reconcile_finetunejob(namespace, labels[children.JOB_LABEL], indices, logger)


def _not_our_create_echo(type: str, body: kopf.Body, name: str, namespace: str, **_: Any) -> bool:
    # The echo of our own create (the Job has not started): nothing to act on. As a filter, Kopf
    # skips the handler invocation altogether.
    return type == "DELETED" or (namespace, name) not in STATE.created or bool(body.get("status"))


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED, when=_not_our_create_echo)
async def job_event(type: str, name: str, namespace: str, labels: dict, logger: Any, **kwargs: Any) -> None:
    if type == "DELETED":
        STATE.created.discard((namespace, name))
    await _owner_event(namespace, labels, kwargs, logger)


@kopf.on.event("v1", "pods", labels=MANAGED)
async def pod_event(namespace: str, labels: dict, logger: Any, **kwargs: Any) -> None:
    await _owner_event(namespace, labels, kwargs, logger)


# Registered last: they use the indices and helpers above.
from . import synthesis_plan, synthetic_handlers  # noqa: E402
# FederatedFineTuneJobs: their handlers register with Kopf on import (federation_handlers.py).
from . import federation_handlers  # noqa: E402,F401
