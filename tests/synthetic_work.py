"""A synthetic work folder as the generation Job leaves it (candidates.jsonl + generation.json), for
the review tests (import as `from synthetic_work import ...`)."""

from __future__ import annotations

import hashlib
import json
from typing import Optional

from finetune_operator.api.synthetic import GenerationReport, Lineage, SyntheticCandidate
from finetune_trainer.synthesis import records
from finetune_trainer.synthesis.records import candidate_id


def digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


LINEAGE = Lineage(syntheticDataset="team-a/faq-synth", seedDigest=digest("seed"), baseModelDigest=digest("base"),
                  generatorAdapterDigest=digest("adapter"), templateDigest=digest("template"))


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def make_candidates(n: int, sampled: Optional[set[int]] = None, fmt: str = "chat") -> list[SyntheticCandidate]:
    out = []
    for i in range(n):
        q, a = f"How do I reset password number {i}?", f"Open settings, choose security, step {i}."
        example = chat(q, a) if fmt == "chat" else {"instruction": q, "output": a}
        out.append(SyntheticCandidate(id=candidate_id(example), example=example, lineage=LINEAGE,
                                      scores={"rougeL": round(0.1 + i / 100, 3)},
                                      reviewRequired=sampled is None or i in sampled))
    return out


def write_work(work_uri: str, candidates: list[SyntheticCandidate]) -> str:
    """candidates.jsonl and generation.json, as the generation Job writes them; returns the candidates digest."""
    candidates_digest = records.write_candidates(work_uri, candidates)
    report = GenerationReport(requested=len(candidates), generated=len(candidates), kept=len(candidates),
                              reviewRequired=sum(c.reviewRequired for c in candidates), lineage=LINEAGE,
                              candidatesDigest=candidates_digest)
    records.write_generation(work_uri, report)
    return candidates_digest


def jsonl(records: list[dict]) -> list[str]:
    return [json.dumps(r) for r in records]
