"""The SyntheticDataset filters over planted candidate texts (a tiny random model writes gibberish, so the
candidates are given to the filter pipeline directly), the prompt template and output parsing, the novelty
index against rouge-score itself, and review sampling."""

from __future__ import annotations

import random

import pytest
from finetune_operator.api.synthetic import DEFAULT_TEMPLATE, SyntheticDatasetSpec
from rouge_score import rouge_scorer

from finetune_trainer.curation import estimate_text_tokens
from finetune_trainer.errors import ConfigError
from finetune_trainer.formats import Example
from finetune_trainer.synthesis import records
from finetune_trainer.synthesis.command import review_sample
from finetune_trainer.synthesis.filters import CandidateFilter
from finetune_trainer.synthesis.generator import judge_prompt, parse_score
from finetune_trainer.synthesis.novelty import NoveltyIndex
from finetune_trainer.synthesis.prompts import check_template, parse_output, render, to_example

SEEDS = [
    ("How do I pause a running fine-tuning job?", "FTO: Set spec.suspend to true; the trainer checkpoints and stops."),
    ("What is the default LoRA rank?", "FTO: The default rank r is 16, with alpha 32."),
    ("Which exit code means a configuration error?", "FTO: Exit code 3 is a configuration error; the Job fails at once."),
    ("Where does the validated data go?", "FTO: Into the Dataset's output folder as train.jsonl and eval.jsonl."),
]
EVAL = ["How can I see which adapter version is promoted for serving right now in the cluster? "
        "FTO: Run ftctl status and read the promoted digest in the adapters column."]
NOVEL = [
    ("Explain what the governance gate checks before promotion.", "FTO: Bias, PII memorization, evaluation and provenance."),
    ("Can a Dataset read from a private bucket?", "FTO: Yes, name a Secret with S3 credentials in spec.source."),
    ("How many GPUs does a trainer pod get by default?", "FTO: One GPU per node unless resources say otherwise."),
]


def spec(**overrides) -> SyntheticDatasetSpec:
    return SyntheticDatasetSpec.model_validate({"seed": {"dataset": "seed"}, "generator": {"baseModel": {"uri": "file:///m"}},
                                                "examples": 10, "format": "chat", **overrides})


def seed_examples() -> list[Example]:
    return [Example((("user", p), ("assistant", a))) for p, a in SEEDS]


def pipeline(judge=None, **overrides) -> CandidateFilter:
    return CandidateFilter(spec(**overrides), seed_examples(), EVAL, estimate_text_tokens, judge)


def test_novel_candidates_pass_with_their_scores_in_the_spec_format():
    f = pipeline(format="instruction")
    kept = [f.consider(p, a) for p, a in NOVEL]
    assert all(k is not None for k in kept)
    assert kept[0].example == {"instruction": NOVEL[0][0], "output": NOVEL[0][1]}
    assert all(0 <= k.scores["rougeL"] < 0.7 for k in kept)
    assert sum(f.removed.values()) == 0


def test_a_parroting_generator_is_removed_by_novelty_and_exact_copies_as_duplicates():
    f = pipeline()
    assert f.consider(*SEEDS[0]) is None  # a verbatim copy of a seed
    # seeds with a word changed in the instruction and a new answer: ROUGE-L of the instruction >= 0.7
    parrots = [("How do I pause a running training job?", "FTO: Suspend it."),
               ("What is the default LoRA alpha?", "FTO: Thirty-two, twice the rank."),
               ("Which exit code means a transient error?", "FTO: Exit code 4; the Job retries.")]
    assert [f.consider(p, a) for p, a in parrots] == [None, None, None]
    assert f.removed["exactDuplicate"] == 1 and f.removed["novelty"] == 3
    assert f.examples_removed["novelty"][0].startswith("Instruction: How do I pause a running training job?")
    # and against the pool: a novel candidate is kept, then its paraphrase is not
    assert f.consider(*NOVEL[0]) is not None
    assert f.consider("Explain what the governance gate checks before it promotes.", "FTO: Four checks.") is None
    assert f.removed["novelty"] == 4


def test_near_duplicates_of_the_whole_example_are_removed():
    f = pipeline()
    answer = ("FTO: The operator validates the data, trains the adapter with LoRA, runs the governance checks "
              "on it, and promotes it to the serving alias once every required check passes cleanly")
    assert f.consider("Describe a job.", answer) is not None
    # a different instruction (novel by ROUGE-L) with the same long answer: the word sets are near-identical
    assert f.consider("Summarize what happens.", answer + ".") is None
    assert f.removed["nearDuplicate"] == 1 and f.removed["novelty"] == 0


def test_planted_pii_follows_the_policy():
    leak = ("Who do I contact about quota increases?", "FTO: Write to jane.doe@example.com or call 555-123-4567.")
    rejecting = pipeline()
    assert rejecting.consider(*leak) is None and rejecting.removed["pii"] == 1
    assert "jane.doe@example.com" not in rejecting.examples_removed["pii"][0]  # shown redacted
    redacting = pipeline(curation={"piiPolicy": "redact"})
    kept = redacting.consider(*leak)
    assert kept is not None and "[EMAIL]" in kept.example["messages"][1]["content"]
    assert "jane.doe" not in str(kept.example)
    allowing = pipeline(curation={"piiPolicy": "allow"})
    assert "jane.doe@example.com" in str(allowing.consider(*leak).example)
    off = pipeline(filters={"pii": False})
    assert off.consider(*leak) is not None and off.removed["pii"] == 0


def test_an_eval_leak_is_removed_by_decontamination():
    f = pipeline()
    leaked = ("How can I see which adapter version is promoted for serving right now in the cluster?",
              "FTO: Run ftctl status and read the promoted digest in the adapters column.")
    assert f.consider(*leaked) is None
    assert f.removed["decontamination"] == 1


def test_quality_drops_placeholder_answers_always_and_lengths_when_configured():
    f = pipeline()
    assert f.consider("What should go here?", "N/A") is None
    assert f.consider("Anything else to add?", "...") is None
    assert f.removed["quality"] == 2
    strict = pipeline(curation={"quality": {"maxAnswerTokens": 5}})
    assert strict.consider(*NOVEL[0]) is None and strict.removed["quality"] == 1
    assert strict.consider("Is it fast?", "FTO: Yes.") is not None


def test_the_judge_removes_low_scores_and_unscored_answers():
    scores = {NOVEL[0][0]: 9.0, NOVEL[1][0]: 3.0, NOVEL[2][0]: None}
    f = pipeline(judge=lambda instruction, response: scores[instruction],
                 filters={"judge": {"rubric": "Is it a correct, useful answer?", "minScore": 6}})
    kept = [f.consider(p, a) for p, a in NOVEL]
    assert kept[0] is not None and kept[0].scores["judge"] == 9.0
    assert kept[1:] == [None, None] and f.removed["judge"] == 2


def test_judge_scores_are_parsed_from_the_answer():
    assert parse_score(" 8") == 8.0 and parse_score("10/10") == 10.0 and parse_score("Score: 7.5 out of 10") == 7.0
    assert parse_score(" none") is None and parse_score("0") is None
    assert judge_prompt("Rubric.", "Q", "A").endswith("Instruction: Q\nResponse: A\n\nRate the example from 1 to 10. Score:")


def test_removals_are_counted_and_at_most_five_shown():
    f = pipeline()
    for _ in range(8):
        f.unparseable("gibberish without the marker")
    assert f.removed["unparseable"] == 8 and len(f.examples_removed["unparseable"]) == 5


def test_output_parsing():
    assert parse_output(" Why is the sky blue?\nResponse: Rayleigh scattering.\n\nInstruction: next") == \
        ("Why is the sky blue?", "Rayleigh scattering.")
    assert parse_output("Instruction: Q?\nResponse: A.\nInstruction: more") == ("Q?", "A.")
    assert parse_output("no marker here") is None
    assert parse_output("Q?\nResponse:   ") is None and parse_output("\nResponse: only an answer") is None
    assert to_example("Q", "A", "completion") == {"prompt": "Q", "completion": "A"}


def test_the_default_template_renders_the_sampled_seeds():
    text = render(DEFAULT_TEMPLATE, seed_examples()[:2])
    assert "Here are 2 examples" in text and "Write example 3" in text
    assert f"Instruction: {SEEDS[0][0]}\nResponse: {SEEDS[0][1]}\n\nInstruction: {SEEDS[1][0]}" in text
    assert text.endswith("Instruction:")


@pytest.mark.parametrize("template, says", [
    ("Write one more example.", "must contain {examples}"),
    ("{examples}\n{topic}", "unknown placeholder {topic}"),
    ("{examples} {examples.upper}", "unknown placeholder {examples.upper}"),
    ("{examples} and a lone { brace", "write literal braces"),
    ("{examples} {0}", "unknown placeholder {0}"),
])
def test_template_errors_name_the_field(template, says):
    with pytest.raises(ConfigError) as err:
        check_template(template)
    assert str(err.value).startswith("spec.selfInstruct.template:") and says in str(err.value)


def test_literal_braces_are_allowed():
    check_template('{examples}\nAnswer as JSON: {{"answer": ...}}')


def test_novelty_index_matches_rouge_score_exactly():
    words = "the a job dataset adapter model how what do i pause train serve data check promote".split()
    rng = random.Random(3)
    pool = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) for _ in range(120)]
    index = NoveltyIndex(0.7)
    for text in pool:
        index.add(text)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for _ in range(40):
        probe = " ".join(rng.choice(words) for _ in range(rng.randint(3, 14)))
        exact = max(scorer.score(p, probe)["rougeL"].fmeasure for p in pool)
        got = index.max_rouge(probe)
        # exact below the threshold; at or above it the search may stop at the first score that crosses
        assert (got >= 0.7 and exact >= 0.7) or got == pytest.approx(exact)
    assert index.exact_scored < 40 * len(pool) / 2  # the bound spares most of the exact LCS computations


def test_review_sample_is_deterministic_and_sized_by_the_fraction():
    assert review_sample(10, 1.0, 0) == set(range(10))
    a, b = review_sample(50, 0.2, 7), review_sample(50, 0.2, 7)
    assert a == b and len(a) == 10
    assert review_sample(50, 0.2, 8) != a
    assert len(review_sample(3, 0.1, 0)) == 1  # at least one is reviewed


def test_candidate_ids_are_the_canonical_json_digest():
    example = {"messages": [{"role": "user", "content": "é"}, {"role": "assistant", "content": "b"}]}
    reordered = {"messages": [{"content": "é", "role": "user"}, {"content": "b", "role": "assistant"}]}
    assert records.candidate_id(example) == records.candidate_id(reordered)
    assert len(records.candidate_id(example)) == 16
    import hashlib
    import json
    assert records.candidate_id(example) == hashlib.sha256(
        json.dumps(example, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()[:16]


def test_a_bad_candidates_line_is_named():
    from finetune_trainer.errors import DataError

    good = ('{"id":"0123456789abcdef","example":{"prompt":"a","completion":"b"},"lineage":{"syntheticDataset":"a/b",'
            '"seedDigest":"sha256:' + "a" * 64 + '","baseModelDigest":"sha256:' + "b" * 64 + '","templateDigest":"sha256:'
            + "c" * 64 + '"}}\n')
    assert records.decode_candidates(good.encode())[0].id == "0123456789abcdef"
    with pytest.raises(DataError, match=r"^candidates.jsonl line 2: not JSON"):
        records.decode_candidates((good + "{oops\n").encode())
    with pytest.raises(DataError, match=r"^candidates.jsonl line 2: id: String should match pattern"):
        records.decode_candidates((good + good.replace("0123456789abcdef", "XYZ")).encode())
