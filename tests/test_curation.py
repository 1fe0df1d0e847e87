"""Dataset curation (spec.curation: nearDuplicates, quality, decontamination): the steps on their
own, on planted datasets generated from a seed (tests/curation_planted.py) compared with the
planted truth, through the validate command, into a bounded status, and re-validated by the
provenance check with the same evaluation files."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_operator import children, curation_status, decisions, governance
from finetune_operator.api.curation import QualityFilters
from finetune_operator.api.dataset import DatasetSpec
from finetune_operator.config import OperatorConfig
from finetune_trainer import curation as cur
from finetune_trainer.formats import parse_line
from finetune_trainer.validate import validate_source, validate_text

import curation_planted as planted

ALL_STEPS = {"nearDuplicates": {}, "quality": {}, "decontamination": {}}


def spec(curation: dict | None = None, evaluation: dict | None = None, source: str = "file:///unused.jsonl",
         fmt: str = "chat") -> DatasetSpec:
    return DatasetSpec.model_validate({
        "source": {"uri": source}, "format": fmt, "evaluation": evaluation or {"fraction": 0.1, "seed": 3},
        "provenance": {"origin": "tests", "license": "CC0-1.0"}, "curation": {"minExamples": 1, **(curation or {})}})


def jsonl(lines: list[str]) -> str:
    return "\n".join(lines) + "\n"


def chat(prompt: str, answer: str, **metadata) -> str:
    record = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
    return json.dumps({**record, **({"metadata": metadata} if metadata else {})})


def removed(result) -> dict[int, dict]:
    return {e["line"]: e for e in map(json.loads, result.removed_jsonl.splitlines()) if "file" not in e}


# ------------------------------------------------------------------ planted datasets vs the truth


#: Fixed seeds; FUZZ_RANDOM=1 (as for the schema fuzz tests) adds one nobody has seen, named in the test id.
SEEDS = [101, 202, 303] + ([random.SystemRandom().randrange(10**6)] if os.environ.get("FUZZ_RANDOM") == "1" else [])


@pytest.mark.parametrize("seed", SEEDS)
def test_planted_near_duplicates_and_eval_leaks_are_found_and_distinct_examples_kept(seed, tmp_path):
    source, evaluation, truth = planted.generate(seed)
    (tmp_path / "eval.jsonl").write_text(jsonl(evaluation))
    result = validate_text(jsonl(source), spec(ALL_STEPS, {"uri": f"file://{tmp_path}/eval.jsonl"}),
                           jsonl(evaluation))
    assert result.valid, result.message
    figures = planted.measure(result.removed_jsonl, truth)
    assert figures.near_duplicates >= 400 and figures.distinct >= 2000
    assert figures.recall >= 0.95, f"near-duplicate recall {figures.recall:.3f}"
    assert figures.false_removal_rate < 0.02, f"{figures.falsely_removed} of {figures.distinct} distinct removed"
    for kind, (n_planted, n_removed) in figures.quality.items():
        assert n_removed == n_planted, kind
    # Nothing silently lost: every source line is kept for training or listed in removed.jsonl once.
    gone = removed(result)
    assert result.stats.examples + len(gone) == len(source)
    kept = [json.loads(line) for line in result.train_jsonl.splitlines()]
    assert len(kept) == result.stats.examples
    # The counts in stats are removed.jsonl's, per step, and the duplicates by kind add up.
    steps = {s.step: s for s in result.stats.curation.steps}
    for step in {e["step"] for e in gone.values()}:
        assert steps[step].removed == sum(1 for e in gone.values() if e["step"] == step)
        assert steps[step].lines == sorted(n for n, e in gone.items() if e["step"] == step)[:10]
    dup = result.stats.curation.duplicates
    assert dup["near"] + dup["eval"] >= steps["nearDuplicate"].removed
    assert dup["eval"] > 0  # eval leaks were removed as such


def test_planted_leaks_into_a_hash_split_eval_are_kept_out_of_training():
    """With evaluation.fraction the eval split comes from the same source: near-duplicates are
    removed before the split, so no cluster ends up on both sides."""
    source, _, truth = planted.generate(7, leaks=0, embedded=0)
    result = validate_text(jsonl(source), spec(ALL_STEPS, {"fraction": 0.2, "seed": 1}))
    assert result.valid, result.message
    train = [parse_line(line, "chat") for line in result.train_jsonl.splitlines()]
    evals = [parse_line(line, "chat") for line in result.eval_jsonl.splitlines()]
    index = cur.NearDuplicateIndex(0.7)
    for i, ex in enumerate(evals):
        index.add(-i - 1, index.signature(ex.text()))
    leaked = [ex for ex in train if index.match(index.signature(ex.text())) is not None]
    assert len(leaked) <= len(train) * 0.002
    assert planted.measure(result.removed_jsonl, truth).recall >= 0.95


# ------------------------------------------------------------------ the steps on their own


def test_quality_checks_name_the_step_and_why():
    q = QualityFilters(minPromptTokens=2, maxAnswerTokens=10)
    assert cur.placeholder_check("  N/A ", q).step == "emptyAnswer"
    assert cur.placeholder_check("...", q).detail == "answer is empty or only punctuation"
    assert cur.placeholder_check("Paris is the capital.", q) is None
    assert cur.repeated_ngram_ratio("the cat the cat the cat".split(), 3) == 0.5
    looping = " ".join(["we will see"] * 6)
    assert cur.repetition_check(looping, q).step == "repetition"
    assert cur.repetition_check("one two three four five six seven eight nine ten eleven", q) is None
    assert cur.length_check(1, 5, q).step == "promptLength"
    assert cur.length_check(2, 11, q).step == "answerLength"
    assert cur.length_check(2, 10, q) is None


def test_one_answer_for_many_prompts_is_removed_but_short_labels_are_not():
    lines = [chat(f"Question number {i} about topic {i}?", "As an AI I cannot answer that question.") for i in range(6)]
    lines += [chat(f"Is {i} even?", "yes") for i in range(6)]
    lines += [chat(f"Tell me fact {i}.", f"Fact {i} is that {i} comes after {i - 1}.") for i in range(6)]
    result = validate_text(jsonl(lines), spec({"quality": {"maxPromptsPerAnswer": 5}}, {"fraction": 0.01}))
    assert result.valid, result.message
    gone = removed(result)
    assert {n for n, e in gone.items() if e["step"] == "sameAnswer"} <= set(range(1, 7))
    assert sum(1 for e in gone.values() if e["step"] == "sameAnswer") + result.stats.evalExamples >= 6
    assert all(n > 6 or gone.get(n, {}).get("step") == "sameAnswer" for n in range(1, 13) if n in gone)
    kept = result.train_jsonl + result.eval_jsonl
    assert kept.count('"yes"') == 6 and "As an AI" not in result.train_jsonl


def test_decontamination_against_a_policy_eval_set_and_the_dataset_s_own(tmp_path):
    policy_set = tmp_path / "policy-eval.jsonl"
    policy_set.write_text(json.dumps({"prompt": "Which river flows through the old city of Kavoro in spring?",
                                      "answer": "The Zevodo river, swollen by snowmelt."}) + "\n")
    lines = [chat(f"Unrelated question {i} on gardening and soil in the north?", f"Plant early, number {i}.")
             for i in range(20)]
    lines.append(chat("Answer briefly. Which river flows through the old city of Kavoro in spring?",
                      "The Zevodo river, swollen by snowmelt."))
    s = spec({"decontamination": {}})
    without = validate_text(jsonl(lines), s)
    assert "decontamination" not in {e["step"] for e in removed(without).values()}
    result = validate_text(jsonl(lines), s, eval_set_uris=[f"file://{policy_set}"])
    gone = removed(result)
    assert [n for n, e in gone.items() if e["step"] == "decontamination"] == [21]
    assert result.stats.curation.evalSetURIs == [f"file://{policy_set}"]
    assert result.digest != without.digest and result.curation["settingsDigest"] != without.curation["settingsDigest"]


def test_a_broken_eval_set_makes_the_dataset_invalid_naming_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": NaN}\n')
    result = validate_text(jsonl([chat("q one two", "a one two")] * 1 + [chat("q three", "a four")]),
                           spec({"decontamination": {"evalSetURIs": [f"file://{bad}"]}}))
    assert not result.valid and result.reason == "InvalidEvalSet"
    assert f"file://{bad} line 2" in result.message and "Traceback" not in result.message
    missing = validate_text(jsonl([chat("q one", "a two"), chat("q three", "a four")]),
                            spec({"decontamination": {}}), eval_set_uris=[f"file://{tmp_path}/nope.jsonl"])
    assert missing.reason == "InvalidEvalSet" and "not found" in missing.message


def test_token_lengths_use_the_base_model_tokenizer_when_given(tiny_model_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    answer = "internationalization " * 3
    exact = len(tok.encode(answer, add_special_tokens=False).ids)
    estimate = cur.estimate_text_tokens(answer)
    assert exact != estimate
    bound = min(exact, estimate)  # removed by whichever count is larger
    lines = [chat("Say the long word three times please.", answer), chat("Say hi.", "Hi there.")]
    quality = {"maxAnswerTokens": bound, "minAnswerTokens": 1}
    by_estimate = removed(validate_text(jsonl(lines), spec({"quality": quality}, {"fraction": 0.01})))
    by_tokenizer = removed(validate_text(jsonl(lines), spec({"quality": quality, "tokenizerURI": f"file://{tiny_model_dir}"},
                                                           {"fraction": 0.01})))
    assert (1 in by_estimate) == (estimate > bound) and (1 in by_tokenizer) == (exact > bound)
    assert (1 in by_estimate) != (1 in by_tokenizer)


def test_metadata_is_kept_counted_and_does_not_split_duplicates():
    lines = [chat(f"Question {i} about widgets?", f"Widget {i} is blue.", source="wiki" if i % 3 else "forum",
                  tags=["widgets", "colour"] if i % 2 else ["widgets"]) for i in range(12)]
    lines.append(chat("Question 1 about widgets?", "Widget 1 is blue.", source="elsewhere"))  # same content
    result = validate_text(jsonl(lines), spec(evaluation={"fraction": 0.01}))
    assert result.valid, result.message
    assert result.stats.duplicatesRemoved == 1
    train = [json.loads(line) for line in result.train_jsonl.splitlines()]
    assert all("metadata" in r for r in train)
    sources = {e.name: e.count for e in result.stats.curation.sources}
    assert sum(sources.values()) == result.stats.examples and set(sources) <= {"wiki", "forum"}
    tags = {e.name: e.count for e in result.stats.curation.tags}
    assert tags["widgets"] == result.stats.examples
    histogram = result.stats.curation.tokenHistogram
    assert sum(b.count for b in histogram) == result.stats.examples


@pytest.mark.parametrize("metadata, field", [
    ("[1]", "metadata: must be an object"),
    ('{"k": {"nested": 1}}', "metadata.k: must be a string, number, boolean or list of strings"),
    ('{"k": [1, 2]}', "metadata.k: a list must hold"),
])
def test_bad_metadata_is_an_invalid_line_naming_the_key(metadata, field):
    good = chat("q", "a")
    bad = good[:-1] + f', "metadata": {metadata}}}'
    result = validate_text(jsonl([good, good.replace('"q"', '"r"'), bad]), spec())
    assert not result.valid and result.reason == "TooManyInvalidLines"
    assert f"line 3: {field}" in result.message, result.message


def test_curation_off_leaves_the_data_alone():
    source, _, _ = planted.generate(5, distinct=300, clusters=40, leaks=0, embedded=0)
    result = validate_text(jsonl(source), spec())
    assert [s.step for s in result.stats.curation.steps] == ["exactDuplicate"]
    assert result.stats.examples + result.stats.evalExamples + result.stats.duplicatesRemoved == len(source)


# ------------------------------------------------------------------ command, status, provenance


def test_the_command_writes_removed_jsonl_and_status_holds_bounded_stats(tmp_path):
    source, evaluation, truth = planted.generate(42, distinct=400, clusters=60, leaks=30, evals=60, embedded=5)
    (tmp_path / "data.jsonl").write_text(jsonl(source))
    (tmp_path / "eval.jsonl").write_text(jsonl(evaluation))
    policy_set = tmp_path / "policy.jsonl"
    policy_set.write_text(json.dumps({"prompt": "x y z", "answer": "w"}) + "\n")
    ds_spec = spec(ALL_STEPS, {"uri": f"file://{tmp_path}/eval.jsonl"}, source=f"file://{tmp_path}/data.jsonl")
    dataset = {"apiVersion": "finetune.dev/v1alpha1", "kind": "Dataset",
               "metadata": {"name": "planted", "namespace": "team", "uid": "u1", "generation": 1},
               "spec": ds_spec.model_dump(mode="json", exclude_none=True)}
    cfg = OperatorConfig(artifact_store=f"file://{tmp_path}/store")
    policies = [{"metadata": {"name": "p"}, "spec": {"evaluation": {"evalSetURI": f"file://{policy_set}"}}},
                {"metadata": {"name": "elsewhere"}, "spec": {"namespaces": ["other"],
                                                             "evaluation": {"evalSetURI": "file:///not-ours"}}}]
    uris = governance.policy_eval_sets(policies, "team")
    assert uris == (f"file://{policy_set}",)
    plan = decisions.plan_dataset(dataset, None, [], None, cfg, "2026-12-01T00:00:00Z", eval_set_uris=uris)
    config_map = next(o for o in plan.create if o["kind"] == "ConfigMap")
    validation = json.loads(config_map["data"]["validation.json"])
    assert validation["policyEvalSetURIs"] == [f"file://{policy_set}"]
    config_path = tmp_path / "validation.json"
    config_path.write_text(json.dumps(validation))
    proc = subprocess.run([sys.executable, "-c", f"from finetune_trainer.validate import run; run({str(config_path)!r})"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = Path(children.dataset_output_uri(dataset, cfg).removeprefix("file://"))
    report = json.loads((out / "report.json").read_text())
    removed_lines = [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
    assert planted.measure((out / "removed.jsonl").read_text(), truth).recall >= 0.95
    assert report["curation"]["settings"]["evalSetURIs"] == [f"file://{policy_set}"]
    assert all(len(e["excerpt"]) <= 200 for rows in report["curation"]["examples"].values() for e in rows)

    summary = decisions.summarize_job({"metadata": {"name": "planted-validate-1"},
                                       "status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}})
    done = decisions.plan_dataset(dataset, summary, [], report, cfg, "2026-12-01T00:01:00Z", eval_set_uris=uris)
    status = done.status
    assert status["phase"] == "Ready"
    stats = status["stats"]["curation"]
    assert stats["removedURI"].endswith("removed.jsonl") and stats["settingsDigest"] == report["curation"]["settingsDigest"]
    assert sum(s["removed"] for s in stats["steps"]) == len(removed_lines) - sum(1 for e in removed_lines if "file" in e)
    small = next(c for c in status["conditions"] if c["type"] == "SmallDataset")
    assert small["status"] == "True" and str(status["stats"]["examples"]) in small["message"]
    assert len(json.dumps(status)) < 16_000
    assert children.dataset_eval_sets({"status": status}) == [f"file://{policy_set}"]

    # The provenance check re-validates with the same evaluation files, and gets the same digest.
    from finetune_trainer.governance.provenance import current_dataset_digest

    assert current_dataset_digest(ds_spec, [f"file://{policy_set}"])[0] == report["digest"]


def test_status_from_a_hostile_report_stays_bounded():
    huge = "x" * (1 << 20)
    raw = {"settingsDigest": huge, "steps": [{"step": "nearDuplicate", "removed": 10**12, "lines": list(range(10**5)),
                                              "examples": [huge] * 1000}] * 100,
           "duplicates": {"exact": -4, "near": "many", "evil": 3}, "tokenHistogram": [{"le": 1, "count": 1}] * 10**4,
           "sources": [{"name": huge, "count": 1}] * 10**4, "tags": "not a list", "evalSetURIs": [huge] * 100,
           "removedURI": huge, "tokenCount": huge}
    bounded = curation_status.curation_stats(raw)
    assert len(json.dumps(bounded)) < 40_000  # whatever the report's size (the API server takes ~1.5 MB)
    assert len(bounded["steps"]) == 1
    assert bounded["steps"][0]["lines"] == list(range(10)) and len(bounded["steps"][0]["examples"]) == 3
    assert bounded["duplicates"] == {"exact": 0, "near": 0, "eval": 0} and "settingsDigest" not in bounded
    assert curation_status.curation_stats("nope") is None


def test_small_dataset_is_a_warning_with_the_count_not_a_failure():
    conds = curation_status.with_small_dataset([], 120, 5000, 3, "t")
    assert conds[0]["status"] == "True" and conds[0]["reason"] == "BelowRecommendedSize"
    assert "120" in conds[0]["message"] and "5000" in conds[0]["message"] and conds[0]["observedGeneration"] == 3
    assert curation_status.with_small_dataset(conds, 6000, 5000, 4, "t2")[0]["status"] == "False"


def test_validate_source_reads_the_spec_tokenizer_too(tmp_path, tiny_model_dir):
    lines = [chat(f"Question {i}?", f"Answer number {i}.") for i in range(10)]
    (tmp_path / "d.jsonl").write_text(jsonl(lines))
    with_tok = spec({"tokenizerURI": f"file://{tiny_model_dir}"}, source=f"file://{tmp_path}/d.jsonl")
    result = validate_source(with_tok)
    assert result.stats.curation.tokenCount == f"file://{tiny_model_dir}"
    assert result.stats.tokens != validate_source(spec(source=f"file://{tmp_path}/d.jsonl")).stats.tokens


def test_pii_in_metadata_is_found_and_redacted_like_the_rest():
    lines = [chat(f"Question {i}?", f"Answer {i}.", owner="jane.doe@example.com" if i == 2 else "team")
             for i in range(6)]
    rejected = validate_text(jsonl(lines), spec())
    assert rejected.reason == "PIIFound" and rejected.pii_findings == {"email": 1}
    redacted = validate_text(jsonl(lines), spec({"piiPolicy": "redact"}, {"fraction": 0.01}))
    assert redacted.valid and "jane.doe" not in redacted.train_jsonl + redacted.eval_jsonl


def test_a_very_long_example_lands_in_the_open_bucket_and_status_keeps_the_histogram():
    lines = [chat("Write a lot.", "word " * 40_000)] + [chat(f"Short {i}?", "Yes.") for i in range(10)]
    result = validate_text(jsonl(lines), spec(evaluation={"fraction": 0.01}))
    assert result.valid, result.message
    assert "word word" in result.train_jsonl  # (the split put it in training)
    buckets = {b.le: b.count for b in result.stats.curation.tokenHistogram}
    assert buckets[-1] == 1 and sum(buckets.values()) == result.stats.examples
    bounded = curation_status.curation_stats(result.stats.curation.model_dump(mode="json"))
    assert {b["le"] for b in bounded["tokenHistogram"]} == set(buckets)


def test_sixteen_evaluation_files_from_the_spec_and_the_policies_are_all_used_and_listed(tmp_path):
    uris = []
    for i in range(16):
        path = tmp_path / f"eval-{i}.jsonl"
        path.write_text(json.dumps({"prompt": f"held out question {i} alpha beta gamma delta", "answer": "x"}) + "\n")
        uris.append(f"file://{path}")
    lines = [chat(f"Training question {i} on other things entirely?", f"Answer {i}.") for i in range(10)]
    lines.append(chat("held out question 15 alpha beta gamma delta", "x"))
    result = validate_text(jsonl(lines), spec({"decontamination": {"evalSetURIs": uris[:8]}}), eval_set_uris=uris[8:])
    assert result.valid, result.message
    assert result.stats.curation.evalSetURIs == uris
    assert [n for n, e in removed(result).items() if e["step"] == "decontamination"] == [11]
    assert curation_status.curation_stats(result.stats.curation.model_dump(mode="json"))["evalSetURIs"] == uris
