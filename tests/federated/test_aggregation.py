"""Aggregation of LoRA updates and the privacy accountant: pure functions, no Flower, no torch."""

from __future__ import annotations

import math

import numpy as np
import pytest

from finetune_trainer.federated import aggregation as agg
from finetune_trainer.federated import privacy

PREFIXES = ("m.layers.0.q_proj", "m.layers.1.v_proj")
SCALING = 2.0  # alpha / r
RANK = 3


def _adapter(rng, shared_a=None) -> dict:
    out = {}
    for p in PREFIXES:
        out[p + agg.A_SUFFIX] = shared_a[p] if shared_a else rng.normal(size=(RANK, 6))
        out[p + agg.B_SUFFIX] = rng.normal(size=(5, RANK))
    return out


def _delta_w(ad, p):
    return SCALING * ad[p + agg.B_SUFFIX] @ ad[p + agg.A_SUFFIX]


def test_weighted_mean_matches_a_hand_computation():
    u1, u2 = {"x": np.array([1.0, 2.0])}, {"x": np.array([4.0, 8.0])}
    assert np.allclose(agg.weighted_mean([u1, u2], [1, 3])["x"], [(1 + 12) / 4, (2 + 24) / 4])
    with pytest.raises(ValueError):
        agg.weighted_mean([u1], [0])


def test_fedavg_of_a_and_b_is_inexact_for_lora_and_ffa_lora_is_exact():
    rng = np.random.default_rng(0)
    sites = [_adapter(rng) for _ in range(3)]
    weights = [10, 20, 30]
    err = agg.product_error(sites, weights)
    assert err > 0.3  # mean(B)·mean(A) is far from mean(B·A) when the A differ
    shared = {p: rng.normal(size=(RANK, 6)) for p in PREFIXES}
    ffa = [_adapter(rng, shared) for _ in range(3)]
    assert agg.product_error(ffa, weights) < 1e-12


def test_ffa_lora_round_averages_b_only_and_gives_the_exact_mean_product():
    rng = np.random.default_rng(1)
    shared = {p: rng.normal(size=(RANK, 6)) for p in PREFIXES}
    global_ = _adapter(rng, shared)
    locals_ = [{**global_, **{p + agg.B_SUFFIX: global_[p + agg.B_SUFFIX] + rng.normal(size=(5, RANK))
                              for p in PREFIXES}} for _ in range(3)]
    updates = [agg.site_update(global_, loc, "ffa-lora", SCALING) for loc in locals_]
    assert all(set(u) == {p + agg.B_SUFFIX for p in PREFIXES} for u in updates)  # A never travels
    new = agg.apply_update(global_, agg.weighted_mean(updates, [1, 2, 3]), "ffa-lora", SCALING, RANK)
    for p in PREFIXES:
        exact = sum(w * _delta_w(loc, p) for loc, w in zip(locals_, [1, 2, 3])) / 6
        assert np.allclose(_delta_w(new, p), exact)


def test_svd_refactor_is_exact_when_the_mean_fits_the_rank_and_best_rank_r_otherwise():
    rng = np.random.default_rng(2)
    global_ = _adapter(rng)
    locals_ = [_adapter(rng) for _ in range(2)]  # different A at each site: plain averaging would be wrong
    updates = [agg.site_update(global_, loc, "svd-refactor", SCALING) for loc in locals_]
    assert set(updates[0]) == {p + agg.DELTA_SUFFIX for p in PREFIXES}
    new = agg.apply_update(global_, agg.weighted_mean(updates, [1, 1]), "svd-refactor", SCALING, RANK)
    for p in PREFIXES:
        exact = (_delta_w(locals_[0], p) + _delta_w(locals_[1], p)) / 2  # rank <= 2·RANK
        got = _delta_w(new, p)
        assert new[p + agg.B_SUFFIX].shape == (5, RANK) and new[p + agg.A_SUFFIX].shape == (RANK, 6)
        s = np.linalg.svd(exact, compute_uv=False)
        # Eckart–Young: the error of the best rank-r approximation is the tail of the singular values.
        assert np.isclose(np.linalg.norm(got - exact), np.sqrt(np.sum(s[RANK:] ** 2)))
    one = agg.apply_update(global_, agg.weighted_mean(updates[:1], [1]), "svd-refactor", SCALING, RANK)
    for p in PREFIXES:  # one site's ΔW has rank RANK: refactorised exactly
        assert np.allclose(_delta_w(one, p), _delta_w(locals_[0], p))


def test_fedavg_update_round_trips_to_the_weighted_mean_of_the_local_adapters():
    rng = np.random.default_rng(3)
    global_ = _adapter(rng)
    locals_ = [_adapter(rng) for _ in range(3)]
    updates = [agg.site_update(global_, loc, "fedavg", SCALING) for loc in locals_]
    new = agg.apply_update(global_, agg.weighted_mean(updates, [5, 1, 4]), "fedavg", SCALING, RANK)
    mean = agg.weighted_mean(locals_, [5, 1, 4])
    assert all(np.allclose(new[n], mean[n]) for n in mean)
    names = agg.update_names(global_, "fedavg")
    assert agg.from_list(agg.to_list(updates[0], names), names).keys() == updates[0].keys()


def test_clipping_bounds_the_norm_and_noise_has_the_asked_spread():
    update = {"a": np.full(10000, 3.0), "b": np.full(100, -4.0)}
    clipped, norm = agg.clip_and_noise(update, 1.0, 0.0)
    assert norm == pytest.approx(math.sqrt(9 * 10000 + 16 * 100))
    assert agg.l2_norm(clipped) == pytest.approx(1.0)
    small = {"a": np.full(4, 0.1)}
    assert np.allclose(agg.clip_and_noise(small, 1.0, 0.0)[0]["a"], 0.1)  # inside the ball: untouched
    noisy, _ = agg.clip_and_noise({"a": np.zeros(20000)}, 1.0, 0.5, np.random.default_rng(0))
    assert np.std(noisy["a"]) == pytest.approx(0.5, rel=0.03)


def _exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    """The tight ε of the Gaussian mechanism with sensitivity 1 (Balle & Wang 2018, Thm. 8), by bisection."""
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    d = lambda e: phi(1 / (2 * sigma) - e * sigma) - math.exp(e) * phi(-1 / (2 * sigma) - e * sigma)  # noqa: E731
    lo, hi = 0.0, 500.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if d(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("z, rounds", [(1.0, 1), (1.0, 10), (2.0, 50), (0.7, 5)])
def test_rdp_epsilon_is_a_valid_and_close_upper_bound(z, rounds):
    delta = 1e-5
    eps = privacy.epsilon(z, rounds, delta)
    # T Gaussians of noise z compose to one Gaussian of noise z / sqrt(T) (same sensitivity).
    exact = _exact_gaussian_epsilon(z / math.sqrt(rounds), delta)
    assert exact <= eps <= 1.35 * exact + 0.1


def test_epsilon_edges():
    assert privacy.epsilon(1.0, 0, 1e-5) == 0.0
    assert privacy.epsilon(0.0, 3, 1e-5) == math.inf
    assert privacy.epsilon(1.0, 4, 1e-5) > privacy.epsilon(1.0, 2, 1e-5) > privacy.epsilon(2.0, 2, 1e-5)
    with pytest.raises(ValueError):
        privacy.epsilon(1.0, 1, 0.0)
    assert privacy.site_noise_std(1.0, 1.0, 4) == pytest.approx(0.5)
