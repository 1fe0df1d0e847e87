"""Preemption is a pause, not a failure.

Kueue preempts a workload by suspending its Job (.spec.suspend = true, set by Kueue, not by us):
the Job controller deletes the pods, each gets SIGTERM, the trainer finishes its step, writes a
checkpoint within terminationGracePeriodSeconds and exits 5 (EXIT_PREEMPTED, which the Job's
podFailurePolicy ignores). The workload is requeued; when Kueue admits it again it unsuspends the
same Job and the new pods resume from that checkpoint.

The FineTuneJob says so: condition `Preempted` (True while the Job is held back, False with reason
`Readmitted` once it runs again), phase Queued with a message that says it was preempted, and
GPU-hours frozen at the moment the Job was suspended (no pod holds a GPU meanwhile; the hours so
far are written on the Job, since the Job controller restarts .status.startTime on resume).
A spec.suspend of our own is handled before this (decisions: phase Suspended).
"""

from __future__ import annotations

from typing import Optional

CONDITION = "Preempted"


def preempted(job: Optional[dict], status: dict, reason: str) -> bool:
    """The trainer Job was suspended by someone else (Kueue) after it had started training."""
    return bool(job and job.get("suspended") and reason == "JobSuspended" and status.get("startTime"))


def message(job_name: str, progress: Optional[dict]) -> str:
    step = (progress or {}).get("step")
    at = f" (last progress: step {step})" if step else ""
    return (f"preempted: trainer Job {job_name} was suspended (Kueue requeued its workload){at}; its pods "
            "checkpointed on SIGTERM and it resumes from the last checkpoint when it is admitted again")
