"""A site's learning-rate schedule follows the federation's round, not the site's step count."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from transformers import get_scheduler  # noqa: E402

from finetune_trainer.federated.local_round import LocalRound, seek  # noqa: E402

LR, LOCAL, ROUNDS = 1e-3, 10, 3


def _cosine() -> torch.optim.lr_scheduler.LambdaLR:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=LR)
    return get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=ROUNDS * LOCAL)


def _lr(s) -> float:
    return s.optimizer.param_groups[0]["lr"]


def _cosine_at(step: int) -> float:
    return LR * 0.5 * (1 + math.cos(math.pi * step / (ROUNDS * LOCAL)))


def test_a_round_starts_where_the_schedule_says_whatever_steps_the_site_took_before():
    # A site that retried two attempts has trained 50 steps when round 3 begins; its schedule is still
    # at round 3's start (step 20 of 30), and ends at 0 with the round.
    scheduler = _cosine()
    for _ in range(50):
        scheduler.optimizer.step()
        scheduler.step()
    # Stepped on past its end, a cosine schedule rises again (0.75 of the peak at step 50 of 30): why the
    # round, not the step count, places it.
    assert _lr(scheduler) == pytest.approx(0.75 * LR)
    fed = LocalRound(aggregation="fedavg", local_steps=LOCAL, round=3, schedule_steps=ROUNDS * LOCAL)
    fed.begin(50, ROUNDS * LOCAL * 3, examples=10, eval_examples=2, scheduler=scheduler)
    assert _lr(scheduler) == pytest.approx(_cosine_at(20)) and scheduler.get_last_lr()[0] == pytest.approx(_cosine_at(20))
    for step in range(21, 31):
        scheduler.optimizer.step()
        scheduler.step()
        assert _lr(scheduler) == pytest.approx(_cosine_at(step), abs=1e-12)
    assert _lr(scheduler) == pytest.approx(0.0, abs=1e-12)
    assert fed.until_step == 60


def test_round_one_starts_at_the_top_and_an_evaluation_leaves_the_schedule_alone():
    scheduler = _cosine()
    seek(scheduler, 17)
    LocalRound(aggregation="fedavg", local_steps=LOCAL, round=1, schedule_steps=ROUNDS * LOCAL).begin(
        0, 90, 10, 2, scheduler)
    assert _lr(scheduler) == pytest.approx(LR)
    seek(scheduler, 17)
    LocalRound(aggregation="fedavg", local_steps=0, round=0, schedule_steps=ROUNDS * LOCAL).begin(
        17, 90, 10, 2, scheduler)
    assert _lr(scheduler) == pytest.approx(_cosine_at(17))
