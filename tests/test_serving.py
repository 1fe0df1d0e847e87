"""The hand-off to serving, without a cluster: alias history and rollback records, which targets are
due and their backoff, the decisions around promotion and spec.promotion.revoked, each publisher's
pure parts, the vLLM runtime API (a stand-in over real HTTP: vLLM cannot run here) and the OCI push
to a real registry (docker-registry). The publishers against a real API server are in
tests/realcluster/test_serving.py."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json

import pytest

from finetune_operator import decisions, governance
from finetune_operator.api.serving import PromotionTarget, ServedAdapter
from finetune_operator.conditions import get_condition
from finetune_operator.config import OperatorConfig
from finetune_operator.serving import kserve, oci, plan, vllm
from finetune_operator.serving.context import Context, PublishError

import gitops_statuses as paths

A, B, C = ("sha256:" + x * 64 for x in "abc")
T0, T1, T2 = "2026-01-01T00:00:00Z", "2026-01-01T00:00:05Z", "2026-01-01T00:01:00Z"


def record(digest: str, job: str = "j", **extra) -> dict:
    return {"adapterURI": f"s3://out/adapters/{digest[7:15]}", "adapterDigest": digest,
            "job": {"namespace": "team-a", "name": job}, "promotedAt": T0, **extra}


# --- alias history -------------------------------------------------------------------------------

def test_a_promotion_keeps_what_the_alias_pointed_at_newest_first_and_bounded():
    first = governance.promoted_alias_record(None, record(A, "a"))
    assert first["history"] == []
    second = governance.promoted_alias_record(first, record(B, "b"))
    assert [h["adapterDigest"] for h in second["history"]] == [A]
    third = governance.promoted_alias_record(second, record(C, "c"))
    assert [h["adapterDigest"] for h in third["history"]] == [B, A]
    # The same adapter promoted again (a crash before the status patch): no duplicate entry.
    assert governance.promoted_alias_record(third, record(C, "c"))["history"] == third["history"]
    # Promoting A again moves it out of the history.
    assert [h["adapterDigest"] for h in governance.promoted_alias_record(third, record(A, "a"))["history"]] == [C, B]
    many = None
    for i in range(30):
        many = governance.promoted_alias_record(many, record("sha256:" + f"{i:02x}" * 32))
    assert len(many["history"]) == governance.ALIAS_HISTORY_LIMIT


def test_a_rollback_goes_back_to_the_previous_adapter_then_to_none():
    current = governance.promoted_alias_record(governance.promoted_alias_record(None, record(A, "a")), record(B, "b"))
    job_b = {"namespace": "team-a", "name": "b"}
    back = governance.rolled_back_alias_record(current, B, job_b, T1)
    assert back["adapterDigest"] == A and back["job"]["name"] == "a" and back["history"] == []
    assert back["rolledBack"] == {"adapterDigest": B, "job": job_b, "at": T1}
    # Rolling back A too leaves an alias with no adapter (a record that says so, history kept empty).
    none = governance.rolled_back_alias_record(back, A, {"namespace": "team-a", "name": "a"}, T2)
    assert none["adapterDigest"] is None and none["adapterURI"] is None
    # Idempotent: the alias no longer points at B and B is in no history: nothing to write.
    assert governance.rolled_back_alias_record(back, B, job_b, T2) is None


def test_a_rollback_of_an_adapter_the_alias_moved_past_only_drops_it_from_the_history():
    chain = None
    for digest in (A, B, C):
        chain = governance.promoted_alias_record(chain, record(digest))
    out = governance.rolled_back_alias_record(chain, B, {"namespace": "team-a", "name": "j"}, T1)
    assert out["adapterDigest"] == C and [h["adapterDigest"] for h in out["history"]] == [A]


@pytest.mark.parametrize("stored", [None, [], "x", {"history": "nope"}, {"history": [1, None, {"a": 1}]},
                                    {"adapterDigest": 5, "history": [{"adapterDigest": A}]}])
def test_a_tampered_or_garbled_alias_record_never_crashes_and_never_enters_the_history(stored):
    out = governance.promoted_alias_record(stored, record(B))
    assert out["adapterDigest"] == B and all(isinstance(h["adapterURI"], str) for h in out["history"])
    governance.rolled_back_alias_record(stored, B, {"namespace": "n", "name": "j"}, T1)  # no exception


# --- which targets are due, backoff, the Published condition ---------------------------------------

VLLM = PromotionTarget.model_validate({"name": "vllm", "vllm": {"configMap": "adapters"}})
KSERVE = PromotionTarget.model_validate({"name": "kserve", "kserve": {"name": "llm"}})


def promoted_status(digest=A) -> dict:
    return {"promotion": {"alias": "prod", "served": {"uri": "s3://out/adapters/x", "digest": digest}}}


def test_targets_are_due_until_they_serve_the_alias_and_failures_back_off():
    status = promoted_status()
    plan.pending_entries([VLLM, KSERVE], status)
    assert plan.due([VLLM, KSERVE], status, T0) == [VLLM, KSERVE]
    plan.record(status, VLLM, plan.Outcome(True, "ok", "ConfigMap adapters"), 1, T0)
    event = plan.record(status, KSERVE, plan.Outcome(False, "LLMInferenceService llm not found"), 1, T0)
    assert event == ("Warning", "PublishFailed")
    assert plan.due([VLLM, KSERVE], status, T1) == []  # kserve waits for its backoff (10 s)
    entry = status["promotion"]["targets"][1]
    assert (entry["name"], entry["state"], entry["attempts"], entry["nextAttemptAt"]) == \
        ("kserve", "Retrying", 1, "2026-01-01T00:00:10Z")
    assert plan.next_wakeup(status) == "2026-01-01T00:00:10Z"
    assert plan.due([VLLM, KSERVE], status, T2) == [KSERVE]
    delays = []
    for _ in range(8):
        plan.record(status, KSERVE, plan.Outcome(False, "still missing"), 1, T0)
        delays.append(status["promotion"]["targets"][1]["nextAttemptAt"])
    assert delays[0] == "2026-01-01T00:00:30Z" and delays[-1] == delays[-2] == "2026-01-01T00:10:00Z"
    value, reason, message = plan.published_condition([VLLM, KSERVE], status)
    assert (value, reason) == (False, "PublishFailed") and "kserve: still missing" in message
    plan.record(status, KSERVE, plan.Outcome(True, "applied", "LLMInferenceService llm"), 1, T2)
    assert plan.published_condition([VLLM, KSERVE], status)[:2] == (True, "AllPublished")
    assert status["promotion"]["targets"][1]["attempts"] == 0 and "nextAttemptAt" not in status["promotion"]["targets"][1]
    assert get_condition(status["promotion"]["targets"][1]["conditions"], "Published")["status"] == "True"


def test_an_edited_target_or_a_new_adapter_is_published_again():
    status = promoted_status()
    plan.record(status, VLLM, plan.Outcome(True, "ok"), 1, T0)
    assert plan.due([VLLM], status, T1) == []
    edited = PromotionTarget.model_validate({"name": "vllm", "vllm": {"configMap": "adapters", "mountPath": "/m"}})
    assert plan.due([edited], status, T1) == [edited]
    status["promotion"]["served"] = {}  # rolled back to nothing
    assert plan.due([VLLM], status, T1) == [VLLM]
    plan.record(status, VLLM, plan.Outcome(True, "removed"), 2, T1)
    entry = status["promotion"]["targets"][0]
    assert entry["state"] == "Unpublished" and "adapterDigest" not in entry


def test_a_target_removed_from_the_spec_leaves_status():
    status = promoted_status()
    plan.pending_entries([VLLM, KSERVE], status)
    plan.pending_entries([KSERVE], status)
    assert [e["name"] for e in status["promotion"]["targets"]] == ["kserve"]


# --- decisions: promotion with targets, rollback, restore ----------------------------------------

def test_promotion_records_what_the_targets_serve_and_the_alias_history():
    obj = paths.all_paths()["FineTuneJob/publishing"]
    promo = obj["status"]["promotion"]
    assert promo["served"] == {"uri": "s3://out/j/adapters/ab", "digest": paths.DIGEST}
    assert promo["targets"] == [{"name": "vllm", "kind": "vllm", "state": "Pending"}]
    published = get_condition(obj["status"]["conditions"], "Published")
    assert (published["status"], published["reason"]) == ("Unknown", "Publishing")


def _revoke(obj: dict, revoked: bool, current: dict | None, cfg: OperatorConfig = paths.CFG):
    obj = copy.deepcopy(obj)
    obj["metadata"]["generation"] += 1
    obj["spec"].setdefault("promotion", {})["revoked"] = revoked
    return decisions.plan_finetunejob(obj, decisions.JobInputs(alias_current=current), cfg, T2), obj


def test_revoked_moves_the_alias_back_and_false_promotes_again():
    succeeded = paths.all_paths()["FineTuneJob/succeeded"]
    current = governance.promoted_alias_record(governance.promoted_alias_record(None, record(C, "old")),
                                               record(paths.DIGEST, "j"))
    plan_, obj = _revoke(succeeded, True, current)
    uri, written = plan_.alias
    assert uri == succeeded["status"]["promotion"]["aliasURI"] and written["adapterDigest"] == C
    promo = plan_.status["promotion"]
    assert promo["state"] == "RolledBack" and promo["served"]["digest"] == C and promo["rolledBackAt"] == T2
    assert get_condition(plan_.status["conditions"], "Promoted")["reason"] == "RolledBack"
    assert [e[1] for e in plan_.events] == ["RolledBack"]
    assert plan_.status["phase"] == "Succeeded"
    ready = get_condition(plan_.status["conditions"], "Ready")
    assert ready["status"] == "True" and ready["reason"] == "RolledBack"
    # The same reconcile again (the alias already written): nothing to write, nothing to post.
    obj["status"] = plan_.status
    again = decisions.plan_finetunejob(obj, decisions.JobInputs(alias_current=written), paths.CFG, T2)
    assert again.alias is None and again.events == []
    # revoked: false promotes it again; the adapter that held the alias meanwhile goes into the history.
    restore, _ = _revoke(obj, False, written)
    _, rewritten = restore.alias
    assert rewritten["adapterDigest"] == paths.DIGEST and rewritten["history"][0]["adapterDigest"] == C
    assert restore.status["promotion"]["state"] == "Promoted"
    assert restore.status["promotion"]["served"]["digest"] == paths.DIGEST
    assert "rolledBackAt" not in restore.status["promotion"]


def test_revoked_on_a_job_that_was_never_promoted_changes_nothing():
    blocked = paths.all_paths()["FineTuneJob/governance-blocked"]
    plan_, _ = _revoke(blocked, True, None, paths.STRICT_CFG)
    assert plan_.alias is None and (plan_.status or blocked["status"])["promotion"]["state"] == "Blocked"


# --- publishers: pure parts ------------------------------------------------------------------------

def test_vllm_entries_one_folder_per_adapter_and_the_three_keys():
    target = PromotionTarget.model_validate({"name": "v", "vllm": {"configMap": "cm", "mountPath": "/adapters/",
                                                                     "baseModelName": "llama"}})
    adapters = vllm.updated({}, target, "prod", ServedAdapter(uri="s3://o/a", digest=A))
    adapters = vllm.updated(adapters, target, "canary", ServedAdapter(uri="s3://o/b", digest=B))
    data = vllm.render(adapters)
    assert data["lora-modules"] == f"canary=/adapters/canary/{'b' * 16} prod=/adapters/prod/{'a' * 16}"
    lines = [json.loads(x) for x in data["lora-modules.json"].splitlines()]
    assert lines[1] == {"name": "prod", "path": f"/adapters/prod/{'a' * 16}", "base_model_name": "llama"}
    assert json.loads(data["adapters.json"])["prod"] == {"uri": "s3://o/a", "digest": A, "baseModelName": "llama",
                                                        "path": f"/adapters/prod/{'a' * 16}"}
    # Rolled back to nothing: the alias leaves every key.
    data = vllm.render(vllm.updated(adapters, target, "prod", ServedAdapter()))
    assert "prod" not in data["lora-modules"] and "prod" not in json.loads(data["adapters.json"])


@pytest.mark.parametrize("raw", ["not json", "[1]", '{"a": "b"}', '{"a": {"path": 3}}'])
def test_vllm_refuses_a_configmap_whose_adapter_list_someone_else_wrote(raw):
    with pytest.raises(PublishError, match="adapters.json"):
        vllm.entry_for({"metadata": {"name": "cm"}, "data": {"adapters.json": raw}}, "prod")


@pytest.mark.parametrize("url,ok", [
    ("http://vllm.team-a.svc:8000", True), ("http://vllm.team-a", True),
    ("http://vllm.team-a.svc.cluster.local:8000/", True),
    ("http://vllm.team-b.svc:8000", False),  # another team's server
    ("http://169.254.169.254", False),  # cloud metadata
    ("http://kubernetes.default.svc", False), ("http://vllm:8000", False),  # resolves in the operator's namespace
    ("http://vllm.team-a.svc.evil.com", False),
])
def test_runtime_load_urls_stay_in_the_jobs_namespace(url, ok):
    assert vllm.allowed_host(url, "team-a", ()) is ok
    assert vllm.allowed_host("http://gateway.internal:80", "team-a", (r"gateway\.internal",))


def test_kserve_replaces_only_the_aliases_entry_and_keeps_everyone_elses():
    obj = {"metadata": {"name": "llm", "annotations": {kserve.ANNOTATION: json.dumps({"prod": A})}},
           "spec": {"model": {"uri": "hf://base", "lora": {"adapters": [
               {"name": "hand-made", "uri": "hf://someone/adapter"}, {"name": "prod", "uri": "s3://o/a"}]}}}}
    adapters, ours = kserve.updated(obj, "prod", ServedAdapter(uri="s3://o/b", digest=B))
    assert adapters == [{"name": "hand-made", "uri": "hf://someone/adapter"}, {"name": "prod", "uri": "s3://o/b"}]
    assert ours == {"prod": B}
    adapters, ours = kserve.updated(obj, "prod", ServedAdapter())
    assert adapters == [{"name": "hand-made", "uri": "hf://someone/adapter"}] and ours == {}
    with pytest.raises(PublishError, match="not a list"):
        kserve.updated({"metadata": {"name": "llm"}, "spec": {"model": {"lora": {"adapters": "x"}}}}, "p",
                       ServedAdapter())


@pytest.mark.parametrize("repo,ok", [("reg:5000/adapters/team-a", True), ("reg:5000/adapters/team-a/bot", True),
                                     ("reg:5000/adapters/team-ab/bot", False), ("reg:5000/adapters/team-b", False),
                                     ("evil:5000/adapters/team-a", False)])
def test_oci_repositories_lie_under_the_namespaces_prefix(repo, ok):
    assert oci.allowed_repository(repo, "team-a", "reg:5000/adapters/{namespace}") is ok
    assert not oci.allowed_repository(repo, "team-a", "")


# --- the vLLM runtime API, over HTTP --------------------------------------------------------------

def test_runtime_load_unloads_first_and_reports_refusals():
    from vllm_standin import running_standin

    with running_standin() as (url, server):
        cfg = OperatorConfig(vllm_load_hosts=(r"127\.0\.0\.1",))
        ctx = Context(client=None, namespace="team-a", job="j", config=cfg)
        target = PromotionTarget.model_validate({"name": "v", "vllm": {"configMap": "cm", "loadURL": url}})
        asyncio.run(vllm._runtime_update(ctx, target, "prod", ServedAdapter(uri="s3://o/a", digest=A)))
        assert server.loaded == {"prod": f"/adapters/prod/{'a' * 16}"}
        asyncio.run(vllm._runtime_update(ctx, target, "prod", ServedAdapter(uri="s3://o/b", digest=B)))
        assert server.loaded == {"prod": f"/adapters/prod/{'b' * 16}"}  # replaced: unload, then load
        assert [c[0] for c in server.calls] == ["/v1/unload_lora_adapter", "/v1/load_lora_adapter"] * 2
        server.fail_loads = 1
        with pytest.raises(PublishError, match="HTTP 500 .*engine is restarting"):
            asyncio.run(vllm._runtime_update(ctx, target, "prod", ServedAdapter(uri="s3://o/a", digest=A)))
        asyncio.run(vllm._runtime_update(ctx, target, "prod", ServedAdapter()))  # rolled back to nothing
        assert server.loaded == {}
        refused = Context(client=None, namespace="team-a", job="j", config=OperatorConfig())
        with pytest.raises(PublishError, match="loadURL: host not allowed"):
            asyncio.run(vllm._runtime_update(refused, target, "prod", ServedAdapter(uri="s3://o/a", digest=A)))


# --- OCI: a real registry ------------------------------------------------------------------------

def _adapter(bucket: str, files: dict[str, bytes]) -> ServedAdapter:
    from finetune_trainer import storage

    manifest = json.dumps({"files": {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)}
                                     for n, b in files.items()}}, sort_keys=True).encode()
    hexdigest = hashlib.sha256(manifest).hexdigest()
    uri = f"s3://{bucket}/out/adapters/{hexdigest}"
    for name, data in files.items():
        storage.write_bytes(f"{uri}/{name}", data)
    storage.write_bytes(f"{uri}/manifest.json", manifest)
    return ServedAdapter(uri=uri, digest=f"sha256:{hexdigest}")


def test_oci_push_to_a_real_registry_and_pull_back_the_same_files(bucket, oci_registry, tmp_path):
    import oras.client

    files = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": bytes(range(256)) * 64}
    served = _adapter(bucket, files)
    cfg = OperatorConfig(oci_repository_prefix=f"{oci_registry}/adapters/{{namespace}}",
                         oci_insecure_registries=(oci_registry,))
    ctx = Context(client=None, namespace="team-a", job="j", config=cfg)
    target = PromotionTarget.model_validate({"name": "oci", "oci": {"repository": f"{oci_registry}/adapters/team-a/bot"}})
    outcome = asyncio.run(oci.publish(ctx, target, "prod", served))
    assert outcome.ok and outcome.reference.startswith(f"{oci_registry}/adapters/team-a/bot@sha256:")
    client = oras.client.OrasClient(hostname=oci_registry, insecure=True)
    assert set(client.get_tags(f"{oci_registry}/adapters/team-a/bot")) == {"prod", f"sha256-{served.digest[7:]}"}
    pulled = client.pull(target=f"{oci_registry}/adapters/team-a/bot:prod", outdir=str(tmp_path / "pulled"))
    got = {p.rsplit("/", 1)[-1]: open(p, "rb").read() for p in pulled}
    assert got.pop("manifest.json") and got == files
    manifest = client.get_manifest(f"{oci_registry}/adapters/team-a/bot:prod")
    assert manifest["config"]["mediaType"] == oci.CONFIG_MEDIA_TYPE
    assert manifest["annotations"]["dev.finetune.adapter.digest"] == served.digest
    assert {layer["annotations"]["org.opencontainers.image.title"] for layer in manifest["layers"]} == \
        {"manifest.json", *files}


def test_oci_refuses_a_tampered_adapter_and_a_repository_outside_the_prefix(bucket, oci_registry):
    from finetune_trainer import storage

    served = _adapter(bucket, {"adapter_model.safetensors": b"weights"})
    storage.write_bytes(f"{served.uri}/adapter_model.safetensors", b"swapped")  # after governance judged it
    cfg = OperatorConfig(oci_repository_prefix=f"{oci_registry}/adapters/{{namespace}}",
                         oci_insecure_registries=(oci_registry,))
    ctx = Context(client=None, namespace="team-a", job="j", config=cfg)
    target = PromotionTarget.model_validate({"name": "oci", "oci": {"repository": f"{oci_registry}/adapters/team-a/x"}})
    with pytest.raises(PublishError, match="sha256 does not match the manifest"):
        asyncio.run(oci.publish(ctx, target, "prod", served))
    other = PromotionTarget.model_validate({"name": "oci", "oci": {"repository": f"{oci_registry}/adapters/team-b/x"}})
    with pytest.raises(PublishError, match="outside what namespace team-a may push to"):
        asyncio.run(oci.publish(ctx, other, "prod", served))


# --- beside vLLM: the adapters the ConfigMap lists, verified, put in place ------------------------

def test_sync_adapters_puts_verified_adapters_in_place_and_refuses_tampered_ones(bucket, tmp_path):
    import subprocess
    import sys

    from finetune_trainer import storage

    good = _adapter(bucket, {"adapter_model.safetensors": b"weights-a", "adapter_config.json": b"{}"})
    bad = _adapter(bucket, {"adapter_model.safetensors": b"weights-b"})
    storage.write_bytes(f"{bad.uri}/adapter_model.safetensors", b"swapped after governance")
    target = PromotionTarget.model_validate({"name": "v", "vllm": {"configMap": "cm", "mountPath": str(tmp_path)}})
    adapters = vllm.updated(vllm.updated({}, target, "prod", good), target, "canary", bad)
    config = tmp_path / "adapters.json"
    config.write_text(vllm.render(adapters)["adapters.json"])

    def sync():
        return subprocess.run([sys.executable, "-m", "finetune_trainer.cli", "sync-adapters", "--config", str(config)],
                              capture_output=True, text=True, timeout=120)

    out = sync()
    assert out.returncode == 1 and "canary" in out.stderr and "sha256 does not match" in out.stderr
    prod = tmp_path / "prod" / good.digest[7:23]
    assert (prod / "adapter_model.safetensors").read_bytes() == b"weights-a"
    assert not (tmp_path / "canary" / bad.digest[7:23]).exists()  # nothing half-written or tampered in place
    assert not [p for p in tmp_path.rglob(".*partial*")]
    config.write_text(vllm.render({"prod": adapters["prod"]})["adapters.json"])
    assert sync().returncode == 0  # in place already: left alone
    config.write_text(json.dumps({"prod": {**adapters["prod"], "path": "/etc/../root/x"}}))
    refused = sync()
    assert refused.returncode != 0 and "is not {uri, digest, absolute path}" in refused.stderr
