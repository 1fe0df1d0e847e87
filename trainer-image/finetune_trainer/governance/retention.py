"""retention: does a continual job's adapter still do what its parent did?

For each earlier task -- by default the eval split of the parent's Dataset and of every
ancestor's (the lineage chain of the parent's manifest), or `retention.evalSetURIs` of the
policy -- the held-out loss (the trainer's objective, token-weighted over response tokens)
is computed three times on the same examples: the base model (adapter off), the parent
adapter, and the new adapter. The check passes when on every task

    (new - parent) / parent <= maxForgetting     and     new < base

so an adapter that learned task B by forgetting task A is not promoted. The value reported is
the largest relative forgetting over the tasks; the report has base / parent / new per task.

The parent is the adapter the operator resolved spec.initFrom to (config.initFrom): fetched file
by file and pinned to its digest, like the adapter under judgement; the new adapter's manifest
must name the same parent. A job without spec.initFrom passes (nothing to retain) and says so.

A point estimate per task, not an interval: the threshold is a tolerance on a loss the parent
itself was judged by; MAX_TASK_EXAMPLES bounds the cost (one forward pass per example and model).
"""

from __future__ import annotations

import json

from finetune_operator.api.governance import CheckResult

from .. import storage
from .base import CheckContext, failed, peft_folder

#: Held-out examples scored per earlier task (the first ones of its file).
MAX_TASK_EXAMPLES = 256
PARENT = "parent"


def earlier_tasks(ctx: CheckContext, parent_manifest: dict) -> list[dict]:
    """[{uri (folder), file, format}] of the tasks to check."""
    from finetune_operator.lineage import chain_of

    uris = ctx.policy.retention.evalSetURIs
    if uris:
        out = []
        for uri in uris:
            folder, _, name = uri.rstrip("/").rpartition("/")
            out.append({"uri": folder, "file": name, "format": ctx.config.data.format} if name.endswith(".jsonl")
                       else {"uri": uri.rstrip("/"), "file": "eval.jsonl", "format": ctx.config.data.format})
        return out
    chain = chain_of(ctx.config.initFrom.uri, ctx.config.initFrom.digest, parent_manifest)
    seen, out = set(), []
    for entry in chain:
        uri = entry.get("datasetURI")
        if uri and uri not in seen:
            seen.add(uri)
            out.append({"uri": uri, "file": "eval.jsonl", "format": entry.get("datasetFormat") or ctx.config.data.format,
                        "adapter": entry["digest"]})
    return out


def task_losses(ctx: CheckContext, task: dict) -> dict:
    """Token-weighted held-out loss of the base model, the parent and the new adapter on one task."""
    from ..data import read_examples, tokenize_all
    from ..objective import example_logprobs

    training = ctx.config.training
    examples = tokenize_all(read_examples(task["uri"], task["file"], task["format"])[:MAX_TASK_EXAMPLES],
                            ctx.tokenizer, training.maxSeqLength)
    if not examples:
        raise ValueError(f"{task['uri']}/{task['file']}: no example has a response token within maxSeqLength")
    pad_id = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else ctx.tokenizer.eos_token_id
    kw = dict(max_len=training.maxSeqLength, pad_id=pad_id, device=ctx.device, batch_size=training.batchSize)
    tokens = [e.trainable_tokens for e in examples]
    model = ctx.model

    def loss(means: list[float]) -> float:
        return -sum(m * n for m, n in zip(means, tokens)) / sum(tokens)

    new = loss(example_logprobs(model, examples, **kw))
    model.set_adapter(PARENT)
    try:
        parent = loss(example_logprobs(model, examples, **kw))
    finally:
        model.set_adapter("default")
    with ctx.base_model_behaviour():
        base = loss(example_logprobs(model, examples, **kw))
    return {"examples": len(examples), "tokens": sum(tokens), "baseLoss": base, "parentLoss": parent, "newLoss": new,
            "forgetting": (new - parent) / parent if parent > 0 else 0.0}


class RetentionCheck:
    name = "retention"

    def run(self, ctx: CheckContext) -> CheckResult:
        from .runner import AdapterRefused, fetch_adapter

        t = ctx.policy.retention
        parent = ctx.config.initFrom
        if parent is None:
            return CheckResult(name=self.name, passed=True, threshold=t.maxForgetting,
                               message="not a continual job (no spec.initFrom): no earlier task to retain")
        try:
            parent_dir = fetch_adapter(parent.uri, ctx.workdir / "parent", expected_digest=parent.digest)
        except AdapterRefused as exc:
            return failed(self.name, f"spec.initFrom: the parent adapter is refused: {exc}")
        parent_manifest = json.loads((parent_dir / "manifest.json").read_bytes())
        child_manifest = json.loads((ctx.adapter_dir / "manifest.json").read_bytes())
        named = ((child_manifest.get("lineage") or {}).get("parent") or {}).get("digest")
        if named != parent.digest:
            return failed(self.name, f"the adapter's manifest names parent {str(named)[:80]}, not {parent.digest} "
                                     "(spec.initFrom): it was not trained from that parent")
        tasks = earlier_tasks(ctx, parent_manifest)
        if not tasks:
            return failed(self.name, "no earlier task to check: the parent's lineage names no Dataset and the policy "
                                     "sets no retention.evalSetURIs")
        ctx.model.load_adapter(str(peft_folder(parent_dir)), adapter_name=PARENT, is_trainable=False)
        try:
            results = [{"task": f"{task['uri']}/{task['file']}", **task_losses(ctx, task)} for task in tasks]
        finally:
            ctx.model.set_adapter("default")
            ctx.model.delete_adapter(PARENT)
        problems = []
        for r in results:
            if r["forgetting"] > t.maxForgetting:
                problems.append(f"{r['task']}: loss {r['parentLoss']:.4f} -> {r['newLoss']:.4f} "
                                f"({r['forgetting']:+.1%} > maxForgetting {t.maxForgetting:.1%})")
            if r["newLoss"] >= r["baseLoss"]:
                problems.append(f"{r['task']}: loss {r['newLoss']:.4f} is not below the base model's "
                                f"{r['baseLoss']:.4f}")
        worst = max(r["forgetting"] for r in results)
        uri = ctx.write_report("retention.json", {"parentDigest": parent.digest, "maxForgetting": t.maxForgetting,
                                                  "tasks": results, "problems": problems})
        summary = "; ".join(f"{r['task']}: base {r['baseLoss']:.4f} / parent {r['parentLoss']:.4f} / new "
                            f"{r['newLoss']:.4f} ({r['forgetting']:+.1%})" for r in results)
        if problems:
            return failed(self.name, f"forgets earlier tasks: {'; '.join(problems)}", value=worst,
                          threshold=t.maxForgetting, reportURI=uri)
        return CheckResult(name=self.name, passed=True, value=worst, threshold=t.maxForgetting,
                           message=f"{len(results)} earlier task(s) retained: {summary}", reportURI=uri)
