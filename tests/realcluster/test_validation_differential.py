"""Differential: api/validation.py (what `ftctl` checks locally) against the real API server.

The same few hundred manifests (schema-fuzzed specs, one-field mutations of the examples and of
fuzzed specs, cross-field rule breaks, metadata variants) go to both: to the server as creates with
dryRun=All and fieldValidation=Strict (nothing is stored), from a thread pool. Any difference in
accept/reject, in the field paths a rejection names, or in the defaults an accepted object gets, fails
the test. Where they differ the API server is right: the fix goes into validation.py or the models.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import time

from finetune_operator.api import KINDS
from finetune_operator.api.crd import openapi_schema
from realcluster._diff import comparable, disagreement, manifest_summary, our_verdict, server_verdicts
from realcluster._diff_cases import CEL_CASES, METADATA_CASES, example_manifests, fuzzed_specs, mutations

#: FUZZ_RANDOM=1 (as for tests/test_api_fuzz.py) explores new manifests, five times as many; the suite's
#: run is derandomized, so its verdict does not depend on luck.
RANDOM = os.environ.get("FUZZ_RANDOM") == "1"
SCALE = 5 if RANDOM else 1
FUZZED_PER_KIND = 40 * SCALE
MUTATIONS_OF_EXAMPLES = 70 * SCALE
MUTATIONS_OF_FUZZED = 20 * SCALE
SEED = random.randrange(10**6) if RANDOM else 0


def _merge(base: dict, patch: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in patch.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _manifest(kind, spec: dict, name: str, metadata: dict | None = None) -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": kind.KIND,
            "metadata": {"name": name} if metadata is None else metadata, "spec": spec}


def build_manifests(name: str) -> list[tuple[str, dict]]:
    """(origin, manifest) pairs, the same every run."""
    examples = example_manifests()
    out: list[tuple[str, dict]] = []
    for seed, kind in enumerate(KINDS):
        spec_schema = openapi_schema(kind)["properties"]["spec"]
        valid = [m["spec"] for m in examples[kind.KIND]]
        fuzzed = fuzzed_specs(kind, FUZZED_PER_KIND, derandomize=not RANDOM)
        out += [(f"{kind.KIND} example {i}", _manifest(kind, s, name)) for i, s in enumerate(valid)]
        out += [(f"{kind.KIND} fuzzed {i}", _manifest(kind, s, name)) for i, s in enumerate(fuzzed)]
        per_example = MUTATIONS_OF_EXAMPLES // len(valid)
        for j, spec in enumerate(valid):
            out += [(f"{kind.KIND} example {j} mutation {i}", _manifest(kind, s, name))
                    for i, s in enumerate(mutations(spec, spec_schema, per_example, seed=SEED + 100 * seed + j))]
        for j, spec in enumerate(fuzzed[:MUTATIONS_OF_FUZZED]):
            out += [(f"{kind.KIND} fuzzed {j} mutation", _manifest(kind, s, name))
                    for s in mutations(spec, spec_schema, 1, seed=SEED + 1000 * seed + j)]
        out += [(f"{kind.KIND} rule case {i}", _manifest(kind, _merge(valid[0], patch), name))
                for i, patch in enumerate(CEL_CASES[kind.KIND])]
        out += [(f"{kind.KIND} metadata case {i}", _manifest(kind, valid[0], name, meta))
                for i, meta in enumerate(METADATA_CASES)]
    return out


def test_validation_agrees_with_the_api_server(real_cluster, crds, namespace):
    cases = build_manifests("diff-fuzz")  # dry runs only: nothing is stored, so a fixed name is safe
    started = time.monotonic()
    server = server_verdicts(real_cluster.python_client(), [m for _, m in cases], namespace)
    server_seconds = time.monotonic() - started
    problems, accepted = [], 0
    for (origin, manifest), theirs in zip(cases, server):
        ours = our_verdict(manifest)
        why = disagreement(manifest, ours, theirs)
        if why is None and ours.accepted:
            accepted += 1
            # Accepted by both: the defaults we apply are the ones the server stores.
            if comparable(ours.obj["spec"]) != comparable(theirs.obj["spec"]):
                why = f"defaults differ: ours {ours.obj['spec']} / server {theirs.obj['spec']}"
        if why:
            problems.append(f"{origin}: {why}\n    manifest: {manifest_summary(manifest)}")
    digest = hashlib.sha256(json.dumps([m for _, m in cases], sort_keys=True, default=str).encode()).hexdigest()
    print(f"seed {SEED} (manifests sha256 {digest[:12]}): {len(cases)} manifests, {accepted} accepted by both, {len(cases) - accepted - len(problems)} rejected "
          f"by both naming the same fields; server verdicts in {server_seconds:.1f}s")
    assert not problems, f"{len(problems)} disagreements with the API server:\n" + "\n".join(problems[:25])
    # Both sides of the line are exercised, not just one.
    assert len(cases) >= 300 * SCALE
    assert accepted >= 40 * SCALE and len(cases) - accepted >= 200 * SCALE


def test_updates_agree_with_the_api_server(real_cluster, crds, namespace):
    """Replacing a stored FineTuneJob (PUT, dryRun=All): transition rules (immutable baseModel and
    datasetRef) and every other check give the same verdict as the server's."""
    import json

    from realcluster._diff import our_update_verdict, server_update_verdict

    kind = next(k for k in KINDS if k.KIND == "FineTuneJob")
    spec_schema = openapi_schema(kind)["properties"]["spec"]
    stored_spec = example_manifests()["FineTuneJob"][0]["spec"]
    name = "update-target"
    real_cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(_manifest(kind, stored_spec, name)))
    stored = real_cluster.get("finetunejobs", name, namespace)
    updates = [
        _merge(stored_spec, {"baseModel": {"uri": "s3://models/other"}}),
        _merge(stored_spec, {"baseModel": {"digest": "sha256:" + "1" * 64}}),
        _merge(stored_spec, {"datasetRef": {"name": "other"}}),
        _merge(stored_spec, {"training": {"learningRate": 0.001}, "suspend": True}),
        _merge(stored_spec, {"baseModel": {"uri": "not a uri"}}),
        _merge(stored_spec, {"promotion": {"approval": {"digest": "sha256:" + "2" * 64, "approvedBy": "me"}}}),
    ] + mutations(stored_spec, spec_schema, 40, seed=SEED + 7)
    api = real_cluster.python_client()
    problems, accepted, verdicts = [], 0, []
    for i, spec in enumerate(updates):
        manifest = _manifest(kind, spec, name, {"name": name, "namespace": namespace,
                                                "resourceVersion": stored["metadata"]["resourceVersion"]})
        ours, theirs = our_update_verdict(manifest, stored), server_update_verdict(api, manifest, namespace)
        accepted += theirs.accepted
        verdicts.append(theirs)
        why = disagreement(manifest, ours, theirs)
        if why:
            problems.append(f"update {i}: {why}\n    manifest: {manifest_summary(manifest)}")
    assert not problems, f"{len(problems)} disagreements with the API server:\n" + "\n".join(problems[:25])
    assert accepted >= 2 and len(updates) - accepted >= 20
    # The transition rules did run: changing the model, its digest or the dataset is refused.
    assert [sorted(v.fields) for v in verdicts[:3]] == [["spec.baseModel"], ["spec.baseModel"], ["spec.datasetRef"]]
    assert verdicts[3].accepted and verdicts[5].accepted
