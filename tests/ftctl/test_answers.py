"""How `ftctl run` judges held-out answers (answers.py) and picks torch threads (local.py): plain
functions, no model."""

from __future__ import annotations

import pytest

from finetune_operator.ftctl import answers
from finetune_operator.ftctl.errors import FtctlError
from finetune_operator.ftctl.local import choose_threads

RANK = "FTO: r is the rank of the LoRA update matrices. The default is 16."


def test_the_style_without_the_fact_is_wrong():
    """The answer the issue quotes: house style, no fact."""
    s = answers.score("FTO: The rank is the highest. It is the highest rank that is not a rank the other.",
                      RANK, "What is the LoRA rank r?")
    assert not s["right"]


def test_a_wrong_number_is_wrong_although_rouge_likes_it():
    """ROUGE-L rewards the shared wording; the key-term rule looks for the fact."""
    ref = "FTO: The default rank is 16."
    s = answers.score("FTO: The default rank is 8.", ref, "What is the default rank?")
    assert s["rougeL"] > 0.7 and not s["right"]
    assert answers.score("FTO: The default rank is 16.", ref, "What is the default rank?")["right"]


def test_the_fact_in_other_words_is_right():
    s = answers.score("FTO: Set spec.suspend to true; the trainer stops after a checkpoint.",
                      "FTO: Set spec.suspend to true. The trainer writes a checkpoint and stops.",
                      "How do I pause a training run?")
    assert s["right"] and s["keyRecall"] >= 0.5


def test_words_of_the_question_and_the_style_tag_are_not_key_terms():
    keys = answers.key_terms("FTO: Three methods: lora, qlora and dora.", "Which fine-tuning methods are supported?")
    assert keys == ["three", "lora", "qlora", "dora"]
    # Repeating the question states nothing.
    assert not answers.score("FTO: The fine-tuning methods are supported.", "FTO: Three methods: lora, qlora and dora.",
                             "Which fine-tuning methods are supported?")["right"]


def test_a_reference_without_key_terms_falls_back_to_rouge():
    s = answers.score("It is the one.", "FTO: It is the one.", "Which one is it?")
    assert s["keyTerms"] == [] and s["keyRecall"] is None and s["right"]
    assert not answers.score("No idea at all, sorry.", "FTO: It is the one.", "Which one is it?")["right"]


def test_summary_counts_right_answers_before_and_after():
    samples = [{"beforeScore": answers.score("no idea", RANK, "q"), "afterScore": answers.score(RANK, RANK, "q")},
               {"beforeScore": answers.score(RANK, RANK, "q"), "afterScore": answers.score(RANK, RANK, "q")}]
    summary = answers.summarize(samples)
    assert summary["examples"] == 2 and summary["rightBefore"] == 1 and summary["rightAfter"] == 2
    assert "base model 1/2, base + adapter 2/2" in answers.right_line(summary)


@pytest.mark.parametrize("idle, expected", [(1.95, 2), (1.75, 2), (1.05, 1), (0.2, 1), (0.0, 1), (7.9, 2)])
def test_threads_follow_the_idle_cpus(idle, expected):
    threads, why = choose_threads({}, 2, idle)
    assert threads == expected and f"{idle:.1f} of 2 CPUs idle" in why


def test_an_explicit_thread_count_wins():
    assert choose_threads({"OMP_NUM_THREADS": "3"}, 2, 0.0) == (3, "OMP_NUM_THREADS=3 from the environment")
    with pytest.raises(FtctlError, match="OMP_NUM_THREADS"):
        choose_threads({"OMP_NUM_THREADS": "many"}, 2, 2.0)


def test_unknown_idle_time_means_one_thread():
    assert choose_threads({}, 8, None)[0] == 1


def test_tiny_adapts_the_top_layer_where_the_job_names_layers(tmp_path):
    """--tiny: SmolLM2's layers 22-29 become the 2-layer tiny model's top layer."""
    from pathlib import Path

    import yaml

    from finetune_operator.ftctl import models
    from finetune_operator.ftctl.local import shrink_for_tiny

    spec = yaml.safe_load((Path(__file__).parents[2] / "examples/quickstart/finetunejob.yaml").read_text())["spec"]
    assert spec["lora"]["layersToTransform"] == list(range(22, 30))
    tiny = shrink_for_tiny(spec, tmp_path)
    assert tiny["lora"]["layersToTransform"] == [models.TINY_SHAPE["layers"] - 1]
    assert tiny["lora"]["targetModules"] == spec["lora"]["targetModules"]
    assert shrink_for_tiny({**spec, "lora": {"targetModules": ["all-linear"]}}, tmp_path)["lora"] == {
        "targetModules": ["all-linear"]}


def test_batched_greedy_answers_equal_one_prompt_at_a_time(tiny_model_dir):
    """Left padding (hidden by the attention mask) must not change a greedy answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True, dtype=torch.float32).eval()
    prompts = [tok(text)["input_ids"] for text in ("What is r?", "How do I pause a training run of mine?", "Hi")]
    assert len({len(p) for p in prompts}) == 3  # different lengths: the batch is padded
    batched = answers.generate(model, tok, prompts, max_new_tokens=12)
    alone = [answers.generate(model, tok, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == alone and any(batched)
