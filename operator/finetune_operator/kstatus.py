"""kstatus conditions: `Ready`, `Reconciling` and `Stalled`, derived from the phase the decisions chose.

GitOps tools read status by convention, not by kind: Flux (and kpt, cli-utils' `kstatus`) looks
for `Reconciling` and `Stalled` ("abnormal-true" conditions) and `observedGeneration`; people and
`kubectl wait --for=condition=Ready` look for `Ready`. Our own conditions (`Trained`,
`GovernancePassed`, `Promoted`, ...) say what happened; these three say where the object stands, so
they are computed in one place from the status the decisions already produced (`conditions_for`),
and never decided anywhere else.

The mapping (docs/gitops.md has the same table for users):

=================  ==========================================  =====  ===========  =======  ==========
kind               phase                                       Ready  Reconciling  Stalled  kstatus
=================  ==========================================  =====  ===========  =======  ==========
Dataset            Pending, Validating                         False  True         False    InProgress
Dataset            Ready                                       True   False        False    Current
Dataset            Invalid, Failed                             False  False        True     Failed
FineTuneJob        Pending, Queued, Training, Evaluating       False  True         False    InProgress
FineTuneJob        WaitingForDataset (Dataset missing/busy)    False  True         False    InProgress
FineTuneJob        WaitingForDataset (Dataset Invalid/Failed)  False  False        True     Failed
FineTuneJob        AwaitingApproval, Suspended                 False  False        False    Current
FineTuneJob        Succeeded (promoted)                        True   False        False    Current
FineTuneJob        Failed (blocked, rejected, failed)          False  False        True     Failed
SyntheticDataset   Pending, WaitingForInputs, Generating,      False  True         False    InProgress
                   Finalizing
SyntheticDataset   WaitingForInputs (seed Invalid, ...)        False  False        True     Failed
SyntheticDataset   Reviewing (people review)                   False  False        False    Current
SyntheticDataset   Ready (its Dataset is Ready)                True   False        False    Current
SyntheticDataset   Invalid, Failed                             False  False        True     Failed
Federated...       Pending, WaitingForDatasets, Starting,      False  True         False    InProgress
                   Training, Evaluating
Federated...       AwaitingApproval                            False  False        False    Current
Federated...       Succeeded (promoted)                        True   False        False    Current
Federated...       Failed (refused, server failed, blocked)    False  False        True     Failed
=================  ==========================================  =====  ===========  =======  ==========

AwaitingApproval is not Ready (nothing was promoted) and not Stalled (nothing is wrong): the
operator has no work left until a person approves, so Reconciling is False and kstatus says
Current. A Flux Kustomization therefore does not time out while a reviewer looks at the report;
Argo CD shows it as Suspended (helm/finetune-operator/argocd/). Suspended is the same.

GovernancePolicy has no status writer (the operator only reads policies), so it gets none of
these; kstatus reports an object without conditions as Current, which is right for configuration.

`compute` is a port of kstatus' generic rules (sigs.k8s.io/cli-utils pkg/kstatus/status,
checkGenericProperties): what Flux's `wait`/`healthChecks` will conclude from a status.
"""

from __future__ import annotations

from typing import Any, Optional

from .conditions import bounded, get_condition, set_condition

READY, RECONCILING, STALLED = "Ready", "Reconciling", "Stalled"
TYPES = (READY, RECONCILING, STALLED)

#: Phases in which the operator still has work to do.
IN_PROGRESS = {
    "Dataset": ("Pending", "Validating"),
    "FineTuneJob": ("Pending", "WaitingForDataset", "Queued", "Training", "Evaluating"),
    # Reviewing is not in progress: it waits for people, as AwaitingApproval does (Current, not stalled).
    "SyntheticDataset": ("Pending", "WaitingForInputs", "Generating", "Finalizing"),
    "FederatedFineTuneJob": ("Pending", "WaitingForDatasets", "Starting", "Training", "Evaluating"),
}
#: Phases that cannot move without a change (of the spec, the data, the policy).
STALLED_PHASES = {"Dataset": ("Invalid", "Failed"), "FineTuneJob": ("Failed",),
                  "SyntheticDataset": ("Invalid", "Failed"), "FederatedFineTuneJob": ("Failed",)}
#: The successful terminal phase.
READY_PHASE = {"Dataset": "Ready", "FineTuneJob": "Succeeded", "SyntheticDataset": "Ready",
               "FederatedFineTuneJob": "Succeeded"}
#: Kinds whose plan sets Ready itself, with the specific reason (kept as it is).
OWN_READY = ("Dataset", "SyntheticDataset")
#: A FineTuneJob waiting for a Dataset that will not become Ready unless someone changes it.
STALLED_DATASET_REASONS = ("DatasetInvalid", "DatasetFailed")
#: A SyntheticDataset whose seed or generator will not become usable unless someone changes it.
STALLED_INPUT_REASONS = ("SeedInvalid", "SeedFailed", "SeedFormat", "GeneratorFailed")

#: Kinds the operator writes a status for.
KINDS = tuple(IN_PROGRESS)


def _stall_reason(kind: str, status: dict) -> Optional[str]:
    """The specific reason the object cannot progress, or None when it can."""
    phase = status.get("phase") or "Pending"
    conds = status.get("conditions") or []
    if phase in STALLED_PHASES.get(kind, ()):
        # The condition that already says why: Dataset's Ready (TooFewExamples, JobRejected, ...),
        # FineTuneJob's Failed (GovernanceFailed, OOMKilled, JobRejected, ...).
        said = get_condition(conds, READY if kind in OWN_READY else "Failed") or {}
        return said.get("reason") or phase
    if kind == "FineTuneJob" and phase == "WaitingForDataset":
        dataset = get_condition(conds, "DatasetReady") or {}
        if dataset.get("status") == "False" and dataset.get("reason") in STALLED_DATASET_REASONS:
            return dataset["reason"]
    if kind == "SyntheticDataset" and phase == "WaitingForInputs":
        inputs = get_condition(conds, "InputsReady") or {}
        if inputs.get("status") == "False" and inputs.get("reason") in STALLED_INPUT_REASONS:
            return inputs["reason"]
    return None


def conditions_for(kind: str, status: dict, generation: int, now: str) -> list[dict]:
    """`status['conditions']` with Ready, Reconciling and Stalled set from the phase.

    Pure and idempotent: the same status gives the same list, and set_condition keeps
    lastTransitionTime unless a condition's status flips, so a reconcile that changes nothing else
    patches nothing. Other conditions are kept as they are, in their order.
    """
    if kind not in KINDS:
        raise ValueError(f"kstatus conditions are not defined for kind {kind!r}")
    phase = status.get("phase") or "Pending"
    message = bounded(status.get("message") or phase)
    conds = list(status.get("conditions") or [])
    stall = _stall_reason(kind, status)
    ready = phase == READY_PHASE[kind]
    reconciling = stall is None and phase in IN_PROGRESS[kind]

    old_ready = get_condition(conds, READY)
    if old_ready and old_ready.get("status") == ("True" if ready else "False") and kind in OWN_READY:
        # plan_dataset sets Dataset's Ready itself, with the specific reason: kept as it is.
        ready_reason, ready_message = old_ready.get("reason") or phase, old_ready.get("message") or message
    elif ready:
        ready_reason = "Validated" if kind == "Dataset" else (
            "RolledBack" if (status.get("promotion") or {}).get("state") == "RolledBack" else "Promoted")
        ready_message = message
    else:
        ready_reason, ready_message = stall or phase, message
    conds = set_condition(conds, READY, ready, ready_reason, ready_message, generation, now)
    conds = set_condition(conds, RECONCILING, reconciling, phase,
                          message if reconciling else f"no work in progress ({phase})", generation, now)
    conds = set_condition(conds, STALLED, stall is not None, stall or phase,
                          message if stall else f"not stalled ({phase})", generation, now)
    return conds


def with_conditions(kind: str, obj: dict, status: Optional[dict], now: str) -> Optional[dict]:
    """The status to write: `status` (a plan's new status, or None for "unchanged") with the
    kstatus conditions set. None when the object's stored status already has them right."""
    base = status if status is not None else (obj.get("status") or {})
    if not base:
        return status
    generation = (obj.get("metadata") or {}).get("generation") or 1
    conds = conditions_for(kind, base, generation, now)
    if conds == base.get("conditions"):
        return status
    return {**base, "conditions": conds}


# --- what kstatus concludes (a port of cli-utils' generic rules) ---------------------------------

CURRENT, IN_PROGRESS_STATUS, FAILED, TERMINATING = "Current", "InProgress", "Failed", "Terminating"


def compute(obj: dict) -> tuple[str, str]:
    """(status, message) as kstatus' generic rules compute them for a custom resource:

    1. metadata.deletionTimestamp set -> Terminating;
    2. status.observedGeneration present and != metadata.generation -> InProgress
       (LatestGenerationNotObserved);
    3. a condition Reconciling=True -> InProgress; Stalled=True -> Failed (the first one found, in
       the list's order, as cli-utils loops);
    4. otherwise Current (no known condition means "nothing in progress").
    """
    meta: dict[str, Any] = obj.get("metadata") or {}
    status: dict[str, Any] = obj.get("status") or {}
    if meta.get("deletionTimestamp"):
        return TERMINATING, "Resource scheduled for deletion"
    generation = meta.get("generation")
    if generation is not None and "observedGeneration" in status and status["observedGeneration"] != generation:
        return IN_PROGRESS_STATUS, (f"{obj.get('kind')} generation is {generation}, but latest observed generation "
                                    f"is {status['observedGeneration']}")
    for cond in status.get("conditions") or []:
        if cond.get("type") == RECONCILING and cond.get("status") == "True":
            return IN_PROGRESS_STATUS, cond.get("message") or ""
        if cond.get("type") == STALLED and cond.get("status") == "True":
            return FAILED, cond.get("message") or ""
    return CURRENT, "Resource is current"
