"""The operator end to end on the REAL control plane (Kubernetes v1.36: API server, Job controller,
scheduler, garbage collector) with fakenode running the pods: validation, training on a GPU node,
governance, promotion, ftctl against the real server, and the scheduler's Unschedulable verdict.

One operator subprocess serves the whole module (it watches `ftop-*` namespaces; each test has its
own). Tiny model, few steps. See operator_harness.py.
"""

from __future__ import annotations

import json

import pytest

from realcluster import operator_harness as h
from realcluster.realk8s import wait_for

from finetune_operator.conditions import get_condition
from finetune_trainer import storage


@pytest.fixture(scope="module")
def stack(fakenode, crds, s3_server, tiny_model_dir, tmp_path_factory):
    with h.operator_stack(fakenode, s3_server, tiny_model_dir, tmp_path_factory.mktemp("operator")) as st:
        yield st


@pytest.fixture()
def ns(stack):
    name = h.new_namespace(stack.cluster, stack.prefix)
    yield name
    h.delete_namespace(stack.cluster, name)


def test_dataset_validated_by_a_job_that_fakenode_runs(stack, ns):
    c = stack.cluster
    source = h.write_raw_dataset(stack.bucket)
    c.apply(h.dataset_manifest("ds", ns, source))
    ds = wait_for(lambda: (d := c.get("dataset", "ds", ns)).get("status", {}).get("phase") in ("Ready", "Invalid",
                                                                                                 "Failed") and d,
                  timeout=90, interval=1, what="Dataset validated")
    st = ds["status"]
    assert st["phase"] == "Ready", (st, stack.op.logs()[-3000:])
    assert st["stats"]["examples"] >= 10 and st["digest"].startswith("sha256:")
    assert st["validatedURI"].startswith(f"s3://{stack.bucket}/store/datasets/{ns}/ds/1")
    assert st["observedGeneration"] == ds["metadata"]["generation"]
    ready = get_condition(st["conditions"], "Ready")
    assert ready["status"] == "True" and ready["observedGeneration"] == ds["metadata"]["generation"]
    # The validation Job ran as a pod fakenode ran (not in the operator): it exists, completed, and its
    # pod was scheduled onto a fake node.
    job = c.get("job", "ds-validate-1", ns)
    assert job["status"].get("succeeded") == 1
    assert job["metadata"]["ownerReferences"][0]["uid"] == ds["metadata"]["uid"]
    pod = h.pods(c, ns, "ds-validate-1")[0]
    assert pod["spec"]["nodeName"] in ("cpu-node-1", "gpu-node-1")
    assert storage.exists(f"{st['validatedURI']}/train.jsonl")


def test_gpu_job_scheduled_trained_judged_promoted_and_driven_with_ftctl(stack, ns):
    c = stack.cluster
    h.ready_dataset(c, stack.bucket, ns)
    output = f"s3://{stack.bucket}/runs/{ns}/gpu"
    governance = {"required": ["provenance"]}  # a real check, so there is a report to show
    c.apply(h.finetunejob_manifest("gpu", ns, "ready", stack.model_uri, output, governance=governance,
                                   resources={"gpusPerNode": 1,
                                              "gpuNodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H200"}}))
    # The same adapter flow with a manual promotion, on CPU, at the same time (for `ftctl approve`).
    c.apply(h.finetunejob_manifest("manual", ns, "ready", stack.model_uri, f"s3://{stack.bucket}/runs/{ns}/manual",
                                   governance=governance, promotion={"mode": "manual"}))
    watch = h.ftctl_background(c, ns, "watch", "gpu")

    done = h.wait_phase(c, ns, "gpu", ("Succeeded", "Failed"), 240, stack.op)
    assert done["phase"] == "Succeeded", (done, stack.op.logs()[-3000:])

    # The real scheduler placed the trainer pod on the GPU node (request, selector, toleration).
    pod = h.pods(c, ns, "gpu-train-1")[0]
    assert pod["spec"]["nodeName"] == "gpu-node-1"
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}

    adapter = done["adapter"]
    digest = adapter["digest"]
    assert digest.startswith("sha256:") and adapter["uri"].startswith(f"{output}/adapters/")
    assert done["promotion"]["state"] == "Promoted"
    alias = json.loads(storage.read_text(done["promotion"]["aliasURI"]))
    assert alias["adapterDigest"] == digest
    card = storage.read_text(done["promotion"]["modelCardURI"])  # MODEL_CARD.md beside the adapter
    assert card.startswith("---\n") and digest in card and "## Evaluation and governance" in card
    generation = h.ftj(c, ns, "gpu")["metadata"]["generation"]
    assert done["observedGeneration"] == generation
    for cond in ("DatasetReady", "Trained", "GovernancePassed", "Promoted", "Ready"):  # Ready: kstatus's
        got = get_condition(done["conditions"], cond)
        assert got["status"] == "True" and got["observedGeneration"] == generation, got
    assert [ch["name"] for ch in done["governance"]["checks"]] and done["governance"]["passed"] is True
    # The governance Job ran in the operator's namespace (with the signing key, out of the team's
    # reach), with the platform's image, its pod without a service-account token.
    assert not any(j.startswith("gpu-gov") for j in h.jobs(c, ns))
    gov = c.get("job", done["governanceJob"], stack.operator_namespace)
    assert gov["status"].get("succeeded") == 1 and "ownerReferences" not in gov["metadata"]
    assert gov["metadata"]["labels"]["finetune.dev/job-namespace"] == ns
    assert gov["metadata"]["labels"]["finetune.dev/job-uid"] == h.ftj(c, ns, "gpu")["metadata"]["uid"]
    gov_pod = h.pods(c, stack.operator_namespace, done["governanceJob"])[0]
    assert gov_pod["spec"]["containers"][0]["image"] == "ghcr.io/finetune-operator/trainer:realcluster"
    assert gov_pod["spec"]["automountServiceAccountToken"] is False
    assert not any(v.get("projected") for v in gov_pod["spec"]["volumes"])  # no token volume was injected
    assert done["governance"]["signingKey"] and done["governance"]["reportDigest"].startswith("sha256:")
    # The trainer pod has no token either; the namespace's Job NetworkPolicy selects it.
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert not any(v.get("projected") for v in pod["spec"]["volumes"])
    policy = c.get("networkpolicy", "finetune-job-pods", ns)
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/managed-by": "finetune-operator"}
    assert {p["port"] for r in policy["spec"]["egress"] for p in r["ports"]} >= {53}

    reasons = wait_for(lambda: (r := {e["reason"] for e in h.events(c, ns, "gpu")})
                       >= {"TrainerJobCreated", "TrainingStarted", "Trained", "Promoted"} and r,
                       timeout=20, what="Events")
    assert reasons
    table = c.kubectl("get", "ftj", "gpu", "-n", ns).stdout  # the CRD's printer columns
    header, row = table.splitlines()[:2]
    assert header.split()[:3] == ["NAME", "PHASE", "PROGRESS"] and "PROMOTION" in header, table
    assert row.split()[:3] == ["gpu", "Succeeded", "100"] and "Promoted" in row, table
    wide = c.kubectl("get", "ftj", "gpu", "-n", ns, "-o", "wide").stdout  # the adapter column is -o wide
    assert digest in wide, wide

    # ftctl against the real API server.
    out, rc = watch.finish(60)
    assert rc == 0 and "Succeeded" in out and digest in out, out
    status_out = h.ftctl(c, ns, "status", "gpu")
    assert status_out.returncode == 0 and "Succeeded" in status_out.stdout and "Promoted" in status_out.stdout, \
        status_out
    logs_out = h.ftctl(c, ns, "logs", "gpu")
    assert logs_out.returncode == 0 and "training done" in logs_out.stdout and digest in logs_out.stdout, \
        logs_out.stderr
    report_out = h.ftctl(c, ns, "report", "gpu")
    assert report_out.returncode == 0 and "provenance" in report_out.stdout and digest in report_out.stdout, \
        report_out
    assert "promotion: Promoted" in report_out.stdout

    waiting = h.wait_phase(c, ns, "manual", ("AwaitingApproval", "Failed", "Succeeded"), 180, stack.op)
    assert waiting["phase"] == "AwaitingApproval", waiting
    manual_digest = waiting["adapter"]["digest"]
    wrong = h.ftctl(c, ns, "approve", "manual", "--digest", "sha256:" + "0" * 64)
    assert wrong.returncode != 0 or h.wait_phase(c, ns, "manual", ("AwaitingApproval", "Failed"), 20)
    approved = h.ftctl(c, ns, "approve", "manual", "--digest", manual_digest, "--by", "alice")
    assert approved.returncode == 0 and manual_digest in approved.stdout, approved
    promoted = h.wait_phase(c, ns, "manual", ("Succeeded", "Failed"), 60, stack.op)
    assert promoted["phase"] == "Succeeded" and promoted["promotion"]["state"] == "Promoted", promoted
    assert promoted["promotion"]["approvedBy"] == "alice"
    # Secrets never reach status or Events.
    assert "testing" not in json.dumps(done) and "testing" not in json.dumps(h.events(c, ns, "gpu"))


def test_more_gpus_than_any_node_has_is_reported_unschedulable(stack, ns):
    c = stack.cluster
    h.ready_dataset(c, stack.bucket, ns)
    c.apply(h.finetunejob_manifest("big", ns, "ready", stack.model_uri, f"s3://{stack.bucket}/runs/{ns}/big",
                                   resources={"gpusPerNode": 16}))
    st = wait_for(lambda: (s := h.status(c, ns, "big")) and "Insufficient nvidia.com/gpu" in s.get("message", "")
                  and s, timeout=60, interval=1, what="the scheduler's reason in the status")
    # The scheduler's own words (0/2 nodes are available: ... Insufficient nvidia.com/gpu ...), not "Training".
    assert st["phase"] == "Queued" and "0/2 nodes are available" in st["message"], st
    trained = get_condition(st["conditions"], "Trained")
    assert trained["reason"] == "Unschedulable" and "Insufficient nvidia.com/gpu" in trained["message"]
    assert trained["observedGeneration"] == h.ftj(c, ns, "big")["metadata"]["generation"]
    warning = wait_for(lambda: [e for e in h.events(c, ns, "big") if e["reason"] == "Unschedulable"], timeout=20,
                       what="Unschedulable Event")
    assert warning[0]["type"] == "Warning"
    pod = h.pods(c, ns, "big-train-1")[0]
    assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")
    assert h.status(c, ns, "big")["phase"] == "Queued"


def test_a_pod_template_that_admission_refuses_fails_once_and_a_fixed_spec_retries(stack, ns):
    """A PriorityClass that does not exist passes the CRD (any name is valid) and even the Job API
    (a Job's pod template is not admitted): only the Priority admission plugin refuses the pod. The
    FineTuneJob fails with the server's words, says so once in a Warning Event and stops trying;
    a fixed spec (a new generation) tries again."""
    c = stack.cluster
    h.ready_dataset(c, stack.bucket, ns)
    c.apply(h.finetunejob_manifest("prio", ns, "ready", stack.model_uri, f"s3://{stack.bucket}/runs/{ns}/prio",
                                   resources={"priorityClassName": "no-such-class"}))
    failed = h.wait_phase(c, ns, "prio", ("Failed",), 60, stack.op)
    assert "no PriorityClass with name no-such-class" in failed["message"], failed
    assert "spec.resources.priorityClassName" in failed["message"]
    cond = get_condition(failed["conditions"], "Failed")
    assert cond["reason"] == "JobRejected" and cond["observedGeneration"] == 1
    assert "prio-train-1" not in h.jobs(c, ns)  # no Job the Job controller could never give a pod
    first = wait_for(lambda: [e for e in h.events(c, ns, "prio") if e["reason"] == "JobRejected"], timeout=20,
                     what="JobRejected Event")
    assert first[0]["type"] == "Warning" and "no-such-class" in first[0]["message"]
    # It stops: no retries, no more Events, the status stays.
    import time
    time.sleep(6)
    assert [e.get("count", 1) for e in h.events(c, ns, "prio") if e["reason"] == "JobRejected"] == [1]
    assert not [e for e in h.events(c, ns, "prio") if e["reason"] == "ReconcileError"]
    assert h.stack_log_count(stack.op, "prio", "rejected by the API server") == 1
    assert h.status(c, ns, "prio")["phase"] == "Failed"

    c.kubectl("patch", "ftj", "prio", "-n", ns, "--type=json",
              "-p", '[{"op": "remove", "path": "/spec/resources/priorityClassName"}]')
    retried = wait_for(lambda: (s := h.status(c, ns, "prio")).get("observedGeneration") == 2
                       and s.get("phase") in ("Queued", "Training", "Evaluating", "Succeeded") and s,
                       timeout=60, interval=1, what="a retry on the new generation")
    assert get_condition(retried["conditions"], "Failed")["status"] == "False"
    assert wait_for(lambda: "prio-train-1" in h.jobs(c, ns), timeout=30, what="the trainer Job")


def test_signing_key_rotation_old_reports_stay_valid_new_ones_use_the_new_key(stack, ns):
    """The platform rotates the report signing key with `finetune-operator rotate-signing-key`: the
    Secret the operator made holds the new key and keeps the old one as trusted; a job judged before
    keeps its verdict, the next one is signed by the new key and promoted (the operator re-read the
    Secret). The operator's ServiceAccount never needed to read any other Secret for it."""
    import base64
    import subprocess

    from finetune_operator import attestation

    c = stack.cluster
    h.ready_dataset(c, stack.bucket, ns)
    governance = {"required": ["provenance"]}
    c.apply(h.finetunejob_manifest("before", ns, "ready", stack.model_uri, f"s3://{stack.bucket}/runs/{ns}/before",
                                   governance=governance))
    before = h.wait_phase(c, ns, "before", ("Succeeded", "Failed"), 240, stack.op)
    assert before["phase"] == "Succeeded", before
    secret = c.get("secret", "finetune-operator-signing", stack.operator_namespace)
    ring = attestation.Keyring.from_secret_data(secret["data"])
    assert before["governance"]["signingKey"] == ring.signing_key_id

    out = subprocess.run([str(h.BIN / "finetune-operator"), "rotate-signing-key", "--namespace",
                          stack.operator_namespace], env={**c.env, "FINETUNE_CONFIG": ""}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rotated = attestation.Keyring.from_secret_data(c.get("secret", "finetune-operator-signing",
                                                         stack.operator_namespace)["data"])
    assert rotated.signing_key_id != ring.signing_key_id and ring.signing_key_id in rotated.trusted
    assert rotated.signing_key_id in out.stdout and "PRIVATE" not in out.stdout + out.stderr
    assert base64.b64encode(attestation.private_pem(rotated.signing)).decode() not in out.stdout

    # At once: a report signed by a key the operator does not know yet makes it re-read the Secret.
    c.apply(h.finetunejob_manifest("after", ns, "ready", stack.model_uri, f"s3://{stack.bucket}/runs/{ns}/after",
                                   governance=governance))
    after = h.wait_phase(c, ns, "after", ("Succeeded", "Failed"), 240, stack.op)
    assert after["phase"] == "Succeeded", after
    assert after["governance"]["signingKey"] == rotated.signing_key_id
    assert h.status(c, ns, "before")["promotion"]["state"] == "Promoted"  # the old verdict stands
