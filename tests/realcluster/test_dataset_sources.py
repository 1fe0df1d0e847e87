"""Hostile Dataset sources on the REAL control plane: the operator's validation Job (run by fakenode)
ends every one with exit 0 and a Dataset that is Invalid with a bounded message naming the line, or
Ready for what must be accepted; and spec.source.maxBytes as the API server applies and checks it."""

from __future__ import annotations

import gzip
import json

import pytest

from realcluster import operator_harness as h
from realcluster.realk8s import KubectlError, wait_for

from finetune_operator.conditions import get_condition
from finetune_trainer import storage
from finetune_trainer.jsonlines import human_bytes


@pytest.fixture(scope="module")
def stack(fakenode, crds, s3_server, tiny_model_dir, tmp_path_factory):
    with h.operator_stack(fakenode, s3_server, tiny_model_dir, tmp_path_factory.mktemp("operator")) as st:
        yield st


@pytest.fixture()
def ns(stack):
    name = h.new_namespace(stack.cluster, stack.prefix)
    yield name
    h.delete_namespace(stack.cluster, name)


def chat(i: int, content: str = "") -> dict:
    return {"messages": [{"role": "user", "content": f"Question {i}?{content}"},
                         {"role": "assistant", "content": f"Answer {i}."}]}


def lines(records: list) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode()) + b"\n"
                    for r in records)


GOOD = [chat(i) for i in range(12)]
BIG_ROLE = '{"messages": [{"role": "' + "x" * 400_000 + '", "content": "y"}]}'
SOURCES = {
    # name: (source bytes, spec.source extra, expected phase, reason, message)
    "gz": (gzip.compress(lines(GOOD), mtime=0), {}, "Invalid", "NotJSONLines",
           "line 1: source: gzip-compressed (starts with bytes 1f 8b), not JSON Lines: decompress it and point "
           "spec.source.uri at the .jsonl file (gunzip)"),
    "dup": (lines(GOOD[:2] + [b'{"messages": [{"role": "user", "role": "assistant", "content": "y"}]}'] + GOOD[2:]),
            {}, "Invalid", "TooManyInvalidLines",
            "1 invalid lines, at most 0 allowed: line 3: json: duplicate key 'role'"),
    "deep": (lines(GOOD[:4] + [b"[" * 100_000 + b"]" * 100_000]), {}, "Invalid", "TooManyInvalidLines",
             "1 invalid lines, at most 0 allowed: line 5: json: nested deeper than 64 levels"),
    "role": (lines(GOOD + [BIG_ROLE.encode()]), {}, "Invalid", "TooManyInvalidLines",
             "1 invalid lines, at most 0 allowed: line 13: messages[0].role: must be one of system, user, "
             "assistant, got '" + "x" * 60 + "… 399940 more'"),
    "limit": (lines(GOOD), {"maxBytes": "1Ki"}, "Invalid", "SourceTooLarge",
              f"source: {len(lines(GOOD))} bytes ({human_bytes(len(lines(GOOD)))}), larger than spec.source.maxBytes (1Ki = 1024 bytes); "
              "raise spec.source.maxBytes or split the data"),
    "u2028": (b"\xef\xbb\xbf" + lines(GOOD + [chat(99, "\u2028line\u0085two")]).replace(b"\n", b"\r\n"), {},
              "Ready", "Validated", None),
}


def test_hostile_sources_end_invalid_naming_the_line_and_the_job_succeeds(stack, ns):
    c = stack.cluster
    for name, (data, extra, *_rest) in SOURCES.items():
        uri = f"s3://{stack.bucket}/raw/{ns}/{name}.jsonl"
        storage.write_bytes(uri, data)
        manifest = h.dataset_manifest(name, ns, uri, min_examples=1)
        manifest["spec"]["source"].update(extra)
        c.apply(manifest)

    def final():
        out = {name: c.get("dataset", name, ns).get("status", {}) for name in SOURCES}
        return out if all(s.get("phase") in ("Ready", "Invalid", "Failed") for s in out.values()) else None

    statuses = wait_for(final, timeout=180, interval=1, what="every Dataset validated")
    for name, (_data, _extra, phase, reason, message) in SOURCES.items():
        st = statuses[name]
        assert st["phase"] == phase, (name, st, stack.op.logs()[-3000:])
        ready = get_condition(st["conditions"], "Ready")
        assert ready["reason"] == reason and ready["status"] == ("True" if phase == "Ready" else "False"), (name, ready)
        if message is not None:
            assert st["message"] == message, name
        assert len(st["message"].encode()) <= 1024 and "\n" not in st["message"]
        # Bad data is not a failed Job: one pod, exit 0, no retries (before, 4 of these exited 1, 3 times).
        job = c.get("job", f"{name}-validate-1", ns)
        assert job["status"].get("succeeded") == 1 and not job["status"].get("failed"), (name, job["status"])
    assert statuses["u2028"]["stats"]["examples"] + statuses["u2028"]["stats"]["evalExamples"] == 13


def test_max_bytes_is_defaulted_and_checked_by_the_api_server(real_cluster, crds, namespace):
    base = h.dataset_manifest("limits", namespace, "s3://bucket-a/raw/data.jsonl")
    applied = json.loads(real_cluster.apply(base, "--dry-run=server", "-o", "json").stdout)
    assert applied["spec"]["source"]["maxBytes"] == "10Gi"  # the default, as kubectl get shows it
    for good in ("500Mi", "1.5Gi", "1000000", "2G"):
        base["spec"]["source"]["maxBytes"] = good
        real_cluster.apply(base, "--dry-run=server")
    for bad in ("0", "10GB", "1e9", "-1Gi", 1000000):
        base["spec"]["source"]["maxBytes"] = bad
        with pytest.raises(KubectlError) as exc:
            real_cluster.apply(base, "--dry-run=server")
        assert "spec.source.maxBytes" in str(exc.value), (bad, str(exc.value)[-500:])
