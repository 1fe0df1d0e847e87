"""Objects whose status comes from the real decision code, along every path a GitOps tool must judge.

Shared by tests/test_kstatus.py (the kstatus rules, as Flux applies them) and
tests/test_argocd_health.py (the chart's Argo CD health.lua): both judge the same statuses, so the
two tools cannot drift apart without a test saying so. Nothing here writes a status by hand: each
object is the result of decisions.plan_dataset / plan_finetunejob / plan_rejected from observations
(a Job summary, pods, a signed governance report), the way the operator produces it.
"""

from __future__ import annotations

import copy
import json

from finetune_operator import decisions, governance
from finetune_operator.serving import plan as serving_plan
from finetune_operator.config import OperatorConfig
from testutil import REPO, make_keyring, sign_report

CHART = REPO / "helm" / "finetune-operator"
CUSTOMIZATIONS = CHART / "argocd" / "resource_customizations" / "finetune.dev"

CFG = OperatorConfig(artifact_store="s3://store", default_governance={"required": []})
STRICT_CFG = OperatorConfig(artifact_store="s3://store",
                            default_governance={"required": ["evaluation", "bias"]})
T0, T1, T2, T3 = ("2026-01-01T00:00:00Z", "2026-01-01T00:10:00Z", "2026-01-01T00:20:00Z", "2026-01-01T00:30:00Z")
DIGEST = "sha256:" + "ab" * 32
DS_DIGEST = "sha256:" + "12" * 32
KEYS = make_keyring()
REJECTION = ('pods "j-train-1" is forbidden: no PriorityClass with name gpu-urgent was found')


def dataset_obj(status=None, generation=1) -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "Dataset",
            "metadata": {"name": "ds", "namespace": "team-a", "uid": "d-uid", "generation": generation},
            "spec": {"source": {"uri": "s3://b/raw.jsonl"}, "format": "chat", "curation": {"minExamples": 5}},
            "status": copy.deepcopy(status) if status else {}}


def ftj_obj(status=None, generation=1, **spec) -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "j", "namespace": "team-a", "uid": "j-uid", "generation": generation},
            "spec": {"baseModel": {"uri": "s3://m/tiny"}, "datasetRef": {"name": "ds"},
                     "output": {"uri": "s3://out/j"}, "resources": {"gpusPerNode": 1}, **spec},
            "status": copy.deepcopy(status) if status else {}}


def job(name: str, **status) -> dict:
    conditions = []
    if status.pop("complete", False):
        conditions.append({"type": "Complete", "status": "True"})
    if "failed_reason" in status:
        conditions.append({"type": "Failed", "status": "True", "reason": status.pop("failed_reason"),
                           "message": "BackoffLimitExceeded: Job has reached the specified backoff limit"})
    return decisions.summarize_job({"metadata": {"name": name}, "status": {**status, "conditions": conditions}})


def pod(phase="Running", **kw) -> dict:
    status: dict = {"phase": phase, "conditions": [], "containerStatuses": []}
    if "unschedulable" in kw:
        status["conditions"].append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                     "message": kw["unschedulable"]})
    if "terminated" in kw:
        reason, code = kw["terminated"]
        status["containerStatuses"].append({"state": {"terminated": {"reason": reason, "exitCode": code}}})
    return decisions.summarize_pod({"metadata": {"name": "p"}, "status": status})


def step(obj: dict, plan: decisions.Plan) -> dict:
    """The object after the operator applied the plan's status (unchanged when it planned none)."""
    out = copy.deepcopy(obj)
    if plan.status is not None:
        out["status"] = copy.deepcopy(plan.status)
    return out


# --- Dataset ---------------------------------------------------------------------------------------

GOOD_REPORT = {"valid": True, "stats": {"examples": 40, "evalExamples": 4}, "digest": DS_DIGEST,
               "validatedURI": "s3://store/datasets/team-a/ds/1"}
BAD_REPORT = {"valid": False, "reason": "MalformedLines",
              "message": "line 3: json: duplicate key 'output'", "stats": {"examples": 2, "invalidLines": 1},
              "invalidLineNumbers": [3]}


def dataset_paths() -> dict[str, dict]:
    """name -> a Dataset with a status the decisions produced."""
    out: dict[str, dict] = {}
    new = dataset_obj()
    out["validating"] = validating = step(new, decisions.plan_dataset(new, None, [], None, CFG, T0))
    running = job("ds-validate-1", active=1, ready=1)
    out["validating-running"] = step(validating, decisions.plan_dataset(validating, running, [pod()], None, CFG, T1))
    out["ready"] = ready = step(validating, decisions.plan_dataset(
        validating, job("ds-validate-1", complete=True, succeeded=1), [], GOOD_REPORT, CFG, T1))
    out["invalid"] = step(validating, decisions.plan_dataset(
        validating, job("ds-validate-1", complete=True, succeeded=1), [], BAD_REPORT, CFG, T1))
    out["failed"] = step(validating, decisions.plan_dataset(
        validating, job("ds-validate-1", failed=1, failed_reason="BackoffLimitExceeded"), [], None, CFG, T1))
    out["rejected"] = step(new, decisions.plan_rejected(new, "Job ds-validate-1 (its pod template)", REJECTION, T0))
    # The spec changed after it was Ready: generation 2 is being validated, observedGeneration still 1.
    edited = copy.deepcopy(ready)
    edited["metadata"]["generation"] = 2
    out["revalidating"] = step(edited, decisions.plan_dataset(edited, None, [], None, CFG, T2))
    # A spec edit the operator has not seen yet: the stored status says generation 1 and Ready.
    out["stale"] = edited
    return out


# --- FineTuneJob -----------------------------------------------------------------------------------

def checks(*failing: str) -> list[dict]:
    names = ("evaluation", "bias", "provenance", "pii")
    return [{"name": n, "passed": n not in failing,
             "message": "below the threshold" if n in failing else "within the threshold"} for n in names]


def _report(ftj: dict, cfg: OperatorConfig, checks_: list[dict]) -> dict:
    run = decisions.governance_run(ftj, (ftj["status"] or {}).get("governance") or {}, "s3://out/j/adapters/ab",
                                   DIGEST, [], cfg)
    predicate = {"adapterDigest": DIGEST, "checks": checks_, "policy": run.policy, "run": run.number,
                 "policyDigest": run.policy_digest, "job": {"namespace": "team-a", "name": "j", "uid": "j-uid"},
                 "datasetDigest": DS_DIGEST}
    return sign_report(predicate, KEYS)


def _judged(evaluating: dict, cfg: OperatorConfig, checks_: list[dict], now: str) -> dict:
    gov_job = job(evaluating["status"]["governanceJob"], complete=True, succeeded=1)
    inputs = decisions.JobInputs(dataset=READY_DATASET, governance_job=gov_job, keys=KEYS,
                                 report=_report(evaluating, cfg, checks_), manifest_ok=(True, "ok"))
    return step(evaluating, decisions.plan_finetunejob(evaluating, inputs, cfg, now))


READY_DATASET = dataset_obj({"phase": "Ready", "observedGeneration": 1, "digest": DS_DIGEST,
                             "validatedURI": "s3://store/datasets/team-a/ds/1"})


def finetunejob_paths() -> dict[str, dict]:
    """name -> a FineTuneJob with a status the decisions produced."""
    out: dict[str, dict] = {}
    paths = dataset_paths()

    def plan(obj: dict, cfg: OperatorConfig = CFG, now: str = T1, **inputs) -> dict:
        return step(obj, decisions.plan_finetunejob(obj, decisions.JobInputs(**inputs), cfg, now))

    new = ftj_obj()
    out["waiting-missing-dataset"] = plan(new, now=T0)
    out["waiting-validating-dataset"] = plan(new, now=T0, dataset=paths["validating"])
    out["waiting-invalid-dataset"] = plan(new, now=T0, dataset=paths["invalid"])
    out["queued"] = queued = plan(new, now=T0, dataset=READY_DATASET)
    # The memory plan refuses it before any Job: a 70B-shaped base in bf16 on one H100.
    big = ftj_obj(resources={"gpusPerNode": 1, "gpuNodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}})
    out["infeasible"] = plan(big, now=T0, dataset=READY_DATASET, model_config={
        "hidden_size": 8192, "num_hidden_layers": 80, "intermediate_size": 28672, "num_attention_heads": 64,
        "num_key_value_heads": 8, "vocab_size": 128256})
    out["unschedulable"] = plan(queued, dataset=READY_DATASET, trainer_job=job("j-train-1", active=1),
                                trainer_pods=[pod("Pending", unschedulable="0/2 nodes are available: "
                                                  "2 Insufficient nvidia.com/gpu")])
    training = plan(queued, dataset=READY_DATASET, trainer_job=job("j-train-1", active=1, ready=1, startTime=T0),
                    trainer_pods=[pod()], progress={"step": 5, "totalSteps": 10, "percent": 50})
    out["training"] = training
    out["suspended"] = plan(ftj_obj(training["status"], suspend=True), dataset=READY_DATASET,
                            trainer_job=job("j-train-1", active=1, ready=1, startTime=T0), trainer_pods=[pod()])
    # Kueue preempted it: the Job suspended by Kueue, not by spec.suspend (a pause, never a failure).
    kueue_suspended = decisions.summarize_job({"metadata": {"name": "j-train-1"}, "spec": {"suspend": True},
                                               "status": {"startTime": T0, "conditions": [
                                                   {"type": "Suspended", "status": "True", "lastTransitionTime": T1}]}})
    out["preempted"] = plan(training, now=T2, dataset=READY_DATASET, trainer_job=kueue_suspended, trainer_pods=[])
    out["oom"] = plan(training, now=T2, dataset=READY_DATASET, trainer_job=job("j-train-1", failed=1),
                      trainer_pods=[pod("Failed", terminated=("OOMKilled", 137))])
    result = {"adapterURI": "s3://out/j/adapters/ab", "digest": DIGEST, "sizeBytes": 10,
              "metrics": {"evalLoss": 1.25}}
    done_training = job("j-train-1", complete=True, succeeded=1, startTime=T0, completionTime=T2)
    out["evaluating"] = evaluating = plan(training, now=T2, dataset=READY_DATASET, trainer_job=done_training,
                                          result=result)
    out["succeeded"] = _judged(evaluating, CFG, checks(), T3)
    manual = ftj_obj(evaluating["status"], promotion={"mode": "manual"})
    out["awaiting-approval"] = _judged(manual, CFG, checks(), T3)
    strict = step(training, decisions.plan_finetunejob(
        training, decisions.JobInputs(dataset=READY_DATASET, trainer_job=done_training, result=result), STRICT_CFG, T2))
    out["governance-blocked"] = _judged(strict, STRICT_CFG, checks("evaluation", "bias"), T3)
    # Serving targets (spec.promotion.targets): publishing right after promotion, a target failing, a rollback.
    served = ftj_obj(evaluating["status"], promotion={"targets": [{"name": "vllm", "vllm": {"configMap": "adapters"}}]})
    out["publishing"] = publishing = _judged(served, CFG, checks(), T3)
    failing = copy.deepcopy(publishing)
    serving_plan.fold(failing["status"], decisions.promotion_targets(failing["spec"]),
                      [(decisions.promotion_targets(failing["spec"])[0],
                        serving_plan.Outcome(False, "ConfigMap adapters exists without the label "
                                                    "finetune.dev/serving=vllm"))], 1, T3)
    out["publish-failed"] = failing
    revoked = copy.deepcopy(out["succeeded"])
    revoked["metadata"]["generation"] = 2
    revoked["spec"]["promotion"] = {"revoked": True}
    earlier = {"adapterURI": "s3://out/j/adapters/cd", "adapterDigest": "sha256:" + "cd" * 32,
               "job": {"namespace": "team-a", "name": "j-old"}, "promotedAt": T0}
    current = {"adapterURI": "s3://out/j/adapters/ab", "adapterDigest": DIGEST, "history": [earlier]}
    out["rolled-back"] = plan(revoked, now=T3, alias_current=current)
    out["rejected"] = rejected = step(new, decisions.plan_rejected(new, "Job j-train-1 (its pod template)",
                                                                   REJECTION, T0))
    fixed = copy.deepcopy(rejected)
    fixed["metadata"]["generation"] = 2
    out["rejected-then-fixed"] = plan(fixed, now=T1, dataset=READY_DATASET)
    # A spec edit the operator has not seen yet: generation 2, the stored status still generation 1.
    stale = copy.deepcopy(out["succeeded"])
    stale["metadata"]["generation"] = 2
    out["stale"] = stale
    return out


# --- SyntheticDataset ------------------------------------------------------------------------------

SEED_DIGEST, BASE_DIGEST, TEMPLATE_DIGEST, CANDIDATES_DIGEST = (
    "sha256:" + "34" * 32, "sha256:" + "56" * 32, "sha256:" + "78" * 32, "sha256:" + "9a" * 32)


def synthetic_obj(status=None, generation=1, **spec) -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "SyntheticDataset",
            "metadata": {"name": "syn", "namespace": "team-a", "uid": "s-uid", "generation": generation},
            "spec": {"seed": {"dataset": "seed"}, "generator": {"fineTuneJob": "gen"}, "examples": 20, **spec},
            "status": copy.deepcopy(status) if status else {}}


def seed_obj(phase="Ready") -> dict:
    obj = dataset_obj({"phase": phase, "observedGeneration": 1, "digest": SEED_DIGEST,
                       "validatedURI": "s3://store/datasets/team-a/seed/1"} if phase else None)
    obj["metadata"]["name"] = "seed"
    obj["spec"]["source"]["uri"] = "s3://team-a-data/seed.jsonl"
    obj["spec"]["provenance"] = {"origin": "support team", "license": "CC-BY-4.0"}
    return obj


def generator_obj(promoted=True) -> dict:
    status = {"phase": "Succeeded" if promoted else "Training", "observedGeneration": 1}
    if promoted:
        status |= {"adapter": {"uri": "s3://out/gen/adapters/ab", "digest": DIGEST},
                   "promotion": {"state": "Promoted"}}
    obj = ftj_obj(status)
    obj["metadata"]["name"] = "gen"
    obj["spec"]["baseModel"]["uri"] = "s3://models/tiny"
    return obj


def generation_report(kept=6, review_required=6) -> dict:
    return {"requested": 20, "generated": 30, "kept": kept, "reviewRequired": review_required,
            "removed": {"novelty": 20, "pii": 4} if kept else {"novelty": 30},
            "lineage": {"syntheticDataset": "team-a/syn", "seedDigest": SEED_DIGEST, "baseModelDigest": BASE_DIGEST,
                        "generatorAdapterDigest": DIGEST, "templateDigest": TEMPLATE_DIGEST},
            "candidatesDigest": CANDIDATES_DIGEST}


def review_stats(required=6, accepted=0, edited=0, rejected=0):
    from finetune_operator.api.synthetic import ReviewStats

    reviewed = accepted + edited + rejected
    return ReviewStats(required=required, reviewed=reviewed, accepted=accepted, edited=edited, rejected=rejected,
                       pending=required - reviewed,
                       acceptanceRate=(accepted + edited) / reviewed if reviewed else None)


def plan_synthetic(obj, *, seed=None, generator=None, now=T0, **observed):
    """One reconcile of `obj`, as synthetic_handlers does it, from the observations given."""
    from finetune_operator import synthesis_plan
    from finetune_operator.api.synthetic import SyntheticDataset

    seed = seed if seed is not None else seed_obj()
    generator = generator if generator is not None else generator_obj()
    resolved = synthesis_plan.resolve(SyntheticDataset.model_validate(obj), seed or None, generator or None)
    inputs = synthesis_plan.SyntheticInputs(seed=seed or None, generator_job=generator or None, **observed)
    return synthesis_plan.plan_synthetic(obj, inputs, resolved, CFG, now)


def synthetic_names(obj) -> tuple[str, str]:
    from finetune_operator import synthesis_plan
    from finetune_operator.api.synthetic import SyntheticDataset

    sd = SyntheticDataset.model_validate(obj)
    work = synthesis_plan.work_uri(sd, synthesis_plan.resolve(sd, seed_obj(), generator_obj())[0], CFG)
    return synthesis_plan.job_names("syn", work.rsplit("-", 1)[-1])


def synthetic_paths() -> dict[str, dict]:
    """name -> a SyntheticDataset with a status the decisions produced."""
    out: dict[str, dict] = {}
    new = synthetic_obj()
    gen_job, fin_job = synthetic_names(new)
    out["waiting-seed"] = step(new, plan_synthetic(new, seed={}))
    out["seed-invalid"] = step(new, plan_synthetic(new, seed=seed_obj("Invalid")))
    out["waiting-generator"] = step(new, plan_synthetic(new, generator=generator_obj(promoted=False)))
    out["generating"] = generating = step(new, plan_synthetic(new))
    out["generation-failed"] = step(generating, plan_synthetic(
        generating, now=T1, jobs={gen_job: job(gen_job, failed=1, failed_reason="BackoffLimitExceeded")}))
    out["no-candidates"] = step(generating, plan_synthetic(
        generating, now=T1, report=generation_report(kept=0, review_required=0)))
    out["reviewing"] = reviewing = step(generating, plan_synthetic(
        generating, now=T1, report=generation_report(), review=review_stats(accepted=2, rejected=1)))
    out["low-acceptance"] = step(reviewing, plan_synthetic(
        reviewing, now=T2, report=generation_report(), review=review_stats(accepted=2, rejected=4)))
    reviewed = review_stats(accepted=5, edited=1)
    out["finalizing"] = finalizing = step(reviewing, plan_synthetic(
        reviewing, now=T2, report=generation_report(), review=reviewed))
    finalized = {**reviewed.model_dump(), "candidatesDigest": CANDIDATES_DIGEST}
    out["dataset-created"] = created = step(finalizing, plan_synthetic(
        finalizing, now=T3, report=generation_report(), review=reviewed, finalized=finalized,
        jobs={fin_job: job(fin_job, complete=True, succeeded=1)}))
    child = synthetic_child(created)
    ready_child = copy.deepcopy(child)
    ready_child["status"] = {"phase": "Ready", "observedGeneration": 1, "stats": {"examples": 6}}
    out["ready"] = step(created, plan_synthetic(created, now=T3, report=generation_report(), review=reviewed,
                                                finalized=finalized, dataset=ready_child))
    invalid_child = copy.deepcopy(child)
    invalid_child["status"] = {"phase": "Invalid", "observedGeneration": 1, "message": "4 valid examples; minExamples is 10"}
    out["dataset-invalid"] = step(created, plan_synthetic(created, now=T3, report=generation_report(),
                                                          review=reviewed, finalized=finalized, dataset=invalid_child))
    return out


def synthetic_child(obj) -> dict:
    """The child Dataset the plan of `obj` creates, as the API server returns it."""
    plan = plan_synthetic(obj, report=generation_report(), review=review_stats(accepted=5, edited=1),
                          finalized={"candidatesDigest": CANDIDATES_DIGEST})
    (child,) = [m for m in plan.create if m["kind"] == "Dataset"]
    child = copy.deepcopy(child)
    child["metadata"]["ownerReferences"][0]["uid"] = obj["metadata"]["uid"]
    child["metadata"]["generation"] = 1
    return child


# --- FederatedFineTuneJob ----------------------------------------------------------------------------

FED_SITES = (("north", "team-north"), ("south", "team-south"))
FED_CFG = OperatorConfig(artifact_store="s3://store",
                         default_governance={"required": ["evaluation", "provenance", "pii"]})


def fed_obj(status=None, generation=1, **spec) -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FederatedFineTuneJob",
            "metadata": {"name": "fed", "namespace": "coord", "uid": "f-uid", "generation": generation},
            "spec": {"baseModel": {"uri": "s3://models/tiny"}, "rounds": 2, "minSites": 2,
                     "participants": [{"name": n, "namespace": ns, "dataset": "ds"} for n, ns in FED_SITES],
                     "resources": {"gpusPerNode": 0}, "output": {"uri": "s3://out-bucket/fed"}, **spec},
            "status": copy.deepcopy(status) if status else {}}


def fed_dataset(namespace: str, phase: str = "Ready", consent: str = "coord/fed") -> dict:
    status = {"phase": phase}
    if phase == "Ready":
        status.update(digest=DS_DIGEST, validatedURI=f"s3://{namespace}/validated", piiFindings={})
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "Dataset",
            "metadata": {"name": "ds", "namespace": namespace, "generation": 1,
                         "annotations": {"finetune.dev/federation-consent": consent}},
            "spec": {"source": {"uri": f"s3://{namespace}/raw.jsonl"}, "format": "chat",
                     "provenance": {"origin": "tests", "license": "CC0-1.0", "consent": "not-required"}},
            "status": status}


def _fed_progress(rounds: int, losses=(2.0, 1.5), adapter: bool = False, state: str = "Training",
                  final=(2.0, 1.5)) -> dict:
    record = {"state": state, "currentRound": rounds, "totalRounds": 2,
              "privacy": {"secureAggregation": False},
              "rounds": [{"round": r + 1, "sitesSelected": 2, "sitesReported": 2, "heldOutLoss": losses[r],
                          "seconds": 10.0, "sites": [{"site": n, "examples": 10, "localLoss": losses[r],
                                                      "evalLoss": losses[r]} for n, _ in FED_SITES]}
                         for r in range(rounds)]}
    if adapter:
        record["adapter"] = {"uri": "s3://out-bucket/fed/adapters/ab", "digest": DIGEST}
        # Every site's final evaluation (base model, adapter) and its own pii check: numbers only.
        base, loss = final
        record["finalEvaluation"] = {"sites": [{"site": n, "baseEvalLoss": base, "evalLoss": loss, "evalExamples": 5}
                                               for n, _ in FED_SITES], "baseHeldOutLoss": base, "heldOutLoss": loss}
        record["siteChecks"] = [{"site": n, "pii": {"findings": {}, "probed": 2, "memorized": 0, "memorizationRate": 0.0}}
                                for n, _ in FED_SITES]
    return record


def federation_paths() -> dict[str, dict]:
    """Every phase plan_federation produces, from observations (Datasets, Jobs, progress.json)."""
    from finetune_operator import federation
    from finetune_operator.api.federated import FederatedFineTuneJob

    def plan(obj: dict, now: str = T1, cfg: OperatorConfig = FED_CFG, **observed) -> dict:
        datasets = observed.pop("datasets", {(ns, "ds"): fed_dataset(ns) for _, ns in FED_SITES})
        return step(obj, federation.plan_federation(obj, FederatedFineTuneJob.model_validate(obj),
                                                    federation.Observed(datasets=datasets, **observed), cfg, now))

    def jobs(**server) -> dict:
        out = {("coord", "fed-superlink"): job("fed-superlink", active=1, ready=1),
               ("coord", "fed-server"): job("fed-server", **(server or {"active": 1, "ready": 1}))}
        for n, ns in FED_SITES:
            name = federation.site_job_name("coord", "fed", n)
            out[(ns, name)] = job(name, active=1, ready=1)
        return out

    out: dict[str, dict] = {}
    out["waiting-missing-dataset"] = plan(fed_obj(), T0, datasets={("team-north", "ds"): fed_dataset("team-north")})
    out["waiting-validating-dataset"] = plan(fed_obj(), T0, datasets={
        ("team-north", "ds"): fed_dataset("team-north"), ("team-south", "ds"): fed_dataset("team-south", "Validating")})
    out["no-consent"] = plan(fed_obj(), T0, datasets={
        ("team-north", "ds"): fed_dataset("team-north"), ("team-south", "ds"): fed_dataset("team-south", consent="")})
    out["starting"] = plan(out["waiting-validating-dataset"], T1)
    out["training"] = plan(out["starting"], T1, jobs=jobs(), progress=_fed_progress(1))
    done = dict(jobs=jobs(complete=True, succeeded=1), progress=_fed_progress(2, adapter=True, state="Succeeded"))
    out["evaluating"] = plan(out["training"], T2, **done)
    out["succeeded"] = plan(out["evaluating"], T3, manifest_ok=(True, "ok"), **done)
    manual = copy.deepcopy(out["evaluating"])
    manual["spec"]["promotion"] = {"mode": "manual"}
    out["awaiting-approval"] = plan(manual, T3, manifest_ok=(True, "ok"), **done)
    worse = dict(done, progress=_fed_progress(2, losses=(1.5, 2.0), adapter=True, state="Succeeded", final=(1.5, 2.0)))
    out["governance-blocked"] = plan(out["evaluating"], T3, manifest_ok=(True, "ok"), **worse)
    out["server-failed"] = plan(out["training"], T2, jobs=jobs(failed_reason="BackoffLimitExceeded"),
                                progress=_fed_progress(1))
    stale = copy.deepcopy(out["succeeded"])
    stale["metadata"]["generation"] = 2
    out["stale"] = stale
    return out


def all_paths() -> dict[str, dict]:
    """'<Kind>/<path>' -> object."""
    return ({f"Dataset/{k}": v for k, v in dataset_paths().items()}
            | {f"FineTuneJob/{k}": v for k, v in finetunejob_paths().items()}
            | {f"SyntheticDataset/{k}": v for k, v in synthetic_paths().items()}
            | {f"FederatedFineTuneJob/{k}": v for k, v in federation_paths().items()})


def policy_obj() -> dict:
    """A GovernancePolicy as users apply it: the operator reads it and writes no status."""
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "GovernancePolicy",
            "metadata": {"name": "platform-default", "generation": 1},
            "spec": {"required": ["evaluation", "bias", "provenance", "pii"], "namespaces": ["team-a"]}}


# --- the chart's Argo CD health checks, run as Argo CD runs them ------------------------------------

def health_lua(kind: str) -> str:
    return (CUSTOMIZATIONS / kind / "health.lua").read_text()


def _to_lua(runtime, value):
    """JSON-shaped Python -> Lua tables, as Argo CD converts the unstructured object (lists 1-based)."""
    if isinstance(value, dict):
        return runtime.table_from({k: _to_lua(runtime, v) for k, v in value.items()})
    if isinstance(value, list):
        return runtime.table_from([_to_lua(runtime, v) for v in value])
    return value


def run_health(kind: str, obj: dict) -> dict:
    """Run the kind's health.lua on `obj`; {'status': ..., 'message': ...}."""
    from lupa import lua51 as lupa  # Argo CD's gopher-lua is a Lua 5.1

    runtime = lupa.LuaRuntime(register_eval=False, register_builtins=False)
    g = runtime.globals()
    # Argo CD's Lua VM opens only the safe libraries: a script that reaches for io/os/require works
    # in a test but not in Argo CD, so it must fail here too.
    for name in ("io", "os", "package", "require", "debug", "dofile", "loadfile", "load", "loadstring"):
        g[name] = None
    g.obj = _to_lua(runtime, json.loads(json.dumps(obj)))
    result = runtime.execute(health_lua(kind))
    assert result is not None, f"{kind} health.lua returned nothing"
    out = dict(result)
    assert set(out) <= {"status", "message"}, out
    assert out["status"] in ("Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"), out
    assert isinstance(out.get("message"), str) and out["message"], out
    return out


__all__ = ["all_paths", "dataset_paths", "federation_paths", "finetunejob_paths", "synthetic_paths", "plan_synthetic",
           "policy_obj", "run_health", "governance"]
