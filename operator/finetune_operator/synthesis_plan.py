"""SyntheticDataset decisions: which inputs, which Job, which phase, which child Dataset. Pure.

    WaitingForInputs -> Generating (synthesize Job) -> Reviewing (people; ReviewPending=True)
        -> Finalizing (synthesis-finalize Job, then the child Dataset validates) -> Ready
    ... -> Invalid (no candidates, acceptance too low, the child Dataset Invalid) | Failed (a Job failed)

One generation of the spec is one *run*: its work folder is named by a digest of everything that
changes the candidates (the spec but `review` and `evaluation`, the seed's and generator's digests),
so the review survives an edit of the acceptance threshold, and a new seed starts a new run.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Optional

from pydantic import ValidationError

from finetune_trainer import storage
from finetune_trainer.review import review_outcome

from . import children
from .api.dataset import Dataset, DatasetSpec, SyntheticOrigin
from .api.finetunejob import FineTuneJob, ResourceSettings
from .api.synthetic import GenerationReport, ReviewStats, SynthesisConfig, SynthesisInputs, SyntheticDataset
from .conditions import bounded, set_condition
from .config import OperatorConfig
from .decisions import Plan, _finish, _with_kstatus, job_state

SYNTHETIC_LABEL = "finetune.dev/syntheticdataset"
ROLE_GENERATE, ROLE_FINALIZE = "synthesis", "synthesis-finalize"
ROLES = (ROLE_GENERATE, ROLE_FINALIZE)
REVIEW_PENDING = "ReviewPending"
INPUTS_READY = "InputsReady"
CONFIG_FILE = "synthesis.json"
REVIEWED_FILE, REVIEW_FILE, GENERATION_FILE = "reviewed.jsonl", "review.json", "generation.json"


@dataclass
class SyntheticInputs:
    """What the handler read for one reconcile (objects as the API server has them)."""

    seed: Optional[dict] = None               # the seed Dataset
    generator_job: Optional[dict] = None      # the generator FineTuneJob (spec.generator.fineTuneJob)
    jobs: dict[str, Optional[dict]] = field(default_factory=dict)    # Job name -> Job
    pods: dict[str, list[dict]] = field(default_factory=dict)        # Job name -> its pods
    report: Optional[dict] = None             # generation.json of the run
    review: Optional[ReviewStats] = None      # the review as it stands (finetune_trainer.review.summarize)
    finalized: Optional[dict] = None          # review.json of the run (written by synthesis-finalize)
    dataset: Optional[dict] = None            # the child Dataset, when it exists


def resolve(sd: SyntheticDataset, seed: Optional[dict], generator_job: Optional[dict],
            eval_set_uris: tuple[str, ...] = ()) -> tuple[Optional[SynthesisInputs], str, str]:
    """(inputs, reason, message): the resolved inputs, or None with why the run cannot start yet.
    `eval_set_uris`: the policies' evaluation files, kept out of the candidates like the seed's eval split."""
    spec = sd.spec
    if seed is None:
        return None, "SeedMissing", f"the seed Dataset {spec.seed.dataset!r} does not exist"
    try:
        seed_ds = Dataset.model_validate(seed)
    except ValidationError as exc:  # written under an older CRD: say so rather than crash the reconcile
        return None, "SeedInvalid", f"the seed Dataset {spec.seed.dataset!r} does not parse: {bounded(str(exc), 300)}"
    st = seed_ds.status
    if seed_ds.spec.format == "image-text":
        return None, "SeedFormat", (f"the seed Dataset {spec.seed.dataset!r} is image-text: a text generator "
                                    "cannot grow it")
    if st is None or st.phase != "Ready" or st.observedGeneration != (seed["metadata"].get("generation") or 1):
        phase = st.phase if st else "Pending"
        reason = {"Invalid": "SeedInvalid", "Failed": "SeedFailed"}.get(phase, "SeedNotReady")
        return None, reason, f"the seed Dataset {spec.seed.dataset!r} is {phase}, not Ready"
    if not (st.validatedURI and st.digest):
        return None, "SeedNotReady", f"the seed Dataset {spec.seed.dataset!r} has no validated data yet"
    gen = spec.generator
    adapter_uri = adapter_digest = None
    if gen.fineTuneJob:
        if generator_job is None:
            return None, "GeneratorMissing", f"the generator FineTuneJob {gen.fineTuneJob!r} does not exist"
        try:
            ftj = FineTuneJob.model_validate(generator_job)
        except ValidationError as exc:
            return None, "GeneratorFailed", (f"the generator FineTuneJob {gen.fineTuneJob!r} does not parse: "
                                             f"{bounded(str(exc), 300)}")
        fst = ftj.status
        state = fst.promotion.state if fst and fst.promotion else None
        if fst and fst.phase == "Failed":
            return None, "GeneratorFailed", f"the generator FineTuneJob {gen.fineTuneJob!r} failed"
        if state != "Promoted" or not fst.adapter:
            return None, "GeneratorNotPromoted", (f"the generator FineTuneJob {gen.fineTuneJob!r} has no promoted "
                                                  f"adapter (promotion {state or 'pending'})")
        base = ftj.spec.baseModel
        adapter_uri, adapter_digest = fst.adapter.uri, fst.adapter.digest
    else:
        base = gen.baseModel
    inputs = SynthesisInputs(seedURI=st.validatedURI, seedFormat=seed_ds.spec.format, seedDigest=st.digest,
                             seedLicense=seed_ds.spec.provenance.license, baseModel=base,
                             adapterURI=adapter_uri, adapterDigest=adapter_digest,
                             evalSetURIs=list(eval_set_uris))
    return inputs, "Resolved", "seed and generator are ready"


def run_digest(sd: SyntheticDataset, inputs: SynthesisInputs) -> str:
    """12 hex digits naming the run: what changes the candidates, and nothing else."""
    spec = sd.spec.model_dump(mode="json", exclude={"review", "evaluation", "output", "resources"})
    text = json.dumps([spec, inputs.model_dump(mode="json")], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def base_uri(sd: SyntheticDataset, config: OperatorConfig) -> str:
    """spec.output.uri, or {artifact store}/synthetic/<ns>/<name>."""
    if sd.spec.output:
        return sd.spec.output.uri.rstrip("/")
    if not config.artifact_store:
        raise ValueError("the SyntheticDataset has no spec.output.uri and the operator has no default artifact store")
    meta = sd.metadata.model_dump()
    return storage.join(config.artifact_store, "synthetic", meta.get("namespace", "default"), meta["name"])


def work_uri(sd: SyntheticDataset, inputs: SynthesisInputs, config: OperatorConfig) -> str:
    return storage.join(base_uri(sd, config), f"run-{run_digest(sd, inputs)}")


def job_names(name: str, run: str) -> tuple[str, str]:
    """(generation Job, finalize Job): deterministic, so a restarted operator adopts, never duplicates."""
    return children.child_name(name, f"synth-{run[:8]}"), children.child_name(name, f"final-{run[:8]}")


def synthesis_config(sd: SyntheticDataset, inputs: SynthesisInputs, work: str) -> SynthesisConfig:
    meta = sd.metadata.model_dump()
    return SynthesisConfig(namespace=meta.get("namespace", "default"), name=meta["name"], spec=sd.spec,
                           inputs=inputs, workURI=work)


def _secret(sd: SyntheticDataset, config: OperatorConfig) -> Optional[str]:
    out = sd.spec.output.credentials if sd.spec.output else None
    return out.name if out else config.s3_credentials_secret


def job_children(body: dict, sd: SyntheticDataset, cfg: SynthesisConfig, job_name: str, role: str,
                 config: OperatorConfig) -> list[dict]:
    """The ConfigMap and Job of one step (generation or finalize) of the run."""
    meta = body["metadata"]
    ns = meta.get("namespace", "default")
    labels = {children.MANAGED_BY: children.OPERATOR, children.ROLE: role, SYNTHETIC_LABEL: meta["name"]}
    cm = children.config_map(job_name, ns, body, labels, CONFIG_FILE, cfg.model_dump(mode="json"))
    res = sd.spec.resources or ResourceSettings(gpusPerNode=0)  # unset: a CPU pod
    command = "synthesize" if role == ROLE_GENERATE else "synthesis-finalize"
    scheduling = res.model_dump(mode="json", exclude_none=True)
    if sd.spec.resources is None:
        res = res.model_copy(update={"cpu": config.validation_cpu, "memory": config.validation_memory})
    job = children.batch_job(
        name=job_name, namespace=ns, owner=body, labels=labels, image=config.trainer_image,
        command=["finetune-trainer", command, "--config", f"{children.CONFIG_DIR}/{CONFIG_FILE}"],
        config=config, secret=_secret(sd, config),
        cpu=res.cpu or (config.validation_cpu if role == ROLE_FINALIZE else None),
        memory=res.memory or (config.validation_memory if role == ROLE_FINALIZE else None),
        gpus=res.gpusPerNode if role == ROLE_GENERATE else 0,
        scheduling=scheduling if role == ROLE_GENERATE else None, backoff_limit=2)
    return [cm, job]


def child_dataset(body: dict, sd: SyntheticDataset, inputs: SynthesisInputs, work: str, report: GenerationReport
                  ) -> dict:
    """The Dataset made of the reviewed examples: validated and curated like any other."""
    meta = body["metadata"]
    spec = sd.spec
    origin = SyntheticOrigin(
        syntheticDataset=meta["name"], seedDataset=spec.seed.dataset, seedDigest=inputs.seedDigest,
        baseModelDigest=report.lineage.baseModelDigest, generatorAdapterDigest=inputs.adapterDigest,
        templateDigest=report.lineage.templateDigest, candidatesDigest=report.candidatesDigest,
        reviewURI=storage.join(work, REVIEW_FILE))
    generator = (f"FineTuneJob {spec.generator.fineTuneJob}" if spec.generator.fineTuneJob
                 else f"base model {inputs.baseModel.uri}")
    provenance = {
        "origin": bounded(f"synthetic: generated by SyntheticDataset {meta.get('namespace', 'default')}/"
                          f"{meta['name']} from Dataset {spec.seed.dataset}", 1024),
        "collectedBy": bounded(generator, 256),
        "synthetic": origin.model_dump(mode="json", exclude_none=True),
    }
    if inputs.seedLicense:
        provenance["license"] = inputs.seedLicense
    out = {"uri": storage.join(work, "dataset")}
    if spec.output and spec.output.credentials:
        out["credentials"] = spec.output.credentials.model_dump()
    source = {"uri": storage.join(work, REVIEWED_FILE), **({"credentials": out["credentials"]}
                                                          if "credentials" in out else {})}
    return {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "Dataset",
        "metadata": {"name": meta["name"], "namespace": meta.get("namespace", "default"),
                     "labels": {children.MANAGED_BY: children.OPERATOR, SYNTHETIC_LABEL: meta["name"]},
                     "ownerReferences": [children.owner_reference(body)]},
        "spec": {"source": source, "format": spec.format,
                 "evaluation": spec.evaluation.model_dump(mode="json", exclude_none=True),
                 "provenance": provenance,
                 "curation": spec.curation.model_dump(mode="json", exclude_none=True), "output": out},
    }


def same_dataset_spec(have: Optional[dict], want: dict) -> bool:
    """Equal once defaulted: the API server fills in the schema's defaults (maxBytes, evaluation.seed, ...)."""
    try:
        have_spec = DatasetSpec.model_validate(have or {})
    except ValidationError:
        return False
    return have_spec.model_dump(mode="json") == DatasetSpec.model_validate(want).model_dump(mode="json")


def owned_by(obj: dict, owner: dict) -> bool:
    uid = owner["metadata"].get("uid")
    return any(ref.get("uid") == uid for ref in (obj["metadata"].get("ownerReferences") or []))


@_with_kstatus("SyntheticDataset")
def plan_synthetic(body: dict, inputs: SyntheticInputs, resolved: tuple[Optional[SynthesisInputs], str, str],
                   config: OperatorConfig, now: str) -> Plan:
    sd = SyntheticDataset.model_validate(body)
    meta = body["metadata"]
    generation = meta.get("generation") or 1
    old = body.get("status") or {}
    status = copy.deepcopy(old)
    plan = Plan()

    def cond(type_: str, ok: bool, reason: str, message: str) -> None:
        status["conditions"] = set_condition(status.get("conditions") or [], type_, ok, reason, bounded(message),
                                             generation, now)

    def to_phase(phase: str, reason: str, message: str, *, ready: bool = False, event: bool = True) -> None:
        message = bounded(message)
        changed = old.get("phase") != phase or (old.get("message") != message and phase in ("Invalid", "Failed"))
        status.update(phase=phase, message=message, observedGeneration=generation)
        cond("Ready", ready, reason, message)
        if changed and event:
            warn = phase in ("Invalid", "Failed")
            plan.events.append(("Warning" if warn else "Normal", reason, message))

    resolved_inputs, reason, message = resolved
    if resolved_inputs is None:
        cond(INPUTS_READY, False, reason, message)
        to_phase("WaitingForInputs", reason, message)
        return _finish(old, status, plan)
    cond(INPUTS_READY, True, reason, message)
    try:
        work = work_uri(sd, resolved_inputs, config)
    except ValueError as exc:
        to_phase("Failed", "NoOutputLocation", str(exc))
        return _finish(old, status, plan)
    run = work.rsplit("-", 1)[-1]
    gen_name, fin_name = job_names(meta["name"], run)
    cfg = synthesis_config(sd, resolved_inputs, work)
    status["workURI"] = work

    # 1. generation
    report = GenerationReport.model_validate(inputs.report) if inputs.report else None
    if report is None:
        state = job_state(inputs.jobs.get(gen_name), inputs.pods.get(gen_name, []))
        status["job"] = gen_name
        if state.state == "Missing":
            plan.create.extend(job_children(body, sd, cfg, gen_name, ROLE_GENERATE, config))
            to_phase("Generating", "Generating", f"generation Job {gen_name} created")
        elif state.state in ("Pending", "Running", "Unschedulable", "ImagePull"):
            msg = state.message if state.state in ("Unschedulable", "ImagePull") else \
                f"generation Job {gen_name} is running"
            to_phase("Generating", "Generating" if state.state in ("Pending", "Running") else state.reason, msg)
        elif state.state == "Succeeded":
            to_phase("Failed", "NoReport", f"generation Job {gen_name} succeeded but wrote no {GENERATION_FILE}")
        else:
            to_phase("Failed", state.reason or "GenerationFailed",
                     f"generation Job {gen_name} failed: {state.message}")
        return _finish(old, status, plan)
    status["generation"] = report.model_dump(mode="json", include={
        "requested", "generated", "kept", "removed", "reviewRequired"})
    status["lineage"] = report.lineage.model_dump(mode="json", exclude_none=True, exclude={"seedIds"})
    if report.kept == 0:
        cond(REVIEW_PENDING, False, "NoCandidates", "nothing to review")
        to_phase("Invalid", "NoCandidates", f"the generator wrote {report.generated} outputs and none passed the "
                 f"filters (removed: {', '.join(f'{k} {v}' for k, v in sorted(report.removed.items()) if v)})")
        return _finish(old, status, plan)

    # 2. review
    stats = inputs.review or ReviewStats(required=report.reviewRequired, pending=report.reviewRequired)
    status["review"] = stats.model_dump(mode="json", exclude_none=True)
    outcome, text = review_outcome(stats, sd.spec.review)
    if outcome == "pending" and inputs.finalized is None:
        cond(REVIEW_PENDING, True, "AwaitingReview", text)
        to_phase("Reviewing", "AwaitingReview", text + f"; review with: ftctl review {meta['name']}")
        return _finish(old, status, plan)
    cond(REVIEW_PENDING, False, "Reviewed", text)
    if outcome == "failed" and inputs.finalized is None:
        to_phase("Invalid", "LowAcceptance", text)
        return _finish(old, status, plan)

    # 3. finalize: the reviewed file, then the child Dataset validates it
    if inputs.finalized is None:
        state = job_state(inputs.jobs.get(fin_name), inputs.pods.get(fin_name, []))
        status["job"] = fin_name
        if state.state == "Missing":
            plan.create.extend(job_children(body, sd, cfg, fin_name, ROLE_FINALIZE, config))
            to_phase("Finalizing", "Finalizing", f"{text}; finalize Job {fin_name} created")
        elif state.state in ("Pending", "Running", "Unschedulable", "ImagePull"):
            to_phase("Finalizing", "Finalizing", f"finalize Job {fin_name} is running")
        elif state.state == "Succeeded":
            to_phase("Failed", "NoReport", f"finalize Job {fin_name} succeeded but wrote no {REVIEW_FILE}")
        else:
            to_phase("Failed", state.reason or "FinalizeFailed", f"finalize Job {fin_name} failed: {state.message}")
        return _finish(old, status, plan)

    wanted = child_dataset(body, sd, resolved_inputs, work, report)
    child = inputs.dataset
    status["dataset"] = meta["name"]
    if child is None:
        plan.create.append(wanted)
        to_phase("Finalizing", "DatasetCreated", f"Dataset {meta['name']} created from {stats.accepted + stats.edited}"
                 f" reviewed and the not-sampled candidates; validating")
        return _finish(old, status, plan)
    if not owned_by(child, body):
        to_phase("Invalid", "DatasetNameTaken", f"a Dataset named {meta['name']!r} exists and is not this "
                 "SyntheticDataset's: rename one of them")
        return _finish(old, status, plan)
    if not same_dataset_spec(child.get("spec"), wanted["spec"]):
        # A newer run (or someone edited the child): the spec is ours again.
        plan.patches.append(("finetune.dev/v1alpha1", "Dataset", meta["name"], {"spec": wanted["spec"]}))
        to_phase("Finalizing", "DatasetUpdated", f"Dataset {meta['name']} updated for run {run}; validating")
        return _finish(old, status, plan)
    child_ds = Dataset.model_validate(child)
    cst = child_ds.status
    fresh = cst is not None and cst.observedGeneration == (child["metadata"].get("generation") or 1)
    if not fresh or cst.phase in ("Pending", "Validating"):
        to_phase("Finalizing", "Validating", f"Dataset {meta['name']} is validating")
    elif cst.phase == "Ready":
        examples = cst.stats.examples if cst.stats else 0
        to_phase("Ready", "DatasetReady", f"Dataset {meta['name']} is Ready: {examples} examples", ready=True)
    else:
        to_phase("Invalid", f"Dataset{cst.phase}", f"Dataset {meta['name']} is {cst.phase}: {cst.message}")
    return _finish(old, status, plan)
