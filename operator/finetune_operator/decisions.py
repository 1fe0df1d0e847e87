"""What to do next: pure functions from observed state to a Plan.

Handlers gather the observations (the object, its Dataset, its Jobs and their pods, the
records the trainer wrote to storage) and apply the Plan; every rule lives here and is
tested without a cluster. A Plan is idempotent: applying it twice creates nothing twice
(deterministic names, create-or-adopt) and a status that is already right is not patched.
"""

from __future__ import annotations

import copy
import datetime
import functools
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from . import (children, curation_status, gang, governance, image_status, lineage, memory_plan, modelcard, kstatus,
               preemption)
from .api.serving import PromotionTarget
from .serving import plan as serving_plan
from .conditions import bounded, get_condition, set_condition
from .config import OperatorConfig

# --- observations of Jobs and pods --------------------------------------------------------

IMAGE_PULL_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
OOM_ADVICE = ("the trainer ran out of memory (OOMKilled); use method qlora (4-bit base model), a smaller "
              "training.batchSize (with more gradientAccumulationSteps), a shorter maxSeqLength, or "
              "enable training.gradientCheckpointing")
GPU_HOURS_BEFORE = "finetune.dev/gpu-hours-before"


def summarize_pod(pod: dict) -> dict:
    """The few facts about a pod that decisions need (kept in the operator's in-memory index)."""
    status = pod.get("status") or {}
    scheduled = get_condition(status.get("conditions") or [], "PodScheduled") or {}
    summary: dict[str, Any] = {"name": pod["metadata"]["name"], "phase": status.get("phase", "Pending"),
                               "unschedulable": None, "waiting": None, "terminated": None,
                               "disrupted": bool(get_condition(status.get("conditions") or [], "DisruptionTarget"))}
    if scheduled.get("status") == "False" and scheduled.get("reason", "Unschedulable") == "Unschedulable":
        # The scheduler's own verdict, e.g. "0/2 nodes are available: 1 Insufficient nvidia.com/gpu, ...".
        # Other reasons (SchedulingGated: Kueue or another controller holds the pod back) are not a
        # scheduling failure: the pod simply waits.
        summary["unschedulable"] = scheduled.get("message") or "the scheduler found no node for the pod"
    elif scheduled.get("status") == "False" and scheduled.get("reason"):
        summary["gated"] = scheduled["reason"]
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        last = cs.get("lastState") or {}
        if "waiting" in state and state["waiting"].get("reason") in IMAGE_PULL_REASONS:
            summary["waiting"] = {"reason": state["waiting"]["reason"], "message": state["waiting"].get("message", "")}
        term = state.get("terminated") or last.get("terminated")
        if term:
            summary["terminated"] = {"reason": term.get("reason", ""), "exitCode": term.get("exitCode"),
                                     "message": bounded(term.get("message") or "", 512)}
    return summary


def summarize_job(job: dict) -> dict:
    status = job.get("status") or {}
    meta = job["metadata"]
    conds = {c["type"]: c for c in status.get("conditions") or [] if c.get("status") == "True"}
    return {"name": meta["name"], "active": status.get("active", 0) or 0, "ready": status.get("ready", 0) or 0,
            "succeeded": status.get("succeeded", 0) or 0, "failed": status.get("failed", 0) or 0,
            "complete": "Complete" in conds or "SuccessCriteriaMet" in conds,
            "failedCondition": conds.get("Failed") or conds.get("FailureTarget"),
            "startTime": status.get("startTime"), "completionTime": status.get("completionTime"),
            "suspended": bool((job.get("spec") or {}).get("suspend")),
            "parallelism": int((job.get("spec") or {}).get("parallelism") or 1),
            "suspendedAt": (conds.get("Suspended") or {}).get("lastTransitionTime"),
            "gpuHoursBefore": float((meta.get("annotations") or {}).get(GPU_HOURS_BEFORE, 0) or 0)}


@dataclass(frozen=True)
class JobState:
    """Missing | Pending | Unschedulable | ImagePull | Running | Succeeded | Failed."""

    state: str
    reason: str = ""
    message: str = ""
    oom: bool = False

    def __post_init__(self) -> None:  # pod, Job and scheduler messages end up in status and Events
        object.__setattr__(self, "message", bounded(self.message))


def job_state(job: Optional[dict], pods: list[dict]) -> JobState:
    """Read a Job (summary) and its pods (summaries) into one state with the reason a person needs."""
    if job is None:
        return JobState("Missing")
    oom = any((p.get("terminated") or {}).get("reason") == "OOMKilled" for p in pods)
    if job["complete"]:
        return JobState("Succeeded", "Completed", f"Job {job['name']} completed")
    config_error = any((p.get("terminated") or {}).get("exitCode") == children.EXIT_CONFIG_ERROR for p in pods)
    if oom:
        return JobState("Failed", "OOMKilled", OOM_ADVICE, oom=True)
    if job["failedCondition"]:
        cond = job["failedCondition"]
        if config_error or cond.get("reason") == "PodFailurePolicy":
            said = next((p["terminated"].get("message") for p in pods if (p.get("terminated") or {}).get("message")), "")
            return JobState("Failed", "ConfigurationError",
                            f"the trainer exited with the configuration-error code {children.EXIT_CONFIG_ERROR}; "
                            + (f"retrying will not help: {said.strip()}" if said else
                               "retrying will not help (see the pod log for the field or line at fault)"))
        return JobState("Failed", cond.get("reason") or "JobFailed", cond.get("message") or f"Job {job['name']} failed")
    for p in pods:
        if p.get("waiting"):
            w = p["waiting"]
            return JobState("ImagePull", w["reason"], f"the image cannot be pulled ({w['reason']}): {w['message']}".rstrip(": "))
    if job["active"] and any(p.get("phase") == "Running" for p in pods):
        return JobState("Running", "Running", f"Job {job['name']} is running")
    for p in pods:
        if p.get("unschedulable") and p.get("phase") == "Pending":
            return JobState("Unschedulable", "Unschedulable", f"pod cannot be scheduled: {p['unschedulable']}")
    if job["active"] and job.get("ready"):
        return JobState("Running", "Running", f"Job {job['name']} is running")
    if job["suspended"]:
        return JobState("Pending", "JobSuspended", f"Job {job['name']} is suspended (waiting for admission)")
    for p in pods:
        if p.get("gated") and p.get("phase") == "Pending":
            return JobState("Pending", p["gated"], f"Job {job['name']}'s pod is held back from scheduling "
                                                   f"({p['gated']})")
    return JobState("Pending", "Pending", f"Job {job['name']} is waiting for its pod to start")


# --- plans ---------------------------------------------------------------------------------

@dataclass
class Plan:
    status: Optional[dict] = None  # the full new status, or None when nothing changes
    create: list[dict] = field(default_factory=list)  # manifests, created in order (ConfigMap before Job)
    delete_jobs: list[str] = field(default_factory=list)  # deleted with background propagation
    delete_governance_jobs: list[str] = field(default_factory=list)  # in the operator's namespace
    suspend_jobs: list[str] = field(default_factory=list)
    job_patches: dict[str, dict] = field(default_factory=dict)  # Job name -> merge patch (suspend/resume)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    alias: Optional[tuple[str, dict]] = None  # (uri, record) to write before the status patch
    model_card: Optional[tuple[str, str]] = None  # (uri, Markdown) to write before the alias
    patches: list[tuple[str, str, str, dict]] = field(default_factory=list)  # (apiVersion, kind, name, merge patch)


def _finish(old: dict, new: dict, plan: Plan) -> Plan:
    if new != old:
        plan.status = new
    return plan


def _with_kstatus(kind: Optional[str] = None):
    """Decorate a plan_* function: its status gets the kstatus conditions (Ready, Reconciling,
    Stalled) derived from the phase it chose, on every return path (kstatus.conditions_for).
    `kind` None: the object's own kind (plan_rejected serves both)."""
    def decorate(plan_fn):
        @functools.wraps(plan_fn)
        def planned(obj: dict, *args: Any, **kwargs: Any) -> Plan:
            plan = plan_fn(obj, *args, **kwargs)
            now = kwargs["now"] if "now" in kwargs else args[-1]  # every plan_* takes `now` last
            which = kind or ("Dataset" if obj.get("kind") == "Dataset" else "FineTuneJob")
            plan.status = kstatus.with_conditions(which, obj, plan.status, now)
            return plan
        return planned
    return decorate


def _parse_time(value: Optional[str]) -> Optional[datetime.datetime]:
    if not value:
        return None
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


# --- Dataset -------------------------------------------------------------------------------

MAX_LINE_NUMBERS = 20


@_with_kstatus("Dataset")
def plan_dataset(dataset: dict, validation_job: Optional[dict], pods: list[dict], report: Optional[dict],
                 config: OperatorConfig, now: str, *, eval_set_uris: tuple[str, ...] = ()) -> Plan:
    """Validate each generation of a Dataset once: Validating -> Ready | Invalid | Failed.
    `eval_set_uris`: the evalSetURI of the policies that apply (decontaminated against)."""
    meta = dataset["metadata"]
    generation = meta.get("generation") or 1
    old = dataset.get("status") or {}
    status = copy.deepcopy(old)
    plan = Plan()
    conds = status.get("conditions") or []
    if old.get("observedGeneration") == generation and old.get("phase") in ("Ready", "Invalid", "Failed"):
        return plan
    name = children.validation_job_name(meta["name"], generation)
    try:
        output = children.dataset_output_uri(dataset, config)
    except ValueError as exc:
        status.update(phase="Failed", observedGeneration=generation, message=bounded(exc))
        status["conditions"] = set_condition(conds, "Ready", False, "NoOutputLocation", str(exc), generation, now)
        plan.events.append(("Warning", "NoOutputLocation", bounded(exc)))
        return _finish(old, status, plan)
    state = job_state(validation_job, pods)

    def to_phase(phase: str, ready: bool, reason: str, message: str) -> None:
        message, reason = bounded(message), bounded(reason, 128)  # the report is shaped by the user's data
        status.update(phase=phase, message=message, validationJob=name)
        if phase != "Validating":
            status["observedGeneration"] = generation
        status["conditions"] = set_condition(status.get("conditions") or [], "Ready", ready, reason, message,
                                             generation, now)
        if old.get("phase") != phase or old.get("validationJob") != name:
            plan.events.append(("Normal" if phase in ("Validating", "Ready") else "Warning", reason, message))

    if state.state == "Missing":
        plan.create.extend(children.validation_children(dataset, config, eval_set_uris))
        to_phase("Validating", False, "Validating", f"validation Job {name} created")
    elif state.state in ("Pending", "Running", "Unschedulable", "ImagePull"):
        msg = state.message if state.state in ("Unschedulable", "ImagePull") else f"validation Job {name} is running"
        to_phase("Validating", False, "Validating" if state.state in ("Pending", "Running") else state.reason, msg)
    elif report is not None:
        stats = report.get("stats") or {}
        status["stats"] = {k: int(stats.get(k) or 0) for k in
                           ("examples", "evalExamples", "tokens", "duplicatesRemoved", "invalidLines")}
        curated = curation_status.curation_stats(stats.get("curation"))
        if curated is not None:
            status["stats"]["curation"] = curated
        images = image_status.image_stats(stats.get("images"))  # format image-text
        if images is not None:
            status["stats"]["images"] = images
        status["piiFindings"] = dict(report.get("piiFindings") or {})
        status["invalidLineNumbers"] = list(report.get("invalidLineNumbers") or [])[:MAX_LINE_NUMBERS]
        status["reportURI"] = f"{output}/report.json"
        minimum = ((dataset["spec"].get("curation") or {}).get("minExamples") or 10)
        if report.get("valid") and status["stats"]["examples"] < minimum:
            report = {**report, "valid": False, "reason": "TooFewExamples",
                      "message": f"{status['stats']['examples']} valid examples; minExamples is {minimum}"}
        if report.get("valid"):
            if report.get("digest"):
                status["digest"] = report["digest"]
            status["validatedURI"] = report.get("validatedURI") or output
            to_phase("Ready", True, "Validated",
                     f"{status['stats']['examples']} examples ({status['stats']['evalExamples']} for evaluation)")
            recommended = (dataset["spec"].get("curation") or {}).get("recommendedExamples", 5000)
            status["conditions"] = curation_status.with_small_dataset(
                status["conditions"], status["stats"]["examples"], recommended, generation, now)
        else:
            status.pop("digest", None)
            lines = status["invalidLineNumbers"]
            # Room for the line numbers after a long message: they say where to look.
            message = bounded(report.get("message") or "the data is invalid", 900)
            if lines and not re.search(rf"\b{int(lines[0])}\b", message):  # unless the message names it
                message += f" (first offending lines: {', '.join(map(str, lines[:5]))})"
            to_phase("Invalid", False, report.get("reason") or "Invalid", message)
            status["conditions"] = curation_status.without_small_dataset(status["conditions"])
    elif state.state == "Succeeded":
        to_phase("Failed", False, "NoReport", f"validation Job {name} succeeded but wrote no report.json at {output}")
    else:
        to_phase("Failed", False, state.reason, f"validation Job {name} failed: {state.message}")
    return _finish(old, status, plan)


# --- children the API server rejects ---------------------------------------------------------

#: Failed condition reason of a FineTuneJob whose child the API server refused (retried on a new generation).
REJECTED = "JobRejected"

#: Words of a server message -> the FineTuneJob field that fills that part of the pod template.
_FIELD_HINTS = (
    ("priorityclass", "spec.resources.priorityClassName"),
    ("affinity", "spec.resources.affinity"),
    ("toleration", "spec.resources.tolerations"),
    ("nodeselector", "spec.resources.gpuNodeSelector"),
    ("queue-name", "spec.resources.queueName"),
    ("image", "spec.image"),
    ("activedeadlineseconds", "spec.activeDeadlineSeconds"),
    ("backofflimit", "spec.backoffLimit"),
    ("resources.requests", "spec.resources (cpu, memory, gpusPerNode)"),
    ("resources.limits", "spec.resources (cpu, memory, gpusPerNode)"),
    ("metadata.labels", "metadata.name (label values are at most 63 characters)"),
)


def permanent_api_error(status: int, message: str) -> bool:
    """Whether an API error answering one of our writes will repeat until the spec changes.

    400/413/422 (the object is invalid) and an admission plugin's 403 (no such PriorityClass, a
    PodSecurity violation, a policy webhook) are permanent: retrying the same request forever only
    hammers the server. Transient: conflicts (409), throttling (429), server errors (5xx), 401/404,
    an exceeded ResourceQuota (frees up when other work finishes) and RBAC denials (the operator's
    own permissions; fixed by an admin, not by the spec)."""
    if status in (400, 413, 422):
        return True
    if status == 403:
        text = message.lower()
        return not ("exceeded quota" in text or rbac_denied(message) or "being terminated" in text)
    return False


def rbac_denied(message: str) -> bool:
    """A 403 from RBAC (the operator's own permissions: `User "..." cannot create resource ...`),
    as opposed to one from an admission plugin about the object."""
    return " cannot " in message and "resource" in message


def rejected_fields(message: str) -> list[str]:
    """The FineTuneJob fields a server message about a child's pod template points at (a hint; the
    server's own message, with its pod-template field path, is kept verbatim)."""
    text = message.lower().replace("_", "")
    found: list[str] = []
    for word, field_name in _FIELD_HINTS:
        if word in text and field_name not in found:
            found.append(field_name)
    return found


@_with_kstatus()
def plan_rejected(ftj: dict, what: str, server_message: str, now: str) -> Plan:
    """A child (`what`, e.g. "Job j-train-1") of a FineTuneJob or Dataset was refused by the API
    server with a permanent error: Failed, with the server's message and the fields to look at, and
    a Warning Event. Nothing is retried until the spec changes (plan_finetunejob and plan_dataset
    act again on a new generation)."""
    meta = ftj["metadata"]
    generation = meta.get("generation") or 1
    old = ftj.get("status") or {}
    status = copy.deepcopy(old)
    fields_ = rejected_fields(server_message)
    hint = f" (check {', '.join(fields_)})" if fields_ else ""
    message = bounded(f"the API server rejected {what}: {bounded(server_message, 600)}{hint}; "
                      "fix the spec: a changed spec retries")
    status.update(phase="Failed", message=message, observedGeneration=generation)
    if ftj.get("kind") == "Dataset":  # Failed for this generation; plan_dataset validates the next one
        status["conditions"] = set_condition(status.get("conditions") or [], "Ready", False, REJECTED, message,
                                             generation, now)
    else:
        status.setdefault("completionTime", now)
        status["conditions"] = set_condition(status.get("conditions") or [], "Failed", True, REJECTED, message,
                                             generation, now)
    plan = Plan()
    if old.get("phase") != "Failed" or old.get("message") != message:
        plan.events.append(("Warning", REJECTED, message))
    return _finish(old, status, plan)


# --- FineTuneJob ---------------------------------------------------------------------------

ACTIVE_PHASES = ("Queued", "Training")


@dataclass
class JobInputs:
    """What a FineTuneJob reconcile observed, besides the object itself."""

    dataset: Optional[dict] = None  # the Dataset object (spec + status), or None if it does not exist
    trainer_job: Optional[dict] = None  # summary of the current attempt's Job
    trainer_pods: list[dict] = field(default_factory=list)
    governance_job: Optional[dict] = None
    governance_pods: list[dict] = field(default_factory=list)
    progress: Optional[dict] = None  # progress.json
    result: Optional[dict] = None  # result.json (read once the trainer Job succeeded)
    report: Optional[dict] = None  # this run's signed report (read once the governance Job finished)
    keys: Optional[governance.attestation.Keyring] = None  # the keys a report must be signed with
    manifest_ok: Optional[tuple[bool, str]] = None  # adapter.verify(adapterURI)
    policies: list[dict] = field(default_factory=list)  # GovernancePolicy objects
    alias_current: Optional[dict] = None  # the alias record as stored now (read before an alias write)
    continual: Optional[lineage.ContinualInputs] = None  # spec.initFrom / training.replay observations
    model_config: Optional[dict] = None  # the base model's config.json (read before a trainer Job is created)


def progress_fields(record: Optional[dict]) -> Optional[dict]:
    if not record:
        return None
    keys = ("step", "totalSteps", "epoch", "percent", "loss", "evalLoss", "tokensPerSecond", "etaSeconds", "updatedAt")
    out = {k: record[k] for k in keys if record.get(k) is not None}
    if "percent" in out:
        out["percent"] = max(0, min(100, int(out["percent"])))
    return out


def gpu_hours(ftj: dict, job: Optional[dict], now: str) -> Optional[float]:
    """GPU-hours: earlier attempts (recorded on the Job) plus this attempt's running time times the
    GPUs its pods hold: gpusPerNode per pod, as many pods as the Job runs (its parallelism: `nodes`
    for a multi-node gang, 1 otherwise; never `nodes` for a Job that did not get them)."""
    if job is None or not job.get("startTime"):
        return None
    res = ftj["spec"].get("resources") or {}
    gpus = int(res.get("gpusPerNode", 1)) * gang.pods_held(job)
    end = (_parse_time(job.get("completionTime")) or (job.get("suspended") and _parse_time(job.get("suspendedAt")))
           or _parse_time(now))  # a suspended Job's pods stopped when it was suspended
    hours = max(0.0, (end - _parse_time(job["startTime"])).total_seconds() / 3600.0) * gpus
    return round(job.get("gpuHoursBefore", 0.0) + hours, 4)


def effective_policy(ftj: dict, policies: list[dict], config: OperatorConfig) -> tuple[dict, list[str]]:
    if not policies:
        default = dict(governance.DEFAULT_POLICY)
        if config.default_governance:
            default = {**default, "spec": config.default_governance}
        policies = [default]
    spec, ignored = governance.effective_policy(policies, ftj["metadata"].get("namespace", "default"),
                                                ftj["spec"].get("governance"))
    policy = spec.model_dump(mode="json", exclude_none=True)
    if ftj["spec"].get("initFrom") and "retention" not in policy["required"]:
        policy["required"].append("retention")  # a continual job must not forget what its parent knew
    return policy, ignored


def continual_of(ftj: dict, inputs: JobInputs) -> lineage.ContinualPlan:
    """lineage.continual_plan for a job with spec.initFrom or training.replay (Ready and empty otherwise)."""
    spec = ftj["spec"]
    if not (spec.get("initFrom") or (spec.get("training") or {}).get("replay")):
        return lineage.ContinualPlan("Ready")
    typed = lineage.typed_job(ftj)
    if typed is None:
        return lineage.ContinualPlan("Invalid", "spec.initFrom / training.replay: the spec does not validate",
                                     lineage.INIT_FROM_INVALID)
    return lineage.continual_plan(typed, inputs.continual or lineage.ContinualInputs())


@_with_kstatus("FineTuneJob")
def plan_finetunejob(ftj: dict, inputs: JobInputs, config: OperatorConfig, now: str) -> Plan:
    meta, spec = ftj["metadata"], ftj["spec"]
    generation = meta.get("generation") or 1
    old = ftj.get("status") or {}
    status = copy.deepcopy(old)
    status.setdefault("phase", "Pending")
    status["observedGeneration"] = generation
    plan = Plan()
    phase = old.get("phase", "Pending")

    def cond(type_: str, value: bool | str, reason: str, message: str) -> None:
        status["conditions"] = set_condition(status.get("conditions") or [], type_, value, reason, message,
                                             generation, now)

    def to_phase(new_phase: str, message: str, reason: str = "", warning: bool = False) -> None:
        message = bounded(message)
        status["phase"] = new_phase
        status["message"] = message
        if new_phase in ("Succeeded", "Failed") and not status.get("completionTime"):
            status["completionTime"] = now
        if phase != new_phase:
            plan.events.append(("Warning" if warning else "Normal", reason or new_phase, message))

    def fail(reason: str, message: str) -> None:
        cond("Failed", True, reason, message)
        to_phase("Failed", message, reason, warning=True)

    failed = get_condition(old.get("conditions") or [], "Failed") or {}
    if (phase == "Failed" and failed.get("reason") in (REJECTED, memory_plan.INFEASIBLE) and failed.get("status") == "True"
            and failed.get("observedGeneration") != generation):
        # The API server rejected a child Job made from an earlier spec; this generation may fix it.
        cond("Failed", False, "SpecChanged", f"the spec changed (generation {generation}); trying again")
        status.pop("completionTime", None)
        phase = "Evaluating" if (old.get("adapter") or {}).get("digest") else "Pending"
        status["phase"] = phase
    if phase == "Succeeded":
        _rollback_or_restore(ftj, inputs, status, plan, cond, now)
        return _finish(old, status, plan)
    if phase == "Failed" and not governance_rerun_due(ftj, inputs.policies, config):
        return _finish(old, status, plan)
    if phase in ("AwaitingApproval", "Evaluating", "Failed"):
        return _finish(old, _evaluate(ftj, inputs, config, now, status, plan, cond, to_phase, fail), plan)

    trainer_name = old.get("trainerJob")
    attempt = children.attempt_of(trainer_name)
    state = job_state(inputs.trainer_job, inputs.trainer_pods)

    # Suspend: the trainer Job is suspended in place (Job .spec.suspend): the Job controller deletes
    # its pod, the pod gets SIGTERM and the trainer writes a checkpoint and exits 5 (which the Job's
    # podFailurePolicy ignores). Resuming unsuspends the same Job; its new pod resumes from the
    # checkpoint. A Kueue-queued Job's .spec.suspend belongs to Kueue (admission), so that one is
    # deleted instead and resuming starts the next attempt.
    if spec.get("suspend"):
        live = trainer_name and state.state not in ("Missing", "Succeeded", "Failed")
        hours = gpu_hours(ftj, inputs.trainer_job, now)
        if phase == "Suspended" and old.get("gpuHours") is not None:
            hours = old["gpuHours"]  # frozen while suspended: no GPU is held
        if hours is not None:
            status["gpuHours"] = hours
        if live and (spec.get("resources") or {}).get("queueName"):
            plan.delete_jobs.append(trainer_name)
        elif live and not (inputs.trainer_job or {}).get("suspended"):
            plan.job_patches[trainer_name] = {
                "spec": {"suspend": True},
                # The Job controller restarts .status.startTime on resume: the hours so far go here.
                "metadata": {"annotations": {GPU_HOURS_BEFORE: str(status.get("gpuHours", 0) or 0)}}}
        cond("Suspended", True, "Suspended", "spec.suspend is true")
        to_phase("Suspended", "suspended by spec.suspend; set it to false to resume from the last checkpoint",
                 "Suspended")
        return _finish(old, status, plan)
    if phase == "Suspended":
        cond("Suspended", False, "Resumed", "resumed; the trainer continues from its last checkpoint")
        if trainer_name and state.state not in ("Missing", "Succeeded", "Failed"):
            # Always sent on this transition (idempotent): the Job summary may lag behind our suspend patch.
            plan.job_patches[trainer_name] = {"spec": {"suspend": False}}
            message = f"resumed: trainer Job {trainer_name} continues from its last checkpoint"
            cond("Trained", False, "Queued", message)
            to_phase("Queued", message, "Resumed")
            return _finish(old, status, plan)
        if state.state in ("Succeeded", "Failed"):
            phase = "Training"  # it finished before the suspension took hold: judged below as usual
    if (phase == "Suspended" and state.state == "Missing") or (trainer_name and state.state == "Missing"
                                                               and phase == "Training"):
        # Resume after the Job was deleted (Kueue), or recover from a Job deleted behind our back:
        # a new attempt resumes from the last checkpoint.
        attempt += 1
        trainer_name = None
        state = JobState("Missing")

    dataset = inputs.dataset
    if not trainer_name:
        ds_status = (dataset or {}).get("status") or {}
        ds_name = spec["datasetRef"]["name"]
        if dataset is None:
            cond("DatasetReady", False, "DatasetNotFound", f"Dataset {ds_name} does not exist")
            to_phase("WaitingForDataset", f"waiting for Dataset {ds_name} to exist", "WaitingForDataset")
            return _finish(old, status, plan)
        ds_generation = (dataset.get("metadata") or {}).get("generation") or 1
        if ds_status.get("phase") != "Ready" or ds_status.get("observedGeneration", ds_generation) != ds_generation:
            why = ds_status.get("phase") or "Pending"
            detail = f": {ds_status['message']}" if ds_status.get("message") else ""
            cond("DatasetReady", False, f"Dataset{why}", f"Dataset {ds_name} is {why}{detail}")
            to_phase("WaitingForDataset", f"waiting for Dataset {ds_name} ({why}{detail})", "WaitingForDataset")
            return _finish(old, status, plan)
        cond("DatasetReady", True, "DatasetReady", f"Dataset {ds_name} is Ready ({ds_status.get('digest', '')})")
        cont = continual_of(ftj, inputs)
        if cont.state != "Ready":
            return _finish(old, _continual_not_ready(cont, status, cond, to_phase, fail), plan)
        if cont.lineage is not None:
            status["lineage"] = cont.lineage
            cond("ParentReady", True, "ParentVerified",
                 f"parent adapter {cont.lineage['parentDigest']} ({cont.lineage['source']}) verified")
        checked = memory_plan.check(spec, inputs.model_config, config.termination_grace_seconds)  # before any GPU
        if checked is not None:
            fits, plan_message, status["plan"] = checked
            cond(memory_plan.CONDITION, "Unknown" if fits is None else fits,
                 {True: "Fits", False: memory_plan.INFEASIBLE, None: "Unknown"}[fits], plan_message)
            if fits is False:
                fail(memory_plan.INFEASIBLE, plan_message)
                return _finish(old, status, plan)
        attempt = max(attempt, 1)
        trainer_name = children.trainer_job_name(meta["name"], attempt)
        train_cfg = children.trainer_config(ftj, ds_status.get("validatedURI"), dataset["spec"]["format"],
                                            ds_status.get("digest"), config.progress_interval,
                                            continual=cont.trainer_fields)
        memory_plan.apply(status.get("plan"), spec, train_cfg)
        cm, job = children.trainer_children(ftj, attempt, train_cfg, config)
        memory_plan.apply_to_job(status.get("plan"), job)
        job["metadata"].setdefault("annotations", {})[GPU_HOURS_BEFORE] = str(status.get("gpuHours", 0) or 0)
        plan.create.extend([cm, *gang.gang_objects(job, ftj, config), job])
        status["trainerJob"] = trainer_name
        status["datasetDigest"] = ds_status.get("digest")
        cond("Trained", False, "Queued", f"trainer Job {trainer_name} created")
        to_phase("Queued", f"trainer Job {trainer_name} created (attempt {attempt})", "TrainerJobCreated")
        return _finish(old, status, plan)

    hours = gpu_hours(ftj, inputs.trainer_job, now)
    if hours is not None:
        status["gpuHours"] = hours
    if inputs.progress:
        status["progress"] = progress_fields(inputs.progress)

    if state.state == "Missing":
        # Just created (our cache has not seen it yet) or deleted behind our back: create-or-adopt.
        cont = continual_of(ftj, inputs)
        train_cfg = children.trainer_config(ftj, ((dataset or {}).get("status") or {}).get("validatedURI") or "",
                                            ((dataset or {}).get("spec") or {}).get("format", "chat"),
                                            old.get("datasetDigest"), config.progress_interval,
                                            continual=cont.trainer_fields)
        # Without its parent or replay data the run would be another run: wait until they are back.
        if dataset is not None and cont.state == "Ready":
            memory_plan.apply(status.get("plan"), spec, train_cfg)  # the same as when it was first made
            cm, job = children.trainer_children(ftj, attempt, train_cfg, config)
            memory_plan.apply_to_job(status.get("plan"), job)
            job["metadata"].setdefault("annotations", {})[GPU_HOURS_BEFORE] = str(status.get("gpuHours", 0) or 0)
            plan.create.extend([cm, *gang.gang_objects(job, ftj, config), job])
    elif state.state == "Pending" and preemption.preempted(inputs.trainer_job, status, state.reason):
        message = preemption.message(trainer_name, status.get("progress"))
        if not (get_condition(old.get("conditions") or [], preemption.CONDITION) or {}).get("status") == "True":
            # The Job controller restarts .status.startTime on readmission: the hours so far go on the Job.
            plan.job_patches[trainer_name] = {"metadata": {"annotations": {
                GPU_HOURS_BEFORE: str(status.get("gpuHours", 0) or 0)}}}
        cond(preemption.CONDITION, True, "JobSuspended", message)
        cond("Trained", False, "Preempted", message)
        to_phase("Queued", message, "Preempted")
    elif state.state == "Pending":
        trained = get_condition(status.get("conditions") or [], "Trained") or {}
        if trained.get("reason") != "Queued":  # e.g. it was Unschedulable and the pod is now scheduled
            cond("Trained", False, "Queued", state.message)
            to_phase("Queued", state.message, "Queued")
    elif state.state in ("Unschedulable", "ImagePull"):
        if state.message != old.get("message"):
            plan.events.append(("Warning", state.reason, state.message))
        cond("Trained", False, state.reason, state.message)
        to_phase("Queued", state.message, "Queued", warning=True)
    elif state.state == "Running":
        status.setdefault("startTime", (inputs.trainer_job or {}).get("startTime") or now)
        pct = (status.get("progress") or {}).get("percent")
        message = f"training (attempt {attempt})" + (f", {pct}% done" if pct is not None else "")
        if get_condition(status.get("conditions") or [], preemption.CONDITION):
            cond(preemption.CONDITION, False, "Readmitted", "admitted again; resumed from the last checkpoint")
        cond("Trained", False, "Training", message)
        to_phase("Training", message, "TrainingStarted")
    elif state.state == "Failed":
        if state.oom and not (inputs.trainer_job or {}).get("failedCondition"):
            plan.suspend_jobs.append(trainer_name)  # stop retrying what will run out of memory again
        cond("Trained", False, state.reason, state.message)
        fail(state.reason, state.message)
    elif state.state == "Succeeded":
        result = inputs.result
        if not result or not result.get("digest"):
            fail("NoResult", f"trainer Job {trainer_name} succeeded but {spec['output']['uri']}/result.json is missing")
        else:
            status["adapter"] = {"uri": result["adapterURI"], "digest": result["digest"],
                                 "sizeBytes": int(result.get("sizeBytes") or 0)}
            if isinstance((result.get("metrics") or {}).get("replay"), dict):
                status["replay"] = result["metrics"]["replay"]
            if curation_status.balance_status(result.get("balance")):  # training.balance ran
                status["balance"] = curation_status.balance_status(result.get("balance"))
            status.setdefault("startTime", (inputs.trainer_job or {}).get("startTime") or now)
            eval_loss = (result.get("metrics") or {}).get("evalLoss")
            if status.get("progress") is not None or eval_loss is not None:
                prog = dict(status.get("progress") or {})
                if eval_loss is not None:
                    prog["evalLoss"] = eval_loss
                prog["percent"] = 100
                status["progress"] = prog
            cond("Trained", True, "Trained", f"adapter {result['digest']}")
            to_phase("Evaluating", f"adapter {result['digest']} trained; running governance checks", "Trained")
            return _finish(old, _evaluate(ftj, inputs, config, now, status, plan, cond, to_phase, fail), plan)
    return _finish(old, status, plan)


def _continual_not_ready(cont: lineage.ContinualPlan, status: dict, cond, to_phase, fail) -> dict:
    """Before the trainer starts: the parent is not promoted yet, a replay Dataset is not Ready, or
    spec.initFrom names an adapter that cannot be used (Failed: a tampered parent never trains)."""
    if cont.state == "Invalid":
        cond("ParentReady", False, cont.reason, cont.message)
        fail(cont.reason, cont.message)
    elif cont.reason == lineage.WAITING_FOR_PARENT:
        cond("ParentReady", False, cont.reason, cont.message)
        to_phase("Pending", cont.message, cont.reason)
    else:
        cond("DatasetReady", False, cont.reason, cont.message)
        to_phase("WaitingForDataset", cont.message, cont.reason)
    return status


@dataclass
class GovernanceRun:
    """Which governance run a reconcile is about: runs are numbered per adapter, and a new one
    starts when the effective policy differs from the one the last run used."""

    policy: dict
    ignored: list[str]
    policy_digest: str
    number: int
    job_name: str
    report_uri: str
    new: bool  # no Job exists for this run yet as far as status knows (first run, or a re-run)
    rerun: bool  # an earlier run used another policy


HISTORY_LIMIT = 20


def governance_run(ftj: dict, gov_status: dict, adapter_uri: str, adapter_digest: str, policies: list[dict],
                   config: OperatorConfig) -> GovernanceRun:
    """The run for the current effective policy. Deterministic from the stored status: after a
    crash before the status patch, the same run number and Job name come out (adopted, not doubled)."""
    policy, ignored = effective_policy(ftj, policies, config)
    digest = governance.policy_digest(policy)
    runs = int(gov_status.get("runs") or 0)
    recorded = gov_status.get("policyDigest")
    if runs and recorded == digest:
        number, new, rerun = runs, False, False
    else:
        number, new, rerun = runs + 1, True, bool(runs)
    return GovernanceRun(policy=policy, ignored=ignored, policy_digest=digest, number=number,
                         job_name=children.governance_job_name(ftj["metadata"]["name"], adapter_digest, digest, number,
                                                               ftj["metadata"].get("namespace", "default")),
                         report_uri=governance.report_uri(adapter_uri, number), new=new, rerun=rerun)


def governance_rerun_due(ftj: dict, policies: list[dict], config: OperatorConfig) -> bool:
    """A finished job whose governance failed, and whose effective policy has changed since:
    the checks run again (a promoted adapter is never re-judged here)."""
    status = ftj.get("status") or {}
    gov, adapter = status.get("governance") or {}, status.get("adapter") or {}
    if status.get("phase") != "Failed" or not gov.get("runs") or not adapter.get("digest"):
        return False
    policy, _ = effective_policy(ftj, policies, config)
    return governance.policy_digest(policy) != gov.get("policyDigest")


def _history_entry(gov: dict) -> dict:
    entry = {"run": int(gov.get("runs") or 1), "policyDigest": gov.get("policyDigest"), "passed": gov.get("passed"),
             "failing": [c["name"] for c in gov.get("checks") or [] if not c.get("passed")],
             "reportURI": gov.get("reportURI"), "reportDigest": gov.get("reportDigest"),
             "evaluatedAt": gov.get("evaluatedAt")}
    return {k: v for k, v in entry.items() if v is not None}


def _restart_governance(run: GovernanceRun, old_gov: dict, status: dict, plan: Plan, cond, to_phase) -> None:
    """The effective policy changed since the last run: back to Evaluating, with nothing of the
    earlier run's verdict left in conditions, promotion or phase."""
    if status.get("phase") == "Evaluating" and status.get("governanceJob"):
        plan.delete_governance_jobs.append(status["governanceJob"])  # the old policy's run is moot
    message = (f"the effective governance policy changed ({str(old_gov.get('policyDigest'))[:19]} -> "
               f"{run.policy_digest[:19]}); running the checks again (run {run.number})")
    if status.get("phase") == "Evaluating":  # otherwise to_phase below posts the Event
        plan.events.append(("Normal", "GovernanceRerun", message))
    cond("GovernancePassed", "Unknown", "PolicyChanged", message)
    cond("Promoted", False, "PolicyChanged", message)
    if get_condition(status.get("conditions") or [], "Failed"):
        cond("Failed", False, "GovernanceRerun", message)
    status.pop("completionTime", None)
    status["promotion"] = {k: v for k, v in (status.get("promotion") or {}).items()
                           if k == "alias"} | {"state": "Pending", "reason": "PolicyChanged"}
    to_phase("Evaluating", message, "GovernanceRerun")


def _evaluate(ftj: dict, inputs: JobInputs, config: OperatorConfig, now: str, status: dict, plan: Plan,
              cond, to_phase, fail) -> dict:
    """Evaluating / AwaitingApproval: the governance Job, its report, and promotion."""
    meta, spec = ftj["metadata"], ftj["spec"]
    adapter = status.get("adapter") or {}
    digest = adapter.get("digest", "")
    old_gov = status.get("governance") or {}
    run = governance_run(ftj, old_gov, adapter.get("uri", ""), digest, inputs.policies, config)
    policy = run.policy
    if run.new:
        gov = {"runs": run.number, "policyDigest": run.policy_digest, "reportURI": run.report_uri,
               "history": list(old_gov.get("history") or [])}
        if run.rerun:
            gov["history"] = (gov["history"] + [_history_entry(old_gov)])[-HISTORY_LIMIT:]
            _restart_governance(run, old_gov, status, plan, cond, to_phase)
    else:
        gov = dict(old_gov)
    gov.update(adapterDigest=digest, effectivePolicy=policy)
    name = run.job_name
    status["governanceJob"] = name
    state = job_state(inputs.governance_job, inputs.governance_pods)
    report = inputs.report  # this run's own report (governance/run-N.json), if it exists yet
    if state.state == "Missing" and report is None:
        dataset = inputs.dataset or {}
        typed = lineage.typed_job(ftj) if spec.get("initFrom") else None
        parent = lineage.parent_from_status(typed) if typed is not None else None
        if spec.get("initFrom") and parent is None:  # retention needs the parent: never judge without it
            message = "spec.initFrom is set but status.lineage names no parent adapter: the retention check cannot run"
            cond("GovernancePassed", False, "LineageMissing", message)
            fail("LineageMissing", message)
            return status
        train_cfg = children.trainer_config(ftj, ((dataset.get("status") or {}).get("validatedURI") or ""),
                                            (dataset.get("spec") or {}).get("format", "chat"),
                                            status.get("datasetDigest"), config.progress_interval,
                                            continual={"initFrom": parent.model_dump(mode="json")} if parent else None)
        gov_cfg = children.governance_config(train_cfg, policy, dataset.get("spec") or {},
                                             (dataset.get("status") or {}).get("piiFindings") or {}, adapter["uri"],
                                             run=run.number, report_uri=run.report_uri,
                                             dataset_eval_set_uris=children.dataset_eval_sets(dataset))
        plan.create.extend(children.governance_children(ftj, name, gov_cfg, config))
        if run.ignored and run.new:
            plan.events.append(("Warning", "GovernanceLooseningIgnored", "; ".join(run.ignored)[:1000]))
        status["governance"] = gov
        return status
    if state.state in ("Pending", "Running", "Unschedulable", "ImagePull"):
        status["governance"] = gov
        if state.state in ("Unschedulable", "ImagePull"):
            status["message"] = f"governance Job: {state.message}"
        return status
    if report is None:
        if state.state == "Failed":
            status["governance"] = gov
            cond("GovernancePassed", False, "GovernanceJobFailed", state.message)
            fail("GovernanceJobFailed", f"governance Job {name} failed: {state.message}")
        return status
    bound = governance.ReportBinding(adapter_digest=digest, policy_digest=run.policy_digest, run=run.number,
                                     job_uid=meta.get("uid"), dataset_digest=status.get("datasetDigest"))
    outcome = governance.read_report(report, bound, inputs.keys or governance.attestation.Keyring(),
                                     required=list(policy.get("required") or []))
    manifest_ok, manifest_msg = inputs.manifest_ok or (False, "adapter not verified")
    gov.update(checks=[c.model_dump(mode="json", exclude_none=True) for c in outcome.checks],
               passed=outcome.passed, reportURI=run.report_uri, reportDigest=governance.statement_digest(report),
               evaluatedAt=gov.get("evaluatedAt") or now, runs=run.number)
    if outcome.key_id:
        gov["signingKey"] = outcome.key_id
    status["governance"] = gov
    cond("GovernancePassed", outcome.passed, "ChecksPassed" if outcome.passed else "ChecksFailed", outcome.message)
    decision = governance.promotion_decision(outcome, spec.get("promotion"), digest, manifest_ok)
    alias = (spec.get("promotion") or {}).get("alias") or meta["name"]
    promo = dict(status.get("promotion") or {})
    promo.update(state=decision.state, reason=decision.reason, alias=alias)
    if decision.approved_by:
        promo["approvedBy"] = decision.approved_by
    if decision.reason == "Approved":
        manager, at = governance.approval_writer(meta)
        promo.update({k: v for k, v in (("approvalManager", manager), ("approvedAt", at)) if v})
    if decision.promote:
        uri = alias_uri_of(ftj)
        if promo.get("aliasURI") != uri:
            record = governance.alias_record(meta.get("namespace", "default"), meta["name"], adapter["uri"], digest,
                                             outcome.passed, outcome.checks, now)
            plan.alias = (uri, governance.promoted_alias_record(inputs.alias_current, record))
            promo["served"] = {"uri": adapter["uri"], "digest": digest}
        promo.update(aliasURI=uri, promotedAt=promo.get("promotedAt") or now)
        card = modelcard.uri(adapter["uri"])
        if promo.get("modelCardURI") != card:
            checks = [c.model_dump(mode="json", exclude_none=True) for c in outcome.checks]
            plan.model_card = (card, modelcard.render(ftj, {**status, "governance": gov}, inputs.dataset, checks,
                                                      alias, promo["promotedAt"]))
        promo["modelCardURI"] = card
        status["promotion"] = promo
        cond("Promoted", True, decision.reason, f"alias {alias} -> {digest}")
        _publishing(ftj, status, cond)
        to_phase("Succeeded", f"adapter {digest} promoted as {alias}", "Promoted")
    elif decision.state == "AwaitingApproval":
        status["promotion"] = promo
        cond("Promoted", False, decision.reason, decision.message)
        to_phase("AwaitingApproval", decision.message, "AwaitingApproval")
    else:
        status["promotion"] = promo
        message = decision.message if manifest_ok else f"{decision.message} ({manifest_msg})"
        cond("Promoted", False, decision.reason, message)
        fail(decision.reason, message)
    return status


# --- serving targets and rollback ---------------------------------------------------------------

def promotion_targets(spec: dict) -> list[PromotionTarget]:
    """spec.promotion.targets as typed models (the API server validated them against the same schema)."""
    return [PromotionTarget.model_validate(t) for t in (spec.get("promotion") or {}).get("targets") or []]


def _publishing(ftj: dict, status: dict, cond) -> None:
    """After an alias write: a Pending entry per target, and the aggregate Published condition."""
    targets = promotion_targets(ftj["spec"])
    serving_plan.pending_entries(targets, status)
    if targets:
        cond("Published", *serving_plan.published_condition(targets, status))


def _rollback_or_restore(ftj: dict, inputs: JobInputs, status: dict, plan: Plan, cond, now: str) -> None:
    """spec.promotion.revoked on a promoted job takes its adapter out of service: the alias goes back to
    the adapter it pointed at before (its history) and the targets follow. Set back to false, the
    adapter is promoted again (it passed its checks; nothing is judged anew)."""
    meta, spec = ftj["metadata"], ftj["spec"]
    promo = dict(status.get("promotion") or {})
    revoked = bool((spec.get("promotion") or {}).get("revoked"))
    adapter = status.get("adapter") or {}
    digest, alias, uri = adapter.get("digest"), promo.get("alias"), promo.get("aliasURI")
    if not (digest and alias and uri):
        return
    job = {"namespace": meta.get("namespace", "default"), "name": meta["name"]}
    if revoked and promo.get("state") == "Promoted":
        record = governance.rolled_back_alias_record(inputs.alias_current, digest, job, now)
        if record is not None:
            plan.alias = (uri, record)
        now_serving = record if record is not None else (inputs.alias_current or {})
        back_to = now_serving.get("adapterDigest")
        promo.update(state="RolledBack", reason="Revoked", rolledBackAt=now,
                     served={k: v for k, v in (("uri", now_serving.get("adapterURI")), ("digest", back_to)) if v})
        message = (f"adapter {digest} taken out of service (spec.promotion.revoked); alias {alias} -> "
                   f"{back_to or 'no adapter'}")
        status["promotion"] = promo
        status["message"] = message
        cond("Promoted", False, "RolledBack", message)
        plan.events.append(("Normal", "RolledBack", message))
    elif not revoked and promo.get("state") == "RolledBack":
        gov = status.get("governance") or {}
        record = governance.alias_record(job["namespace"], job["name"], adapter["uri"], digest, bool(gov.get("passed")),
                                         gov.get("checks") or [], now)
        plan.alias = (uri, governance.promoted_alias_record(inputs.alias_current, record))
        promo.pop("rolledBackAt", None)
        promo.update(state="Promoted", reason="Restored", served={"uri": adapter["uri"], "digest": digest})
        message = f"adapter {digest} promoted again as {alias} (spec.promotion.revoked is false)"
        status["promotion"] = promo
        status["message"] = message
        cond("Promoted", True, "Restored", f"alias {alias} -> {digest}")
        plan.events.append(("Normal", "Promoted", message))
    else:
        return
    _publishing(ftj, status, cond)


def alias_uri_of(ftj: dict) -> Optional[str]:
    """Where this job's alias record is (or will be)."""
    spec = ftj.get("spec") or {}
    output = (spec.get("output") or {}).get("uri")
    alias = (spec.get("promotion") or {}).get("alias") or ftj["metadata"]["name"]
    return governance.alias_uri(output, alias, (spec.get("promotion") or {}).get("aliasStore")) if output else None
