"""The operator and the trainer survive what a real cluster does to them: the operator SIGKILLed
mid-training (no second Job), a trainer pod deleted (the Job controller replaces it and the
trainer resumes from its checkpoint, the exit code 5 of a SIGTERMed trainer not counted as a
failure) and spec.suspend (the Job suspended in place, then resumed from the checkpoint).

Each run is slowed down to ~0.25 s per step (FINETUNE_DEBUG_STEP_SLEEP) so it can be interrupted
mid-way. One operator subprocess per module; a fresh namespace per test.
"""

from __future__ import annotations

import json
import time

import pytest

from realcluster import operator_harness as h
from realcluster.realk8s import wait_for

from finetune_operator.conditions import get_condition
from finetune_trainer import storage

STEPS = 40


@pytest.fixture(scope="module")
def stack(fakenode, crds, s3_server, tiny_model_dir, tmp_path_factory):
    with h.operator_stack(fakenode, s3_server, tiny_model_dir, tmp_path_factory.mktemp("operator")) as st:
        yield st


@pytest.fixture()
def ns(stack):
    name = h.new_namespace(stack.cluster, stack.prefix)
    yield name
    h.delete_namespace(stack.cluster, name)


def start_slow_job(stack, ns, name: str, **spec) -> str:
    c = stack.cluster
    h.ready_dataset(c, stack.bucket, ns)
    output = f"s3://{stack.bucket}/runs/{ns}/{name}"
    c.apply(h.finetunejob_manifest(name, ns, "ready", stack.model_uri, output,
                                   training={"maxSteps": STEPS, "checkpointEverySteps": 4}, **spec))
    return output


def seconds(stamp: str) -> float:
    import datetime

    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def wait_step(stack, ns, name: str, at_least: int, timeout: float = 120) -> int:
    return wait_for(lambda: (s := h.status(stack.cluster, ns, name)).get("phase") == "Training"
                    and ((s.get("progress") or {}).get("step") or 0) >= at_least and s["progress"]["step"],
                    timeout=timeout, interval=0.5, what=f"{name} training past step {at_least}")


def trainer_log_events(log: str, event: str) -> list[dict]:
    out = []
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == event:
            out.append(record)
    return out


def test_operator_sigkilled_mid_training_makes_no_second_job(stack, ns):
    c = stack.cluster
    start_slow_job(stack, ns, "crash")
    wait_step(stack, ns, "crash", 4)
    before = h.jobs(c, ns)
    assert sorted(before) == ["crash-train-1", "ready-validate-1"], before

    stack.op.kill()  # SIGKILL: no cleanup handler, nothing flushed
    try:
        assert not stack.op.alive()
        time.sleep(3)  # the trainer keeps running meanwhile
    finally:
        stack.op.start()

    done = h.wait_phase(c, ns, "crash", ("Succeeded", "Failed"), 180, stack.op)
    assert done["phase"] == "Succeeded", done
    after = h.jobs(c, ns)
    # The same Jobs, same uids (adopted or left alone, never re-created); no new one in the job's
    # namespace, and one governance Job in the operator's.
    assert after == before
    assert [k for k in h.jobs(c, stack.operator_namespace) if k.startswith(f"{ns}-crash-")] == [done["governanceJob"]]
    assert done["trainerJob"] == "crash-train-1" and done["progress"]["step"] == STEPS
    assert len(h.pods(c, ns, "crash-train-1")) == 1  # the trainer was never restarted either


def test_deleted_trainer_pod_is_replaced_and_resumes_from_its_checkpoint(stack, ns):
    c = stack.cluster
    output = start_slow_job(stack, ns, "evict")
    wait_step(stack, ns, "evict", 8)
    first = h.pods(c, ns, "evict-train-1")
    assert len(first) == 1
    c.kubectl("delete", "pod", first[0]["metadata"]["name"], "-n", ns, "--wait=false")

    # fakenode sends SIGTERM; the trainer checkpoints and exits 5; the Job controller makes a new pod.
    replacement = wait_for(lambda: [p for p in h.pods(c, ns, "evict-train-1")
                                    if p["metadata"]["uid"] != first[0]["metadata"]["uid"]], timeout=90,
                           what="a replacement pod")
    done = h.wait_phase(c, ns, "evict", ("Succeeded", "Failed"), 180, stack.op)
    assert done["phase"] == "Succeeded", done
    job = c.get("job", "evict-train-1", ns)
    # podFailurePolicy ignores exit code 5: not counted against backoffLimit.
    assert not job["status"].get("failed"), job["status"]
    assert job["status"].get("succeeded") == 1
    log = h.pod_logs(c, ns, replacement[0]["metadata"]["name"])
    resumed = trainer_log_events(log, "resume")
    assert resumed and resumed[0]["step"] > 0, log[-2000:]
    assert resumed[0]["uri"].startswith(f"{output}/checkpoints/")
    assert json.loads(storage.read_text(f"{output}/result.json"))["metrics"]["steps"] == STEPS
    assert done["trainerJob"] == "evict-train-1"


def test_suspend_stops_the_pod_and_resume_continues_from_the_checkpoint(stack, ns):
    """A GPU job (gpu-node-1), so GPU-hours count: the time suspended is not billed."""
    c = stack.cluster
    output = start_slow_job(stack, ns, "pause", resources={"gpusPerNode": 1})
    wait_step(stack, ns, "pause", 6)
    c.kubectl("patch", "ftj", "pause", "-n", ns, "--type=merge", "-p", '{"spec": {"suspend": true}}')

    suspended = h.wait_phase(c, ns, "pause", ("Suspended",), 30, stack.op)
    assert get_condition(suspended["conditions"], "Suspended")["status"] == "True"
    assert wait_for(lambda: c.get("job", "pause-train-1", ns)["spec"].get("suspend") is True, timeout=20,
                    what="Job .spec.suspend")
    wait_for(lambda: not h.pods(c, ns, "pause-train-1"), timeout=60, what="the trainer pod gone")
    assert any(k.startswith("checkpoints/") for k in storage.list_keys(output))
    held = 8.0
    time.sleep(held)  # suspended: no pod, no GPU-hours
    st = h.status(c, ns, "pause")
    assert st["phase"] == "Suspended" and not h.pods(c, ns, "pause-train-1")
    resumed_at = time.time()

    c.kubectl("patch", "ftj", "pause", "-n", ns, "--type=merge", "-p", '{"spec": {"suspend": false}}')
    pod = wait_for(lambda: [p for p in h.pods(c, ns, "pause-train-1") if p["spec"].get("nodeName")], timeout=60,
                   what="a pod scheduled after resume")[0]
    assert pod["spec"]["nodeName"] == "gpu-node-1"
    done = h.wait_phase(c, ns, "pause", ("Succeeded", "Failed"), 180, stack.op)
    assert done["phase"] == "Succeeded", done
    assert get_condition(done["conditions"], "Suspended")["status"] == "False"
    assert done["trainerJob"] == "pause-train-1"  # the same Job, resumed
    assert sorted(k for k in h.jobs(c, ns) if "-train-" in k) == ["pause-train-1"]
    resumed = trainer_log_events(h.pod_logs(c, ns, pod["metadata"]["name"]), "resume")
    assert resumed and resumed[0]["step"] > 0
    job = c.get("job", "pause-train-1", ns)
    assert not job["status"].get("failed")
    # The Job controller restarted the Job's startTime on resume; the hours before the suspension
    # were kept on the Job, so GPU-hours cover the two running stretches and not the suspension.
    assert seconds(job["status"]["startTime"]) >= resumed_at - 2
    wall = seconds(job["status"]["completionTime"]) - seconds(done["startTime"])
    billed = done["gpuHours"] * 3600
    assert 0 < billed < wall - held * 0.75, (billed, wall)
