"""The serving hand-off on the REAL control plane: the publishers against a real API server (a vLLM
ConfigMap, a KServe LLMInferenceService with the CRD written from KServe's schema, server-side apply
with our field manager), the CEL rule on spec.promotion.targets, and the operator end to end: a
promoted FineTuneJob publishes to vLLM (ConfigMap + the runtime LoRA API of a stand-in: vLLM cannot
run here), KServe and a real OCI registry; a successor takes the alias; a rollback
(spec.promotion.revoked) brings every target back to the earlier adapter."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from realcluster import operator_harness as h
from realcluster.realk8s import wait_for

from finetune_operator.api.serving import PromotionTarget, ServedAdapter
from finetune_operator.conditions import get_condition
from finetune_operator.config import OperatorConfig
from finetune_operator.serving import kserve, vllm
from finetune_operator.serving.context import Context, PublishError
from finetune_trainer import storage

HERE = Path(__file__).resolve().parent
A, B = "sha256:" + "a" * 64, "sha256:" + "b" * 64


@pytest.fixture(scope="module")
def kserve_crd(real_cluster):
    folder = HERE / "crds"
    real_cluster.apply(folder / "serving.kserve.io_llminferenceservices.yaml")
    real_cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                         "crd/llminferenceservices.serving.kserve.io")
    return real_cluster


def llm_service(name: str, namespace: str) -> dict:
    return {"apiVersion": "serving.kserve.io/v1alpha1", "kind": "LLMInferenceService",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M", "name": "smollm2",
                               "lora": {"adapters": [{"name": "hand-made", "uri": "hf://someone/adapter"}]}}}}


def _client(cluster):
    import logging

    import kopf

    from finetune_operator import kube

    info = kopf.login_with_kubeconfig(logger=logging.getLogger("test"), settings=kopf.OperatorSettings())
    return kube.Client(info)


def test_publishers_write_only_their_part_of_real_objects(kserve_crd, namespace):
    c = kserve_crd
    c.apply(llm_service("llm", namespace))

    async def scenario():
        client = _client(c)
        ctx = Context(client=client, namespace=namespace, job="j", config=OperatorConfig())
        v = PromotionTarget.model_validate({"name": "v", "vllm": {"configMap": "adapters", "baseModelName": "smollm2"}})
        k = PromotionTarget.model_validate({"name": "k", "kserve": {"name": "llm"}})
        try:
            for alias, digest in (("prod", A), ("canary", B)):
                served = ServedAdapter(uri=f"s3://out/adapters/{digest[7:]}", digest=digest)
                assert (await vllm.publish(ctx, v, alias, served)).ok
                assert (await kserve.publish(ctx, k, alias, served)).ok
            # The owner edits their object afterwards (another field manager): our list stays.
            c.kubectl("patch", "llmisvc", "llm", "-n", namespace, "--type=merge",
                      "-p", '{"spec": {"model": {"criticality": "Critical"}}}')
            assert (await kserve.publish(ctx, k, "prod", ServedAdapter())).ok  # rolled back to nothing
            assert (await vllm.publish(ctx, v, "prod", ServedAdapter())).ok
            missing = PromotionTarget.model_validate({"name": "m", "kserve": {"name": "nope"}})
            with pytest.raises(PublishError, match="LLMInferenceService nope not found"):
                await kserve.publish(ctx, missing, "prod", ServedAdapter(uri="s3://o/a", digest=A))
            c.kubectl("create", "configmap", "someone-elses", "-n", namespace, "--from-literal=x=y")
            foreign = PromotionTarget.model_validate({"name": "f", "vllm": {"configMap": "someone-elses"}})
            with pytest.raises(PublishError, match="without the label finetune.dev/serving=vllm"):
                await vllm.publish(ctx, foreign, "prod", ServedAdapter(uri="s3://o/a", digest=A))
        finally:
            await client.close()

    asyncio.run(scenario())
    cm = c.get("configmap", "adapters", namespace)
    assert cm["metadata"]["labels"]["finetune.dev/serving"] == "vllm"
    assert cm["data"]["lora-modules"] == f"canary=/adapters/canary/{'b' * 16}"
    assert json.loads(cm["data"]["adapters.json"])["canary"]["baseModelName"] == "smollm2"
    assert c.get("configmap", "someone-elses", namespace)["data"] == {"x": "y"}  # untouched
    svc = c.get("llmisvc", "llm", namespace)
    assert svc["spec"]["model"]["lora"]["adapters"] == [
        {"name": "hand-made", "uri": "hf://someone/adapter"}, {"name": "canary", "uri": f"s3://out/adapters/{'b' * 64}"}]
    assert svc["spec"]["model"]["criticality"] == "Critical" and svc["spec"]["model"]["uri"].startswith("hf://")
    assert json.loads(svc["metadata"]["annotations"][kserve.ANNOTATION]) == {"canary": B}
    fields = json.loads(c.kubectl("get", "llmisvc", "llm", "-n", namespace, "-o", "json",
                                  "--show-managed-fields").stdout)["metadata"]["managedFields"]
    ours = [m for m in fields if m["manager"] == "finetune-operator"]
    assert ours and ours[0]["operation"] == "Apply"
    assert "f:adapters" in json.dumps(ours[0]["fieldsV1"]) and "f:criticality" not in json.dumps(ours[0]["fieldsV1"])


def test_the_api_server_refuses_a_target_with_two_kinds_or_a_duplicate_name(crds, real_cluster, namespace):
    manifest = h.finetunejob_manifest("t", namespace, "ds", "s3://b/m", "s3://b/o", promotion={"targets": [
        {"name": "x", "vllm": {"configMap": "a"}, "kserve": {"name": "llm"}}]})
    out = real_cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest), check=False)
    assert out.returncode != 0 and "exactly one of vllm, kserve, oci" in out.stderr, out.stderr
    manifest["spec"]["promotion"]["targets"] = [{"name": "x", "vllm": {"configMap": "a"}},
                                                {"name": "x", "kserve": {"name": "llm"}}]
    out = real_cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest), check=False)
    assert out.returncode != 0 and "Duplicate value" in out.stderr, out.stderr


# --- the operator end to end ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def standin():
    from vllm_standin import running_standin

    with running_standin("smollm2") as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def stack(fakenode, crds, kserve_crd, s3_server, tiny_model_dir, tmp_path_factory, oci_registry, standin):
    env = {"FINETUNE_VLLM_LOAD_HOSTS": r"127\.0\.0\.1",
           "FINETUNE_OCI_REPOSITORY_PREFIX": f"{oci_registry}/adapters/{{namespace}}",
           "FINETUNE_OCI_INSECURE_REGISTRIES": oci_registry}
    with h.operator_stack(fakenode, s3_server, tiny_model_dir, tmp_path_factory.mktemp("operator"), **env) as st:
        yield st


@pytest.fixture()
def ns(stack):
    name = h.new_namespace(stack.cluster, stack.prefix)
    yield name
    h.delete_namespace(stack.cluster, name)


def _published(c, ns: str, name: str, state: str, timeout: float, op) -> dict:
    """The job's status once its promotion is in `state` and every target serves what the alias says."""
    def done():
        st = h.status(c, ns, name)
        cond = get_condition(st.get("conditions") or [], "Published") or {}
        return st if cond.get("status") == "True" and (st.get("promotion") or {}).get("state") == state else None
    try:
        return wait_for(done, timeout=timeout, interval=1, what=f"{name} published ({state})")
    except Exception:
        raise AssertionError(f"{name}: {json.dumps(h.status(c, ns, name))[-3000:]}\noperator log:\n"
                             f"{op.logs()[-4000:]}") from None


def test_promotion_publishes_everywhere_and_a_rollback_brings_the_targets_back(stack, ns, standin, oci_registry):
    import oras.client

    c = stack.cluster
    url, vllm_server = standin
    h.ready_dataset(c, stack.bucket, ns)
    c.apply(llm_service("llm", ns))
    repository = f"{oci_registry}/adapters/{ns}/bot"
    # Each job has its own output folder; the alias store is shared: one alias record, one history.
    promotion = {"alias": "bot", "aliasStore": f"s3://{stack.bucket}/aliases/{ns}", "targets": [
        {"name": "vllm", "vllm": {"configMap": "vllm-adapters", "baseModelName": "smollm2", "loadURL": url}},
        {"name": "kserve", "kserve": {"name": "llm"}},
        {"name": "registry", "oci": {"repository": repository}}]}
    registry = oras.client.OrasClient(hostname=oci_registry, insecure=True)

    def served_everywhere(digest: str, uri: str) -> None:
        cm = c.get("configmap", "vllm-adapters", ns)
        assert json.loads(cm["data"]["adapters.json"])["bot"]["digest"] == digest
        assert cm["data"]["lora-modules"] == f"bot=/adapters/bot/{digest[7:23]}"
        adapters = c.get("llmisvc", "llm", ns)["spec"]["model"]["lora"]["adapters"]
        assert adapters == [{"name": "hand-made", "uri": "hf://someone/adapter"}, {"name": "bot", "uri": uri}]
        assert vllm_server.loaded["bot"] == f"/adapters/bot/{digest[7:23]}"
        manifest = registry.get_manifest(f"{repository}:bot")
        assert manifest["annotations"]["dev.finetune.adapter.digest"] == digest

    # A target whose LLMInferenceService does not exist yet: it retries with backoff, the alias stays promoted.
    promotion["targets"].append({"name": "late", "kserve": {"name": "llm-late"}})
    c.apply(h.finetunejob_manifest("first", ns, "ready", stack.model_uri, f"s3://{stack.bucket}/runs/{ns}/bot-1",
                                   promotion=promotion))

    def retrying():
        st = h.status(c, ns, "first")
        late = [t for t in (st.get("promotion") or {}).get("targets") or [] if t["name"] == "late"]
        return st if late and late[0]["state"] == "Retrying" else None
    failing = wait_for(retrying, timeout=300, interval=1, what="the late target retrying")
    assert failing["phase"] == "Succeeded" and failing["promotion"]["state"] == "Promoted"
    published = get_condition(failing["conditions"], "Published")
    assert published["status"] == "False" and "LLMInferenceService llm-late not found" in published["message"]
    late = [t for t in failing["promotion"]["targets"] if t["name"] == "late"][0]
    assert late["attempts"] >= 1 and late["nextAttemptAt"] > get_condition(late["conditions"], "Published")[
        "lastTransitionTime"]
    assert any(e["reason"] == "PublishFailed" and e["type"] == "Warning" for e in h.events(c, ns, "first"))
    c.apply(llm_service("llm-late", ns))  # the next attempt (after its backoff) finds it
    first = _published(c, ns, "first", "Promoted", 120, stack.op)
    a_digest, a_uri = first["adapter"]["digest"], first["adapter"]["uri"]
    assert {t["name"]: t["state"] for t in first["promotion"]["targets"]} == \
        {"vllm": "Published", "kserve": "Published", "registry": "Published", "late": "Published"}
    served_everywhere(a_digest, a_uri)
    assert f"sha256-{a_digest[7:]}" in registry.get_tags(repository)

    c.apply(h.finetunejob_manifest("second", ns, "ready", stack.model_uri, f"s3://{stack.bucket}/runs/{ns}/bot-2",
                                   promotion=promotion, training={"seed": 8}))
    second = _published(c, ns, "second", "Promoted", 300, stack.op)
    b_digest, b_uri = second["adapter"]["digest"], second["adapter"]["uri"]
    assert b_digest != a_digest
    served_everywhere(b_digest, b_uri)
    assert second["promotion"]["aliasURI"] == first["promotion"]["aliasURI"] == f"s3://{stack.bucket}/aliases/{ns}/bot.json"
    alias = json.loads(storage.read_text(second["promotion"]["aliasURI"]))
    assert alias["adapterDigest"] == b_digest and alias["history"][0]["adapterDigest"] == a_digest

    # Roll back the successor: the alias and every target go back to the first adapter.
    c.kubectl("patch", "ftj", "second", "-n", ns, "--type=merge", "-p", '{"spec": {"promotion": {"revoked": true}}}')
    back = _published(c, ns, "second", "RolledBack", 120, stack.op)
    assert back["promotion"]["served"]["digest"] == a_digest and back["observedGeneration"] == 2
    assert get_condition(back["conditions"], "Promoted")["reason"] == "RolledBack"
    assert get_condition(back["conditions"], "Ready")["status"] == "True"
    served_everywhere(a_digest, a_uri)
    alias = json.loads(storage.read_text(second["promotion"]["aliasURI"]))
    assert alias["adapterDigest"] == a_digest and alias["rolledBack"]["adapterDigest"] == b_digest
    reasons = wait_for(lambda: (r := [e["reason"] for e in h.events(c, ns, "second")]) and "RolledBack" in r and r,
                       timeout=20, what="Events")
    assert "Published" in reasons
    # The first job's own record still says it is promoted; the alias is its adapter again.
    assert h.status(c, ns, "first")["promotion"]["state"] == "Promoted"
    table = subprocess.run([c.kubectl_bin, "get", "ftj", "-n", ns], capture_output=True, text=True,
                           env=c.env).stdout
    assert "RolledBack" in table, table
