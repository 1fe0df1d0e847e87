"""The provenance check's synthetic chain: an intact chain passes every rule; tampering with any link (a
digest edited in a line, a line injected without lineage, a rejected example slipped in, an example
changed, the candidates or the generation record rewritten) fails the rule that covers it, naming it."""

from __future__ import annotations

import json

import pytest

from finetune_trainer import storage
from finetune_trainer.governance.synthetic_chain import synthetic_findings
from finetune_trainer.synthesis import records

from .synthesis_helpers import D, EDIT, EXAMPLES, Chain, chain_line as line

def by_rule(findings) -> dict[str, tuple[bool, str]]:
    return {rule: (ok, message) for rule, ok, message in findings}


@pytest.fixture()
def chain(tmp_path) -> Chain:
    return Chain(f"file://{tmp_path}")


def test_an_intact_chain_passes_every_rule(chain):
    found = by_rule(synthetic_findings(chain.spec()))
    assert set(found) == {"syntheticCandidates", "syntheticReview", "syntheticLineage", "syntheticExamples"}
    assert all(ok for ok, _ in found.values()), found
    assert "all 3 lines carry this chain's lineage" in found["syntheticLineage"][1]


def test_the_chain_is_read_from_s3_too(bucket):
    chain = Chain(f"s3://{bucket}/syn")
    assert all(ok for _, ok, _ in synthetic_findings(chain.spec()))


def test_an_edited_digest_in_a_line_fails_lineage_naming_the_line(chain):
    record = json.loads(chain.lines[1])
    record["metadata"]["synthetic.baseModelDigest"] = "sha256:" + "e" * 64
    chain.lines[1] = json.dumps(record)
    chain.publish()
    ok, message = by_rule(synthetic_findings(chain.spec()))["syntheticLineage"]
    assert not ok and message.startswith("line 2: synthetic.baseModelDigest sha256:eeee")


def test_a_provenance_digest_that_is_not_the_chains_fails(chain):
    found = by_rule(synthetic_findings(chain.spec(templateDigest="sha256:" + "f" * 64)))
    assert not found["syntheticCandidates"][0] and "templateDigest sha256:dddd" in found["syntheticCandidates"][1]
    assert not found["syntheticLineage"][0]


def test_an_injected_line_without_lineage_fails(chain):
    chain.lines.append(json.dumps({"instruction": "Injected?", "output": "FTO: Trust me."}))
    chain.publish()
    found = by_rule(synthetic_findings(chain.spec()))
    assert not found["syntheticLineage"][0]
    assert found["syntheticLineage"][1].startswith("line 4: no lineage (synthetic.id")


def test_an_injected_line_with_copied_lineage_is_not_a_candidate(chain):
    forged = {"instruction": "Injected?", "output": "FTO: Trust me."}
    chain.lines.append(line(forged, "0123456789abcdef", "accepted", "alice"))
    chain.publish()
    ok, message = by_rule(synthetic_findings(chain.spec()))["syntheticExamples"]
    assert not ok and message == "line 4: id '0123456789abcdef' is not a candidate"


def test_a_rejected_example_slipped_in_fails(chain):
    chain.lines.append(line(EXAMPLES[2], chain.ids[2], "accepted", "alice"))
    chain.publish()
    ok, message = by_rule(synthetic_findings(chain.spec()))["syntheticExamples"]
    assert not ok and message == f"line 4: candidate {chain.ids[2]} was rejected by alice"


def test_an_example_changed_after_review_fails(chain):
    chain.lines[0] = line({**EXAMPLES[0], "output": "FTO: Something else."}, chain.ids[0], "accepted", "alice")
    chain.lines[1] = line({**EDIT, "output": "FTO: Not the edit."}, chain.ids[1], "edited", "bob")
    chain.publish()
    ok, message = by_rule(synthetic_findings(chain.spec()))["syntheticExamples"]
    assert not ok
    assert f"line 1: candidate {chain.ids[0]} differs from the example generated" in message
    assert f"line 2: candidate {chain.ids[1]} is marked edited but is not the recorded edit" in message


def test_a_sampled_candidate_passed_off_as_not_sampled_fails(chain):
    storage.delete(storage.join(chain.work, records.REVIEWS, f"{chain.ids[0]}.json"))
    chain.lines[0] = line(EXAMPLES[0], chain.ids[0], "not-sampled")
    chain.publish()
    ok, message = by_rule(synthetic_findings(chain.spec()))["syntheticExamples"]
    assert not ok and "marked not-sampled but was sampled for review" in message


def test_rewritten_candidates_fail_and_the_examples_are_not_trusted(chain):
    path = storage.join(chain.work, records.CANDIDATES)
    storage.write_bytes(path, storage.read_bytes(path) + b"\n")
    found = by_rule(synthetic_findings(chain.spec()))
    assert not found["syntheticCandidates"][0] and "changed after generation" in found["syntheticCandidates"][1]
    assert not found["syntheticExamples"][0] and found["syntheticExamples"][1].startswith("not checked")


def test_a_reviewed_file_that_is_not_the_one_review_json_names_fails(chain):
    chain.publish(reviewedDigest="sha256:" + "9" * 64, pending=2)
    ok, message = by_rule(synthetic_findings(chain.spec()))["syntheticReview"]
    assert not ok and "reviewedDigest sha256:9999" in message and "2 sampled candidates still pending" in message


def test_a_dataset_without_synthetic_provenance_has_no_synthetic_rules(chain):
    spec = chain.spec()
    spec.provenance.synthetic = None
    assert synthetic_findings(spec) == []


def test_the_file_review_materialize_writes_passes_the_chain(tmp_path):
    """The contract between review.py (which writes reviewed.jsonl and review.json) and this check."""
    review = pytest.importorskip("finetune_trainer.review")
    from .synthesis_helpers import synthesis_config

    chain = Chain(f"file://{tmp_path}")
    storage.delete(storage.join(chain.work, records.REVIEWED))
    storage.delete(storage.join(chain.work, records.REVIEW_STATS))
    config = synthesis_config(seed_uri=f"file://{tmp_path}/seed", seed_digest=D["seed"], model_uri="file:///m",
                              work_uri=chain.work, spec={"review": {"minAcceptanceRate": 0.5}})
    review.materialize(config)
    found = by_rule(synthetic_findings(chain.spec()))
    assert all(ok for ok, _ in found.values()), found
    assert "all 3 lines" in found["syntheticLineage"][1]
