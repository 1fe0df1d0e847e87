"""The governance provenance check on an adapter trained on a SyntheticDataset's Dataset: the chain from the
candidates through the review to every line holds, and a rejected example slipped into the data fails the
check with the rule and the line named."""

from __future__ import annotations

import uuid

from finetune_trainer import storage
from finetune_trainer.governance.provenance import ProvenanceCheck
from finetune_trainer.synthesis import records

from trainer.synthesis_helpers import EXAMPLES, Chain, chain_line

from . import helpers as h
from .direct import run


def test_the_provenance_check_verifies_the_synthetic_chain(s3_server, tiny_model_dir, tmp_path):
    bucket = f"syn-{uuid.uuid4().hex[:10]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    chain = Chain(f"s3://{bucket}/synthetic")
    spec = chain.spec(curation={"minExamples": 1})
    validated = h.validate_into(spec, f"s3://{bucket}/data")
    cfg = h.job_config(f"s3://{bucket}", tiny_model_dir, spec, f"s3://{bucket}/data", validated.digest,
                       training={"maxSteps": 2})
    adapter = h.train(cfg, tmp_path / "train.json")["adapterURI"]

    result, report = run(ProvenanceCheck(), cfg, adapter)
    assert result["passed"], result["message"]
    rules = {f["rule"]: f["passed"] for f in report["findings"]}
    assert {"syntheticCandidates", "syntheticReview", "syntheticLineage", "syntheticExamples"} <= set(rules)
    assert all(rules.values())

    # a rejected candidate slipped back into the data, review.json rewritten to match
    chain.lines.append(chain_line(EXAMPLES[2], chain.ids[2], "accepted", "alice"))
    chain.publish()
    result, report = run(ProvenanceCheck(), cfg, adapter)
    assert not result["passed"]
    assert f"syntheticExamples: line 4: candidate {chain.ids[2]} was rejected by alice" in result["message"]
    assert "datasetDigest: dataset changed since training" in result["message"]
    assert storage.exists(storage.join(chain.work, records.CANDIDATES))
