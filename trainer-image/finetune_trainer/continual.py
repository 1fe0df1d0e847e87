"""Continual fine-tuning in the trainer: continue a parent adapter, replay earlier data, pull towards the parent.

    parent (spec.initFrom, resolved by the operator to uri + digest)
        -> fetched file by file, the manifest hashed against the digest, every file against the
           manifest (governance.runner.fetch_adapter: safetensors only)   -- before any training
        -> its shape checked against this job's (SHAPE RULE below), its weights loaded
        -> the child's manifest records the lineage (parent digest + datasets, the parent's chain)

SHAPE RULE: a child continues the parent's adapter weights, so the adapter shape must be the
parent's: lora.r, lora.alpha, the adapted modules (lora.targetModules as peft expands them, and
lora.layersToTransform) and DoRA or not must match, or the job stops naming the field. lora and
qlora may follow each other (the adapter is the same; only the frozen base is stored in 4 bits);
lora.dropout is free (it only acts while training).

Replay: each epoch holds every new example plus R replayed ones, R = round(N * f / (1 - f)) for
N new examples and fraction f, so replayed examples are f of the epoch. They are drawn without
replacement from the replay pool (cycling through it when the pool is smaller than R), with an
order that is a pure function of (seed, epoch): a resumed run replays exactly the same examples.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from . import data
from .errors import ConfigError
from .logs import get_logger

log = get_logger("continual")


# ---------------------------------------------------------------- the parent adapter


@dataclass
class Parent:
    uri: str
    digest: str
    source: str
    folder: Path  # a temporary copy of its verified files
    manifest: dict

    @property
    def where(self) -> str:
        return f"spec.initFrom ({self.source})"

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def fetch_parent(resolved) -> Parent:
    """Download and verify the parent (digest of its manifest, every file against the manifest).
    A mismatch is a ConfigError naming spec.initFrom: the job fails before it trains."""
    from .governance.runner import AdapterRefused, fetch_adapter

    where = f"spec.initFrom ({resolved.source})"
    folder = Path(tempfile.mkdtemp(prefix="parent-adapter-"))
    try:
        fetch_adapter(resolved.uri, folder, expected_digest=resolved.digest)
        manifest = json.loads((folder / "manifest.json").read_bytes())
    except AdapterRefused as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise ConfigError(f"{where}: the parent adapter is refused: {exc}") from None
    except ConfigError as exc:  # e.g. no manifest.json at all
        shutil.rmtree(folder, ignore_errors=True)
        raise ConfigError(f"{where}: {exc}") from None
    log.info("parent adapter verified", extra={"event": "parent_verified", "digest": resolved.digest,
                                               "uri": resolved.uri, "source": resolved.source})
    return Parent(resolved.uri, resolved.digest, resolved.source, folder, manifest)


def _parent_config(parent: Parent) -> dict:
    try:
        return json.loads((parent.folder / "adapter_config.json").read_text())
    except (OSError, ValueError):
        raise ConfigError(f"{parent.where}: the parent adapter has no readable adapter_config.json") from None


def shape_problems(parent_cfg: dict, child_cfg) -> list[str]:
    """How the child's peft config differs from the parent's adapter_config.json (SHAPE RULE)."""
    def norm_modules(v) -> Optional[list]:
        return sorted(v) if isinstance(v, (list, set, tuple)) else v

    pairs = (
        ("lora.r", parent_cfg.get("r"), child_cfg.r),
        ("lora.alpha", parent_cfg.get("lora_alpha"), child_cfg.lora_alpha),
        ("lora.targetModules", norm_modules(parent_cfg.get("target_modules")), norm_modules(child_cfg.target_modules)),
        ("lora.layersToTransform", parent_cfg.get("layers_to_transform"), child_cfg.layers_to_transform),
        ("method (dora)", bool(parent_cfg.get("use_dora")), bool(child_cfg.use_dora)),
    )
    return [f"{name}: parent {theirs!r}, this job {ours!r}" for name, theirs, ours in pairs if theirs != ours]


def load_parent_weights(model, parent: Parent) -> None:
    """Check the shape rule, then start the child's adapter from the parent's weights."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    problems = shape_problems(_parent_config(parent), model.peft_config["default"])
    if problems:
        raise ConfigError(f"{parent.where}: the adapter shape differs from the parent's ({'; '.join(problems)}); "
                          "a child continues the parent's weights, so spec.method and spec.lora must match it "
                          "(lora and qlora may follow each other; lora.dropout may differ)")
    weights = load_file(str(parent.folder / "adapter_model.safetensors"))
    device = next(p for p in model.parameters() if p.requires_grad).device
    result = set_peft_model_state_dict(model, {k: v.to(device) for k, v in weights.items()})
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ConfigError(f"{parent.where}: the parent's weights do not fit this model ({unexpected[0]}, ...)")


def lineage_record(parent: Parent) -> dict:
    """The manifest's lineage: the parent and its chain down to the adapter trained from the base model."""
    from finetune_operator.lineage import chain_of

    try:
        chain = chain_of(parent.uri, parent.digest, parent.manifest)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return {"parent": {"uri": parent.uri, "digest": parent.digest, "source": parent.source}, "chain": chain}


class ParentAnchor:
    """L2 penalty strength * sum((w - w_parent)^2) over the adapter's weights (initFrom.l2).

    Cost: one copy of the trainable weights (the adapter's size, not the model's) and one
    elementwise pass over them per optimizer step; no extra forward pass."""

    def __init__(self, params: Sequence, strength: float):
        self.params = list(params)
        self.anchors = [p.detach().clone() for p in self.params]
        self.strength = strength

    def penalty(self):
        import torch

        total = torch.zeros((), device=self.params[0].device)
        for p, a in zip(self.params, self.anchors):
            total = total + (p.float() - a.float()).pow(2).sum()
        return self.strength * total


# ---------------------------------------------------------------- replay


def replay_pool(cfg, tokenizer) -> list:
    """Tokenized train examples of the replay Datasets (in the order of training.replay.datasets)."""
    pool = []
    for ds in cfg.replayData:
        examples = data.tokenize_all(data.read_examples(ds.uri, "train.jsonl", ds.format), tokenizer,
                                     cfg.training.maxSeqLength)
        pool += examples
    if cfg.replayData and not pool:
        raise ConfigError("training.replay: the replay Datasets have no example with a response token within "
                          "maxSeqLength")
    return pool


def replay_count(n_new: int, fraction: float) -> int:
    return max(1, round(n_new * fraction / (1 - fraction))) if n_new and fraction > 0 else 0


class ReplayMix:
    """Which examples each epoch holds: all N new ones (indices 0..N-1) and R drawn from the pool
    (indices N..N+P-1 of the combined list)."""

    def __init__(self, n_new: int, n_pool: int, fraction: float, seed: int):
        self.n_new, self.n_pool, self.seed = n_new, n_pool, seed
        self.per_epoch = replay_count(n_new, fraction) if n_pool else 0

    def replayed(self, epoch: int) -> list[int]:
        """Pool indices of this epoch: a stream through shuffled passes of the pool, epoch after epoch."""
        start = epoch * self.per_epoch
        laps: dict[int, list[int]] = {}
        out = []
        for k in range(start, start + self.per_epoch):
            lap, pos = divmod(k, self.n_pool)
            if lap not in laps:
                laps[lap] = list(range(self.n_pool))
                random.Random(self.seed * 7_919 + 104_729 * lap + 1).shuffle(laps[lap])
            out.append(laps[lap][pos])
        return out

    def epoch_batches(self, lengths: Sequence[int], *, epoch: int, **kw) -> list:
        chosen = list(range(self.n_new)) + [self.n_new + i for i in self.replayed(epoch)]
        batches = data.epoch_batches([lengths[i] for i in chosen], epoch=epoch, **kw)
        return [[[chosen[i] for i in row] for row in batch] for batch in batches]

    def stats(self, names: list[str]) -> dict:
        total = self.n_new + self.per_epoch
        return {"fraction": round(self.per_epoch / total, 4) if total else 0.0, "examplesPerEpoch": self.per_epoch,
                "poolExamples": self.n_pool, "datasets": names}
