"""kstatus conditions (Ready, Reconciling, Stalled) on what the decisions produce, judged by the
kstatus rules Flux uses (kstatus.compute, a port of sigs.k8s.io/cli-utils pkg/kstatus/status's
generic rules), along every path: success, governance blocked, invalid dataset, suspended, rejected,
awaiting approval, the in-progress phases and a status for an older generation."""

from __future__ import annotations

import copy
import itertools

import pytest
import yaml

import gitops_statuses as paths
from finetune_operator import decisions, kstatus
from finetune_operator.api.dataset import DatasetStatus
from finetune_operator.api.federated import FederatedFineTuneJobStatus
from finetune_operator.api.finetunejob import FineTuneJobStatus
from finetune_operator.api.synthetic import SyntheticDatasetStatus
from finetune_operator.conditions import get_condition

ALL = paths.all_paths()

#: path -> (kstatus verdict, Ready, Reconciling, Stalled)
EXPECTED = {
    "Dataset/validating": ("InProgress", "False", "True", "False"),
    "Dataset/validating-running": ("InProgress", "False", "True", "False"),
    "Dataset/ready": ("Current", "True", "False", "False"),
    "Dataset/invalid": ("Failed", "False", "False", "True"),
    "Dataset/failed": ("Failed", "False", "False", "True"),
    "Dataset/rejected": ("Failed", "False", "False", "True"),
    "Dataset/revalidating": ("InProgress", "False", "True", "False"),
    "Dataset/stale": ("InProgress", "True", "False", "False"),  # the old verdict, a newer generation
    "FineTuneJob/waiting-missing-dataset": ("InProgress", "False", "True", "False"),
    "FineTuneJob/waiting-validating-dataset": ("InProgress", "False", "True", "False"),
    "FineTuneJob/waiting-invalid-dataset": ("Failed", "False", "False", "True"),
    "FineTuneJob/queued": ("InProgress", "False", "True", "False"),
    "FineTuneJob/unschedulable": ("InProgress", "False", "True", "False"),
    "FineTuneJob/preempted": ("InProgress", "False", "True", "False"),
    "FineTuneJob/infeasible": ("Failed", "False", "False", "True"),
    "FineTuneJob/training": ("InProgress", "False", "True", "False"),
    "FineTuneJob/suspended": ("Current", "False", "False", "False"),
    "FineTuneJob/oom": ("Failed", "False", "False", "True"),
    "FineTuneJob/evaluating": ("InProgress", "False", "True", "False"),
    "FineTuneJob/succeeded": ("Current", "True", "False", "False"),
    "FineTuneJob/awaiting-approval": ("Current", "False", "False", "False"),
    "FineTuneJob/governance-blocked": ("Failed", "False", "False", "True"),
    "FineTuneJob/rejected": ("Failed", "False", "False", "True"),
    "FineTuneJob/rejected-then-fixed": ("InProgress", "False", "True", "False"),
    "FineTuneJob/stale": ("InProgress", "True", "False", "False"),
    # Serving targets do not move kstatus: Ready means promoted; `Published` says how serving went.
    "FineTuneJob/publishing": ("Current", "True", "False", "False"),
    "FineTuneJob/publish-failed": ("Current", "True", "False", "False"),
    "FineTuneJob/rolled-back": ("Current", "True", "False", "False"),
    "SyntheticDataset/waiting-seed": ("InProgress", "False", "True", "False"),
    "SyntheticDataset/seed-invalid": ("Failed", "False", "False", "True"),
    "SyntheticDataset/waiting-generator": ("InProgress", "False", "True", "False"),
    "SyntheticDataset/generating": ("InProgress", "False", "True", "False"),
    "SyntheticDataset/generation-failed": ("Failed", "False", "False", "True"),
    "SyntheticDataset/no-candidates": ("Failed", "False", "False", "True"),
    # People review: nothing for the operator to do, nothing stuck (AwaitingApproval's rule).
    "SyntheticDataset/reviewing": ("Current", "False", "False", "False"),
    "SyntheticDataset/low-acceptance": ("Failed", "False", "False", "True"),
    "SyntheticDataset/finalizing": ("InProgress", "False", "True", "False"),
    "SyntheticDataset/dataset-created": ("InProgress", "False", "True", "False"),
    "SyntheticDataset/ready": ("Current", "True", "False", "False"),
    "SyntheticDataset/dataset-invalid": ("Failed", "False", "False", "True"),
    "FederatedFineTuneJob/waiting-missing-dataset": ("InProgress", "False", "True", "False"),
    "FederatedFineTuneJob/waiting-validating-dataset": ("InProgress", "False", "True", "False"),
    "FederatedFineTuneJob/no-consent": ("Failed", "False", "False", "True"),  # until the Dataset consents
    "FederatedFineTuneJob/starting": ("InProgress", "False", "True", "False"),
    "FederatedFineTuneJob/training": ("InProgress", "False", "True", "False"),
    "FederatedFineTuneJob/evaluating": ("InProgress", "False", "True", "False"),
    "FederatedFineTuneJob/awaiting-approval": ("Current", "False", "False", "False"),
    "FederatedFineTuneJob/succeeded": ("Current", "True", "False", "False"),
    "FederatedFineTuneJob/governance-blocked": ("Failed", "False", "False", "True"),
    "FederatedFineTuneJob/server-failed": ("Failed", "False", "False", "True"),
    "FederatedFineTuneJob/stale": ("InProgress", "True", "False", "False"),
}


def test_every_decision_path_is_covered():
    assert set(ALL) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_kstatus_of_each_decision_path(name):
    obj = ALL[name]
    verdict, ready, reconciling, stalled = EXPECTED[name]
    conds = obj["status"]["conditions"]
    got = tuple((get_condition(conds, t) or {}).get("status") for t in kstatus.TYPES)
    assert got == (ready, reconciling, stalled), (name, obj["status"]["phase"], got)
    assert kstatus.compute(obj)[0] == verdict
    generation = obj["metadata"]["generation"]
    for t in kstatus.TYPES:
        cond = get_condition(conds, t)
        # Every kstatus condition says which generation it describes (the stale ones describe the last seen).
        assert cond["observedGeneration"] == (1 if name.endswith("/stale") else generation)
        assert cond["reason"] and "\n" not in cond["message"] and len(cond["message"]) <= 1024
    # The existing conditions stay: kstatus adds three, it replaces none.
    model = {"Dataset": DatasetStatus, "FineTuneJob": FineTuneJobStatus,
             "SyntheticDataset": SyntheticDatasetStatus, "FederatedFineTuneJob": FederatedFineTuneJobStatus}[obj["kind"]]
    model.model_validate(obj["status"])


def test_reconciling_reason_is_the_phase_and_stalled_reason_says_why():
    for name, obj in ALL.items():
        conds, phase = obj["status"]["conditions"], obj["status"]["phase"]
        if get_condition(conds, "Reconciling")["status"] == "True":
            assert get_condition(conds, "Reconciling")["reason"] == phase
            assert get_condition(conds, "Reconciling")["message"] == obj["status"]["message"]
    stalled = {n: get_condition(o["status"]["conditions"], "Stalled") for n, o in ALL.items()}
    assert stalled["FineTuneJob/governance-blocked"]["reason"] == "GovernanceFailed"
    assert "evaluation, bias" in stalled["FineTuneJob/governance-blocked"]["message"]
    assert stalled["FineTuneJob/oom"]["reason"] == "OOMKilled"
    assert stalled["FineTuneJob/rejected"]["reason"] == stalled["Dataset/rejected"]["reason"] == decisions.REJECTED
    assert stalled["FineTuneJob/waiting-invalid-dataset"]["reason"] == "DatasetInvalid"
    assert stalled["Dataset/invalid"]["reason"] == "MalformedLines"
    assert "line 3" in stalled["Dataset/invalid"]["message"]
    # kstatus' Failed message is the Stalled message: what Flux prints when a health check fails.
    assert kstatus.compute(ALL["Dataset/invalid"])[1] == stalled["Dataset/invalid"]["message"]


def test_awaiting_approval_is_not_ready_not_stalled_and_not_reconciling():
    obj = ALL["FineTuneJob/awaiting-approval"]
    conds = obj["status"]["conditions"]
    assert [get_condition(conds, t)["reason"] for t in kstatus.TYPES] == ["AwaitingApproval"] * 3
    assert get_condition(conds, "Promoted")["status"] == "False"


def test_existing_conditions_are_kept_in_order():
    conds = ALL["FineTuneJob/succeeded"]["status"]["conditions"]
    assert [c["type"] for c in conds] == ["DatasetReady", "Trained", "Ready", "Reconciling", "Stalled",
                                          "GovernancePassed", "Promoted"]
    dataset = ALL["Dataset/ready"]["status"]["conditions"]
    assert get_condition(dataset, "Ready")["reason"] == "Validated"  # plan_dataset's own Ready is kept


def test_stale_observed_generation_is_in_progress_whatever_the_conditions_say():
    for kind in ("Dataset", "FineTuneJob"):
        verdict, message = kstatus.compute(ALL[f"{kind}/stale"])
        assert verdict == "InProgress" and message == f"{kind} generation is 2, but latest observed generation is 1"
    # Validating generation 2 after a Ready generation 1: the Dataset keeps observedGeneration 1
    # until the verdict, so kstatus says InProgress even before it looks at Reconciling.
    revalidating = ALL["Dataset/revalidating"]
    assert revalidating["status"]["observedGeneration"] == 1
    assert kstatus.compute(revalidating)[1].startswith("Dataset generation is 2")


def test_reconciles_stay_idempotent_and_transitions_move_only_on_a_flip():
    # Same observation twice: no second patch.
    validating = ALL["Dataset/validating"]
    again = decisions.plan_dataset(validating, None, [], None, paths.CFG, paths.T3)
    assert again.status is None or again.status == validating["status"]
    ready = ALL["Dataset/ready"]
    assert decisions.plan_dataset(ready, None, [], None, paths.CFG, paths.T3).status is None
    succeeded = ALL["FineTuneJob/succeeded"]
    assert decisions.plan_finetunejob(succeeded, decisions.JobInputs(), paths.CFG, paths.T3).status is None
    # Queued (T0) -> Training (T1): Reconciling stays True (reason changes, lastTransitionTime does not).
    queued, training = ALL["FineTuneJob/queued"], ALL["FineTuneJob/training"]
    q, t = (get_condition(o["status"]["conditions"], "Reconciling") for o in (queued, training))
    assert (q["reason"], t["reason"]) == ("Queued", "Training")
    assert q["lastTransitionTime"] == t["lastTransitionTime"] == paths.T0
    # Evaluating (T2) -> Succeeded (T3): Reconciling flips (T3), Stalled stays False since T0.
    done = succeeded["status"]["conditions"]
    assert get_condition(done, "Reconciling")["lastTransitionTime"] == paths.T3
    assert get_condition(done, "Stalled")["lastTransitionTime"] == paths.T0
    assert get_condition(done, "Ready")["lastTransitionTime"] == paths.T3


def test_an_object_written_before_kstatus_conditions_gets_them_once():
    """Upgrade: a Ready Dataset from an older operator has only its Ready condition."""
    ready = copy.deepcopy(ALL["Dataset/ready"])
    ready["status"]["conditions"] = [c for c in ready["status"]["conditions"] if c["type"] == "Ready"]
    plan = decisions.plan_dataset(ready, None, [], None, paths.CFG, paths.T3)
    assert [c["type"] for c in plan.status["conditions"]] == ["Ready", "Reconciling", "Stalled"]
    assert not plan.create and not plan.events
    ready["status"] = plan.status
    assert decisions.plan_dataset(ready, None, [], None, paths.CFG, paths.T3).status is None


def test_conditions_for_every_phase_is_consistent():
    """Over every phase x a Dataset-wait reason: at most one of Ready/Reconciling/Stalled is True,
    Ready only in the success phase, and kstatus never says Current for work in progress."""
    phases = {"Dataset": ("Pending", "Validating", "Ready", "Invalid", "Failed"),
              "FineTuneJob": ("Pending", "WaitingForDataset", "Queued", "Training", "Evaluating",
                              "AwaitingApproval", "Succeeded", "Failed", "Suspended")}
    reasons = ("DatasetNotFound", "DatasetValidating", "DatasetInvalid", "DatasetFailed")
    for kind, phase_list in phases.items():
        for phase, reason in itertools.product(phase_list, reasons):
            status = {"phase": phase, "message": f"{phase} now", "observedGeneration": 3,
                      "conditions": [{"type": "DatasetReady", "status": "False", "reason": reason, "message": "",
                                      "lastTransitionTime": paths.T0, "observedGeneration": 3}]}
            conds = kstatus.conditions_for(kind, status, 3, paths.T1)
            values = {t: get_condition(conds, t)["status"] == "True" for t in kstatus.TYPES}
            assert sum(values.values()) <= 1, (kind, phase, reason, values)
            assert values["Ready"] == (phase == kstatus.READY_PHASE[kind])
            verdict = kstatus.compute({"kind": kind, "metadata": {"generation": 3},
                                       "status": {**status, "conditions": conds}})[0]
            if phase in kstatus.IN_PROGRESS[kind]:
                assert verdict in ("InProgress", "Failed"), (kind, phase, verdict)
            assert kstatus.conditions_for(kind, {**status, "conditions": conds}, 3, paths.T2) == conds
    with pytest.raises(ValueError, match="GovernancePolicy"):
        kstatus.conditions_for("GovernancePolicy", {}, 1, paths.T0)


def test_the_kstatus_port_follows_cli_utils_generic_rules():
    """The documented order: deletion, then generation, then the first Reconciling/Stalled True."""
    base = {"kind": "FineTuneJob", "metadata": {"generation": 2}}

    def cond(t, s):
        return {"type": t, "status": s, "reason": "R", "message": f"{t} {s}"}

    assert kstatus.compute({**base, "status": {"observedGeneration": 2}}) == ("Current", "Resource is current")
    assert kstatus.compute({**base})[0] == "Current"  # no status at all: nothing to wait for
    deleting = {**base, "metadata": {"generation": 2, "deletionTimestamp": "2026-01-01T00:00:00Z"},
                "status": {"observedGeneration": 1}}
    assert kstatus.compute(deleting)[0] == "Terminating"
    assert kstatus.compute({**base, "status": {"observedGeneration": 1, "conditions": [cond("Stalled", "True")]}})[0] \
        == "InProgress"
    both = {**base, "status": {"observedGeneration": 2,
                               "conditions": [cond("Stalled", "True"), cond("Reconciling", "True")]}}
    assert kstatus.compute(both) == ("Failed", "Stalled True")
    assert kstatus.compute({**base, "status": {"conditions": [cond("Reconciling", "True")]}})[0] == "InProgress"
    # Ready is not one of kstatus' generic conditions: Ready=False alone is Current.
    assert kstatus.compute({**base, "status": {"observedGeneration": 2, "conditions": [cond("Ready", "False")]}})[0] \
        == "Current"
    assert kstatus.compute({**base, "status": {"observedGeneration": 2,
                                               "conditions": [cond("Reconciling", "False"),
                                                              cond("Stalled", "Unknown")]}})[0] == "Current"


# --- docs/gitops.md: the table of statuses, and the Flux examples ---------------------------------

DOC = (paths.REPO / "docs" / "gitops.md").read_text()
FLUX = paths.REPO / "examples" / "flux"


def doc_table() -> list[dict]:
    """The rows of docs/gitops.md's 'Every status' table, by column name."""
    lines = [line for line in DOC.split("## Every status", 1)[1].split("\n## ", 1)[0].splitlines()
             if line.startswith("|")]
    header = [c.strip().replace("`", "") for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip().strip("`") for c in line.strip("|").split("|")))) for line in lines[2:]]


def flux_exprs() -> dict[str, dict]:
    """kind -> the healthCheckExprs entry of examples/flux/finetune-job-promoted.yaml."""
    doc = yaml.safe_load((FLUX / "finetune-job-promoted.yaml").read_text())
    return {e["kind"]: e for e in doc["spec"]["healthCheckExprs"]}


def flux_cel_status(obj: dict, exprs: dict) -> str:
    """Flux's healthCheckExprs rules (RFC-0009, as implemented in Flux 2.5): a status for another
    generation is InProgress; then inProgress, failed, current in that order, the first true wins;
    none true -> InProgress. An expression that cannot be evaluated (a missing field) never yields
    Current."""
    import celpy  # cel-python (dev extra), as tests/test_api.py uses for the CRDs' CEL rules

    status = obj.get("status") or {}
    if "observedGeneration" in status and status["observedGeneration"] != obj["metadata"].get("generation"):
        return "InProgress"
    env = celpy.Environment()
    activation = {k: celpy.json_to_cel(v) for k, v in obj.items()
                  if k in ("apiVersion", "kind", "metadata", "spec", "status")}
    for key, verdict in (("inProgress", "InProgress"), ("failed", "Failed"), ("current", "Current")):
        if exprs.get(key):
            try:
                result = env.program(env.compile(exprs[key])).evaluate(activation)
            except celpy.CELEvalError:
                return "InProgress"
            if isinstance(result, celpy.celtypes.BoolType) and bool(result):
                return verdict
    return "InProgress"


def test_docs_table_is_what_kstatus_flux_and_argo_cd_compute():
    rows = doc_table()
    assert {f"{r['Kind']}/{r['Case']}" for r in rows} == set(ALL), "docs/gitops.md must list every decision path"
    exprs = flux_exprs()
    for row in rows:
        name = f"{row['Kind']}/{row['Case']}"
        obj = ALL[name]
        conds = obj["status"]["conditions"]
        got = {"Phase": obj["status"]["phase"],
               **{t: get_condition(conds, t)["status"] for t in kstatus.TYPES},
               "kstatus (Flux healthChecks)": kstatus.compute(obj)[0],
               "Flux healthCheckExprs (promoted)": flux_cel_status(obj, exprs[obj["kind"]]),
               "Argo CD": paths.run_health(obj["kind"], obj)["status"]}
        assert got == {k: row[k] for k in got}, name


def test_strict_flux_expressions_never_call_an_unwritten_status_current():
    exprs = flux_exprs()
    for kind, obj in (("Dataset", paths.dataset_obj()), ("FineTuneJob", paths.ftj_obj())):
        obj.pop("status")
        assert flux_cel_status(obj, exprs[kind]) == "InProgress"
        assert kstatus.compute(obj)[0] == "Current"  # what the docs warn about plain kstatus


def test_docs_quote_the_flux_examples_as_they_are():
    plain = (FLUX / "finetune-job.yaml").read_text()
    body = plain[plain.index("apiVersion:"):]
    assert f"```yaml\n{body}```" in DOC
    strict = (FLUX / "finetune-job-promoted.yaml").read_text()
    quoted = strict[strict.index("  wait: true"):]
    assert f"```yaml\n{quoted}```" in DOC
    for path in (FLUX / "finetune-job.yaml", FLUX / "finetune-job-promoted.yaml"):
        doc = yaml.safe_load(path.read_text())
        assert doc["apiVersion"] == "kustomize.toolkit.fluxcd.io/v1" and doc["kind"] == "Kustomization"
        assert doc["spec"]["timeout"] and doc["spec"]["sourceRef"]["kind"] == "GitRepository"
    checks = yaml.safe_load(plain)["spec"]["healthChecks"]
    assert checks == [{"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "support-assistant",
                       "namespace": "team-support"}]


def test_readme_links_the_gitops_docs():
    assert "(docs/gitops.md)" in (paths.REPO / "README.md").read_text()
