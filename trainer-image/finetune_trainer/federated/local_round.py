"""A site's part of a round: the trainer's own loop (train.run_local_round) from the global adapter.

The site's TrainerConfig has a budget of rounds × localSteps × ROUND_ATTEMPTS steps (one checkpoint
fingerprint; room for attempts of rounds that did not complete), with its checkpoints in the site's
scratch folder. The learning-rate schedule spans rounds × localSteps and follows the server's round, not
the site's step count: round r trains at the schedule's steps (r-1)·localSteps ... r·localSteps, so a site
that retried or missed rounds is at the same point of the schedule as every other. Each round
resumes from the newest checkpoint (optimizer state, data position, step), replaces the adapter's
weights with the aggregate the server sent, and trains localSteps more steps. A site that was away
resumes the same way: its checkpoint is its own.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from finetune_operator.api.trainer_config import JobIdentity, TrainerConfig

from .aggregation import Arrays, is_frozen
from .config import ROUND_ATTEMPTS, SiteConfig

#: Local rounds never write a mid-round eval (the received aggregate is evaluated once, at the start).
NEVER = 10**9


def trainer_config(site: SiteConfig) -> TrainerConfig:
    """The site's training run: its step budget has room for retried rounds (an attempt whose round did
    not complete still trained) and is what the learning-rate schedule spans."""
    m = site.model
    training = m.training.model_copy(update={
        "maxSteps": site.rounds * site.localSteps * ROUND_ATTEMPTS, "epochs": None, "evalEverySteps": NEVER,
        "checkpointEverySteps": min(m.training.checkpointEverySteps, site.localSteps)})
    return TrainerConfig(
        job=JobIdentity(namespace=site.job.namespace, name=f"{site.job.name}-{site.site}", uid=site.job.uid),
        baseModel=m.baseModel, data=site.data, method=m.method, lora=m.lora, quantization=m.quantization,
        training=training, outputURI=site.scratchURI, metricsPort=0, progressIntervalSeconds=30)


@dataclass
class LocalRound:
    """What train._run needs from a federated round, and what it hands back."""

    aggregation: str
    local_steps: int
    global_weights: Optional[Arrays] = None
    #: The federation's round (from 1; 0: an evaluation only) and the schedule's length, rounds × localSteps.
    round: int = 0
    schedule_steps: Optional[int] = None
    #: Also evaluate the base model without the adapter (the final evaluation: the gate compares them).
    evaluate_base: bool = False
    base_eval_loss: Optional[float] = None
    # filled by train._run
    start_step: int = 0
    until_step: int = 0
    examples: int = 0
    eval_examples: int = 0
    eval_loss: Optional[float] = None
    losses: list[float] = field(default_factory=list)
    local_weights: Optional[Arrays] = None

    def prepare(self, model) -> None:
        # Live parameter names carry peft's adapter name (…lora_A.default.weight); saved ones do not.
        for name, param in model.named_parameters():
            if is_frozen(name.replace(".default.", "."), self.aggregation):
                param.requires_grad_(False)

    def load_global(self, model, device) -> None:
        if self.global_weights is None:
            return
        import torch
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        expected = get_peft_model_state_dict(model)
        if set(expected) != set(self.global_weights):
            missing = sorted(set(expected) ^ set(self.global_weights))[:3]
            raise ValueError(f"the global adapter does not match this site's adapter layout: {missing}")
        state = {}
        for k, v in self.global_weights.items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise ValueError(f"{k}: global shape {tuple(v.shape)}, this site's {tuple(expected[k].shape)}")
            state[k] = torch.from_numpy(np.ascontiguousarray(v)).to(device=device, dtype=expected[k].dtype)
        set_peft_model_state_dict(model, state)

    def begin(self, step: int, total_steps: int, examples: int, eval_examples: int, scheduler=None) -> None:
        self.start_step = step
        self.until_step = min(total_steps, step + self.local_steps)
        self.examples, self.eval_examples = examples, eval_examples
        if scheduler is not None and self.round > 0:
            seek(scheduler, min((self.round - 1) * self.local_steps, self.schedule_steps or 0))

    def finish(self, model) -> None:
        from peft import get_peft_model_state_dict

        self.local_weights = {k: v.detach().float().cpu().numpy() for k, v in get_peft_model_state_dict(model).items()}

    @property
    def mean_loss(self) -> Optional[float]:
        return float(np.mean(self.losses)) if self.losses else None


def seek(scheduler, position: int) -> None:
    """Put a LambdaLR schedule (what transformers.get_scheduler returns) at `position`: the optimizer's
    learning rates become the schedule's at that step, and stepping goes on from there."""
    scheduler.last_epoch = position
    lrs = [base * fn(position) for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def run_round(site: SiteConfig, global_weights: Optional[Arrays], local_steps: int, round_: int = 0,
              evaluate_base: bool = False) -> LocalRound:
    """Train (local_steps > 0) in the federation's round `round_`, or only evaluate (0) the global adapter
    (and, with evaluate_base, the base model on the same eval split)."""
    from ..errors import EXIT_OK, TrainerError
    from ..train import run_local_round

    fed = LocalRound(aggregation=site.aggregation, local_steps=local_steps, global_weights=global_weights,
                     round=round_ if local_steps else 0, schedule_steps=site.rounds * site.localSteps,
                     evaluate_base=evaluate_base)
    code = run_local_round(trainer_config(site), fed)
    if code != EXIT_OK:
        raise TrainerError(f"site {site.site}: the local round stopped early (exit {code})")
    return fed


def initial_adapter(site: SiteConfig) -> tuple[Arrays, str]:
    """The adapter's seeded initialisation (A random from training.seed, B zero) and its adapter_config.json:
    public (the seed and the base model fix it), so the server starts the federation from it."""
    from .. import model_io
    from ..adapter import save_peft_files
    from ..train import quantization_of, seed_everything

    import torch

    cfg = trainer_config(site)
    seed_everything(cfg.training.seed)
    model_dir = model_io.fetch_model(cfg.baseModel.uri, cfg.baseModel.digest)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    precision = model_io.effective_precision(cfg.training.precision, device)
    base = model_io.load_base_model(model_dir, precision=precision, device=device, quantization=quantization_of(cfg),
                                    gradient_checkpointing=False)
    model = model_io.build_peft_model(base, cfg.method, cfg.lora, cfg.baseModel.uri)
    from peft import get_peft_model_state_dict

    weights = {k: v.detach().float().cpu().numpy() for k, v in get_peft_model_state_dict(model).items()}
    with tempfile.TemporaryDirectory(prefix="adapter-config-") as tmp:
        save_peft_files(model, Path(tmp), cfg.baseModel.uri)
        adapter_config = json.loads((Path(tmp) / "adapter_config.json").read_text())
    return weights, json.dumps(adapter_config, sort_keys=True)
