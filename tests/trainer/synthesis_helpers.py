"""A validated seed set, a SynthesisConfig and a reviewed work folder (Chain), for the SyntheticDataset tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from finetune_operator.api.dataset import DatasetSpec
from finetune_operator.api.synthetic import (GenerationReport, Lineage, ReviewDecision, SynthesisConfig,
                                             SyntheticCandidate)

from finetune_trainer import storage
from finetune_trainer.synthesis import records
from finetune_trainer.validate import validate_text

REPO = Path(__file__).resolve().parents[2]
QUICKSTART_SEEDS = REPO / "examples/quickstart/data/support-answers.jsonl"


def write_seed(folder_uri: str, source: Path = QUICKSTART_SEEDS, fmt: str = "instruction") -> str:
    """Validate `source` as the validation Job does and write train/eval.jsonl to the folder; the digest."""
    spec = DatasetSpec.model_validate({
        "source": {"uri": source.as_uri()}, "format": fmt, "evaluation": {"fraction": 0.2, "seed": 42},
        "provenance": {"origin": "the quickstart", "license": "CC0-1.0"}, "curation": {"minExamples": 5}})
    result = validate_text(source.read_text(), spec)
    assert result.valid, result.message
    storage.write_text(storage.join(folder_uri, "train.jsonl"), result.train_jsonl)
    storage.write_text(storage.join(folder_uri, "eval.jsonl"), result.eval_jsonl)
    return result.digest


def synthesis_config(*, seed_uri: str, seed_digest: str, model_uri: str, work_uri: str,
                     model_digest: Optional[str] = None, adapter_uri: Optional[str] = None,
                     adapter_digest: Optional[str] = None, spec: Optional[dict] = None,
                     eval_set_uris: tuple[str, ...] = ()) -> SynthesisConfig:
    model = {"uri": model_uri, **({"digest": model_digest} if model_digest else {})}
    return SynthesisConfig.model_validate({
        "namespace": "default", "name": "grown", "workURI": work_uri,
        "spec": {"seed": {"dataset": "seed"}, "generator": {"baseModel": model}, "examples": 4,
                 "format": "instruction", "sampling": {"maxNewTokens": 24, "seed": 5}, **(spec or {})},
        "inputs": {"seedURI": seed_uri, "seedFormat": "instruction", "seedDigest": seed_digest,
                   "seedLicense": "CC0-1.0", "baseModel": model, "adapterURI": adapter_uri,
                   "adapterDigest": adapter_digest, "evalSetURIs": list(eval_set_uris)},
    })


def save(config: SynthesisConfig, path: Path) -> str:
    path.write_text(config.model_dump_json(exclude_none=True))
    return str(path)


def read_json(uri: str):
    return json.loads(storage.read_text(uri))


# --- a reviewed work folder: the synthetic chain the provenance check verifies ------------------------------

D = {k: "sha256:" + c * 64 for k, c in (("seed", "a"), ("base", "b"), ("adapter", "c"), ("template", "d"))}
LINEAGE = Lineage(syntheticDataset="default/grown", seedDigest=D["seed"], baseModelDigest=D["base"],
                  generatorAdapterDigest=D["adapter"], templateDigest=D["template"])
EXAMPLES = [{"instruction": f"Question {i} about the operator?", "output": f"FTO: Answer {i}."} for i in range(4)]
EDIT = {"instruction": "Question 1 about the operator?", "output": "FTO: A better answer 1."}


def chain_line(example: dict, cid: str, how: str, who: str = "") -> str:
    """A reviewed.jsonl line as docs/synthetic-data.md specifies it (review.materialize writes these)."""
    return json.dumps({**example, "metadata": records.lineage_metadata(cid, LINEAGE, how, who)})


class Chain:
    """A work folder: 4 candidates (3 sampled), decisions accept 0, edit 1, reject 2; 3 is not sampled."""

    def __init__(self, root: str):
        self.work = storage.join(root, "work")
        self.candidates = [SyntheticCandidate(id=records.candidate_id(e), example=e, lineage=LINEAGE,
                                              reviewRequired=i < 3) for i, e in enumerate(EXAMPLES)]
        self.ids = [c.id for c in self.candidates]
        self.candidates_digest = records.write_candidates(self.work, self.candidates)
        records.write_generation(self.work, GenerationReport(requested=4, generated=9, kept=4, reviewRequired=3,
                                                             lineage=LINEAGE, candidatesDigest=self.candidates_digest))
        for cid, verdict, who, example in ((self.ids[0], "accepted", "alice", None), (self.ids[1], "edited", "bob", EDIT),
                                           (self.ids[2], "rejected", "alice", None)):
            self.decide(cid, verdict, who, example)
        self.lines = [chain_line(EXAMPLES[0], self.ids[0], "accepted", "alice"),
                      chain_line(EDIT, self.ids[1], "edited", "bob"), chain_line(EXAMPLES[3], self.ids[3], "not-sampled")]
        self.publish()

    def decide(self, cid, verdict, who, example=None):
        decision = ReviewDecision(id=cid, verdict=verdict, reviewer=who, at="2026-12-01T10:00:00Z", example=example)
        storage.write_text(storage.join(self.work, records.REVIEWS, f"{cid}.json"), decision.model_dump_json())

    def publish(self, **review_overrides):
        """Write reviewed.jsonl and a review.json consistent with it (as a careful forger would, too)."""
        data = "".join(x + "\n" for x in self.lines).encode()
        storage.write_bytes(storage.join(self.work, records.REVIEWED), data)
        review = {"required": 3, "reviewed": 3, "accepted": 1, "edited": 1, "rejected": 1, "pending": 0,
                  "acceptanceRate": 0.666667, "candidatesDigest": self.candidates_digest,
                  "reviewedDigest": records.sha256_digest(data), "examples": len(self.lines), **review_overrides}
        storage.write_text(storage.join(self.work, records.REVIEW_STATS), json.dumps(review))

    def spec(self, curation: Optional[dict] = None, **origin_overrides) -> DatasetSpec:
        origin = {"syntheticDataset": "grown", "seedDataset": "seed", "seedDigest": D["seed"],
                  "baseModelDigest": D["base"], "generatorAdapterDigest": D["adapter"],
                  "templateDigest": D["template"], "candidatesDigest": self.candidates_digest,
                  "reviewURI": storage.join(self.work, records.REVIEW_STATS), **origin_overrides}
        return DatasetSpec.model_validate({
            "source": {"uri": storage.join(self.work, records.REVIEWED)}, "format": "instruction",
            "provenance": {"origin": "SyntheticDataset default/grown", "license": "CC0-1.0", "synthetic": origin},
            **({"curation": curation} if curation else {})})
