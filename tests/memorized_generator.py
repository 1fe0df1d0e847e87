"""A tiny generator model that has learnt to continue Self-Instruct prompts with known examples.

A random tiny model writes gibberish, so every candidate is unparseable and a SyntheticDataset
never gets to review. This one is trained here (a plain torch loop, test infrastructure, not the
code under test) on the real prompts -- the default template rendered over the seed set -- each
followed by one of NEW_EXAMPLES, so sampling from it yields parseable, novel candidates: the
stand-in for "a weaker model fine-tuned on the seed set" at the size of a unit test.
"""

from __future__ import annotations

import random
from pathlib import Path

#: What the generator learns to write: new questions about the quickstart's subject, unlike the seeds.
NEW_EXAMPLES = [
    ("How do I pause a running job overnight?", "Set spec.suspend to true; it resumes from the checkpoint."),
    ("Where do the trainer's logs go?", "To stderr as JSON lines; kubectl logs shows them."),
    ("Can two teams share one base model?", "Yes: each FineTuneJob names it; the cache is per node."),
    ("What happens when a node is drained?", "The pod checkpoints on SIGTERM and a new pod resumes."),
    ("How are GPU hours counted?", "From the trainer pods' run time times their GPUs, in status.gpuHours."),
    ("Which metrics show training speed?", "finetune_trainer_tokens_per_second, on the pod's metrics port."),
    ("How do I roll back an alias?", "ftctl rollback ALIAS moves it to the adapter promoted before."),
    ("Does the operator read my Secrets?", "No: Jobs get credentials through secretKeyRef only."),
]


def build(out_dir: Path, seed_texts: list[tuple[str, str]], *, steps: int = 220, seed: int = 0) -> Path:
    """Save the tiny model, trained to continue rendered prompts with NEW_EXAMPLES, to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_operator.api.synthetic import DEFAULT_TEMPLATE
    from finetune_trainer.tiny import build_tiny_model

    corpus = [f"Instruction: {q}\nResponse: {a}" for q, a in seed_texts + NEW_EXAMPLES]
    build_tiny_model(out_dir, hidden_size=96, layers=2, heads=4, kv_heads=2, intermediate_size=192,
                     vocab_size=768, seed=seed, extra_text=corpus + [DEFAULT_TEMPLATE])
    tok = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True)
    rng = random.Random(seed)
    torch.manual_seed(seed)

    def sample() -> tuple[list[int], int]:
        shots = rng.sample(seed_texts, 3)
        shown = "\n\n".join(f"Instruction: {q}\nResponse: {a}" for q, a in shots)
        prompt = DEFAULT_TEMPLATE.format(examples=shown, n_seeds=3, n=4)
        q, a = rng.choice(NEW_EXAMPLES)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        target = tok(f" {q}\nResponse: {a}\n\n", add_special_tokens=False)["input_ids"]
        return ids + target, len(ids)

    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = [sample() for _ in range(4)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((4, width), tok.pad_token_id)
        labels = torch.full((4, width), -100)
        mask = torch.zeros((4, width), dtype=torch.long)
        for row, (ids, start) in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            labels[row, start:len(ids)] = torch.tensor(ids[start:])
            mask[row, :len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
