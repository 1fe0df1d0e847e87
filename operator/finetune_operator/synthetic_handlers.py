"""Kopf handlers of SyntheticDatasets: read what the plan needs, call synthesis_plan, apply.

Wake-ups: the object's own events (an edit, or `ftctl review`'s `finetune.dev/reviewed-at`
annotation); its Jobs and pods (label finetune.dev/syntheticdataset); its seed and child Datasets and
its generator FineTuneJob (handlers.py calls `wake`); and, while people review, a poll of the work
folder every `progress_interval` seconds (decisions written by anyone, with any tool, count).
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional

import kopf

from finetune_trainer import storage

from . import handlers as h
from . import metrics, synthesis_plan
from .api.meta import GROUP, VERSION
from .api.synthetic import ReviewStats, SyntheticDataset
from .conditions import now_iso
from .governance import policy_eval_sets

KIND = "SyntheticDataset"
#: Immutable once written (a run's generation.json and review.json): read once per operator process.
_FILES: dict[str, dict] = {}
_POLLS: dict[tuple, asyncio.Task] = {}
_BODIES: dict[tuple[str, str], dict] = {}


def _fresh(body: Optional[dict]) -> Optional[dict]:
    return h._with_written_status(body) if body is not None else None


async def _read_once(uri: str) -> Optional[dict]:
    if uri not in _FILES:
        found = await h._read_json(uri)
        if found is None:
            return None
        if len(_FILES) > 1024:
            _FILES.clear()
        _FILES[uri] = found
    return _FILES[uri]


async def reconcile(namespace: str, name: str, indices: dict, logger: Any, body: Optional[dict] = None) -> None:
    key = (KIND, namespace, name)
    try:
        await _reconcile(namespace, name, indices, logger, body)
    except Exception as exc:
        async def again() -> None:
            await reconcile(namespace, name, indices, logger)
        h._retry_later(key, again, logger, exc, body or _BODIES.get((namespace, name)))
        return
    h._succeeded(key)


async def _reconcile(namespace: str, name: str, indices: dict, logger: Any, body: Optional[dict]) -> None:
    async with h.STATE.lock((KIND, namespace, name)):
        body = body or _BODIES.get((namespace, name))
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        body = h._with_written_status(body)
        with metrics.reconcile_timer(KIND):
            try:
                sd = SyntheticDataset.model_validate(body)
            except ValueError as exc:  # the API server validated it; an older CRD may not have
                logger.warning(f"SyntheticDataset {namespace}/{name} does not parse: {str(exc)[:300]}")
                return
            spec = sd.spec
            # The status we wrote last, not the index's copy: a wake-up comes right after our own patch of
            # the seed (or the generator), before its watch event has reached the index.
            seed = _fresh(h._one(indices["datasets_idx"], (namespace, spec.seed.dataset)))
            generator = _fresh(h.STATE.finetunejobs.get((namespace, spec.generator.fineTuneJob or "")))
            policies = [p for store in indices["policies_idx"].values() for p in store]
            resolved = synthesis_plan.resolve(sd, seed, generator, policy_eval_sets(policies, namespace))
            inputs = synthesis_plan.SyntheticInputs(seed=seed, generator_job=generator)
            if resolved[0] is not None:
                try:
                    work = synthesis_plan.work_uri(sd, resolved[0], h.CONFIG)
                except ValueError:
                    work = None
                if work is not None:
                    await _read_run(work, sd, name, namespace, indices, inputs)
            plan = synthesis_plan.plan_synthetic(body, inputs, resolved, h.CONFIG, now_iso())
            await h._apply(plan, body, logger)
        status = plan.status or body.get("status") or {}
        metrics.synthetic_phase(namespace, name, status.get("phase", "Pending"),
                                (status.get("review") or {}).get("pending"))
        _poll_if_reviewing(namespace, name, status, indices, logger)


async def _read_run(work: str, sd: SyntheticDataset, name: str, namespace: str, indices: dict,
                    inputs: synthesis_plan.SyntheticInputs) -> None:
    run = work.rsplit("-", 1)[-1]
    for job_name in synthesis_plan.job_names(name, run):
        inputs.jobs[job_name] = h._job(indices, namespace, job_name)
        inputs.pods[job_name] = h._pods(indices, namespace, job_name)
    inputs.report = await _read_once(storage.join(work, synthesis_plan.GENERATION_FILE))
    if inputs.report is None or not inputs.report.get("kept"):
        return
    inputs.finalized = await _read_once(storage.join(work, synthesis_plan.REVIEW_FILE))
    if inputs.finalized is not None:
        inputs.review = ReviewStats.model_validate({k: v for k, v in inputs.finalized.items()
                                                    if k in ReviewStats.model_fields})
        inputs.dataset = _fresh(h._one(indices["datasets_idx"], (namespace, name)))
    else:
        # One LIST and a GET per new decision (review_store caches nothing across processes: cheap
        # enough at the poll interval; see finetune_trainer/review.py).
        from finetune_trainer import review as review_store

        inputs.review = await asyncio.to_thread(review_store.summarize, work, sd.spec.review)


def _poll_if_reviewing(namespace: str, name: str, status: dict, indices: dict, logger: Any) -> None:
    key = (namespace, name)
    if status.get("phase") != "Reviewing":
        task = _POLLS.pop(key, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        return
    if key in _POLLS and not _POLLS[key].done():
        return

    async def poll() -> None:
        await asyncio.sleep(h.CONFIG.progress_interval)
        _POLLS.pop(key, None)
        await reconcile(namespace, name, indices, logger)

    _POLLS[key] = asyncio.create_task(poll())


def wake(namespace: str, *, dataset: Optional[str] = None, finetunejob: Optional[str] = None) -> list[str]:
    """The SyntheticDatasets a Dataset (seed or child) or a FineTuneJob (generator) change concerns."""
    found = []
    for (ns, name), body in list(_BODIES.items()):
        spec = body.get("spec") or {}
        if ns != namespace:
            continue
        if dataset is not None and (dataset == name or (spec.get("seed") or {}).get("dataset") == dataset):
            found.append(name)
        if finetunejob is not None and (spec.get("generator") or {}).get("fineTuneJob") == finetunejob:
            found.append(name)
    return found


async def wake_and_reconcile(namespace: str, indices: dict, logger: Any, **what: Optional[str]) -> None:
    for name in wake(namespace, **what):
        await reconcile(namespace, name, indices, logger)


@kopf.on.event(GROUP, VERSION, "syntheticdatasets")
async def synthetic_event(type: str, body: kopf.Body, namespace: str, name: str, logger: Any, **kwargs: Any) -> None:
    key = (namespace, name)
    if type == "DELETED":
        _BODIES.pop(key, None)
        h.STATE.written.pop(body["metadata"].get("uid"), None)
        h._cancel_retry((KIND, namespace, name))
        h.STATE.retries.pop((KIND, namespace, name), None)
        task = _POLLS.pop(key, None)
        if task is not None:
            task.cancel()
        metrics.forget(KIND, namespace, name)
        return
    plain = h._plain(body)
    _BODIES[key] = plain
    written = h.STATE.written.get(body["metadata"].get("uid"))
    if (written is not None and dict(body.get("status") or {}) == written
            and written.get("observedGeneration") == (body["metadata"].get("generation") or 1)
            and type != "ADDED" and not _annotation_changed(plain)):
        return  # the echo of our own status patch
    await reconcile(namespace, name, kwargs, logger, plain)


_REVIEWED_AT: dict[str, str] = {}


def _annotation_changed(body: dict) -> bool:
    """`ftctl review` bumps finetune.dev/reviewed-at after decisions: look at the work folder now."""
    uid = body["metadata"].get("uid") or ""
    value = (body["metadata"].get("annotations") or {}).get("finetune.dev/reviewed-at", "")
    changed = _REVIEWED_AT.get(uid, "") != value
    _REVIEWED_AT[uid] = value
    return changed


__all__ = ["reconcile", "wake", "wake_and_reconcile", "synthetic_event"]
