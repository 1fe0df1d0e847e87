"""`finetune-trainer synthesize --config synthesis.json`: generate, filter and write the candidates.

Reads the seed's validated files (inputs.seedURI: train.jsonl, eval.jsonl; their content digest must be
inputs.seedDigest), loads the generator, and makes Self-Instruct attempts until spec.examples
candidates pass the filters or spec.examples × maxAttempts attempts are spent. Writes candidates.jsonl,
then generation.json (its presence marks the generation complete), each in one piece; a rerun over a
complete work folder of the same inputs does nothing.
"""

from __future__ import annotations

import math
import random
import tempfile
from pathlib import Path
from typing import Optional

from finetune_operator.api.synthetic import GenerationReport, Lineage, SynthesisConfig, SyntheticCandidate
from pydantic import ValidationError

from .. import storage
from ..curation import record_text
from ..errors import ConfigError, DataError
from ..formats import Example, FormatError, iter_examples, loads_strict, to_record
from ..logs import get_logger
from . import records
from .filters import CandidateFilter
from .prompts import parse_output, render, template_digest, template_text

log = get_logger("synthesize")


def load_config(config_path: str) -> SynthesisConfig:
    text = storage.read_text(config_path) if "://" in config_path else Path(config_path).read_text()
    try:
        return SynthesisConfig.model_validate_json(text)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "config"
        raise ConfigError(f"{config_path}: {field}: {err['msg']}") from None


def load_seed(config: SynthesisConfig) -> tuple[list[Example], list[str]]:
    """The seed's training examples and its evaluation texts, after checking the content digest."""
    from ..validate import content_digest

    inputs = config.inputs
    train = storage.read_text(storage.join(inputs.seedURI, "train.jsonl"))
    evaluation = storage.read_text(storage.join(inputs.seedURI, "eval.jsonl"))
    actual = content_digest(train, evaluation)
    if actual != inputs.seedDigest:
        raise ConfigError(f"inputs.seedDigest: the seed data at {inputs.seedURI} has digest {actual}, not "
                          f"{inputs.seedDigest} (changed after validation?)")
    seeds = []
    for number, parsed in iter_examples(train, inputs.seedFormat):
        if isinstance(parsed, FormatError):
            raise DataError(f"{inputs.seedURI}/train.jsonl line {number}: {parsed}")
        seeds.append(parsed)
    if not seeds:
        raise ConfigError(f"inputs.seedURI: {inputs.seedURI}/train.jsonl has no examples")
    eval_texts = [record_text(loads_strict(line)) for line in evaluation.splitlines() if line.strip()]
    return seeds, eval_texts


def eval_set_texts(uris: list[str]) -> list[str]:
    """Every line's text of the other evaluation files (decontamination)."""
    from .. import jsonlines

    out = []
    for uri in uris:
        for line in jsonlines.read(uri):
            if line.problem is not None:
                raise DataError(f"inputs.evalSetURIs: {uri} line {line.number}: {line.problem}")
            if line.text.strip():
                try:
                    out.append(record_text(loads_strict(line.text)))
                except FormatError as exc:
                    raise DataError(f"inputs.evalSetURIs: {uri} line {line.number}: {exc}") from None
    return out


def review_sample(count: int, fraction: float, seed: int) -> set[int]:
    """Indexes of the candidates sampled for review: ceil(fraction × count) of them, chosen by the seed."""
    if fraction >= 1:
        return set(range(count))
    return set(random.Random(f"review:{seed}").sample(range(count), math.ceil(fraction * count)))


def already_done(config: SynthesisConfig, template_sha: str) -> Optional[GenerationReport]:
    """The complete generation in the work folder, if there is one of these inputs."""
    report = records.read_generation(config.workURI)
    if report is None:
        return None
    try:
        _, digest = records.read_candidates(config.workURI)
    except FileNotFoundError:
        return None
    if digest != report.candidatesDigest:
        return None  # candidates.jsonl is not the one the report describes: generate again
    if (report.lineage.seedDigest, report.lineage.templateDigest, report.requested) != \
            (config.inputs.seedDigest, template_sha, config.spec.examples):
        raise ConfigError(f"workURI {config.workURI}: holds a generation of other inputs (seed, template or "
                          "examples differ); each generation needs its own work folder")
    return report


def run(config_path: str) -> int:
    config = load_config(config_path)
    spec, inputs = config.spec, config.inputs
    template = template_text(spec.selfInstruct.template)  # a bad template fails before any download
    template_sha = template_digest(template)
    done = already_done(config, template_sha)
    if done is not None:
        log.info("generation already complete", extra={"event": "synthesis_done", "kept": done.kept,
                                                         "candidates_digest": done.candidatesDigest})
        return 0
    seeds, eval_texts = load_seed(config)
    decon_uris = list(dict.fromkeys([*inputs.evalSetURIs, *(spec.curation.decontamination.evalSetURIs
                                                            if spec.curation.decontamination else [])]))
    eval_texts += eval_set_texts(decon_uris)
    from . import generator

    with tempfile.TemporaryDirectory(prefix="synthesize-") as tmp:
        loaded = generator.load(inputs.baseModel, inputs.adapterURI, inputs.adapterDigest, Path(tmp))
        judge = None
        if spec.filters.judge is not None:
            judge_model = loaded if spec.filters.judge.model is None else \
                generator.load(spec.filters.judge.model, None, None, Path(tmp))
            judge = generator.ModelJudge(judge_model, spec.filters.judge.rubric)
        lineage = Lineage(syntheticDataset=f"{config.namespace}/{config.name}", seedDigest=inputs.seedDigest,
                          baseModelDigest=loaded.base_digest, generatorAdapterDigest=loaded.adapter_digest,
                          templateDigest=template_sha)
        filters = CandidateFilter(spec, seeds, eval_texts, loaded.count_tokens, judge)
        kept, generated = generate_candidates(config, loaded, template, seeds, filters, lineage)
    sampled = review_sample(len(kept), spec.review.fraction, spec.sampling.seed)
    for index, candidate in enumerate(kept):
        candidate.reviewRequired = index in sampled
    digest = records.write_candidates(config.workURI, kept)
    report = GenerationReport(requested=spec.examples, generated=generated, kept=len(kept), removed=filters.removed,
                              reviewRequired=len(sampled), lineage=lineage, candidatesDigest=digest,
                              examplesRemoved=filters.examples_removed)
    records.write_generation(config.workURI, report)
    log.info("generation complete", extra={"event": "synthesis_done", "generated": generated, "kept": len(kept),
                                           "removed": filters.removed, "candidates_digest": digest})
    return 0


def generate_candidates(config: SynthesisConfig, loaded, template: str, seeds: list[Example],
                        filters: CandidateFilter, lineage: Lineage) -> tuple[list[SyntheticCandidate], int]:
    """Attempts in batches until enough candidates are kept or the attempts are spent; (kept, generated)."""
    from .generator import BATCH_SIZE, generate

    spec = config.spec
    sampling = spec.sampling
    rng = random.Random(sampling.seed)
    seed_ids = [records.candidate_id(to_record(s, config.inputs.seedFormat, with_metadata=False)) for s in seeds]
    limit = spec.examples * spec.selfInstruct.maxAttempts
    shots = min(spec.selfInstruct.fewShot, len(seeds))
    kept: list[SyntheticCandidate] = []
    attempts = 0
    while len(kept) < spec.examples and attempts < limit:
        picks = [rng.sample(range(len(seeds)), shots) for _ in range(min(BATCH_SIZE, limit - attempts))]
        outputs = generate(loaded, [render(template, [seeds[i] for i in p]) for p in picks],
                           temperature=sampling.temperature, top_p=sampling.topP,
                           max_new_tokens=sampling.maxNewTokens, seed=sampling.seed + attempts,
                           stop_strings=["\n\n"])
        for pick, output in zip(picks, outputs):
            attempts += 1
            parsed = parse_output(output)
            found = filters.consider(*parsed) if parsed is not None else filters.unparseable(output)
            if found is not None:
                kept.append(SyntheticCandidate(
                    id=records.candidate_id(found.example), example=found.example, scores=found.scores,
                    lineage=lineage.model_copy(update={"seedIds": [seed_ids[i] for i in pick]})))
                if len(kept) >= spec.examples:
                    break
        log.info("generating", extra={"event": "synthesis_progress", "attempts": attempts, "kept": len(kept)})
    return kept, attempts
