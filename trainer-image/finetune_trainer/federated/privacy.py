"""The privacy accountant: (epsilon, delta) of T rounds of the Gaussian mechanism, by Rényi DP.

Each round releases the sum of the sites' clipped updates plus Gaussian noise of standard deviation
noiseMultiplier × clippingNorm (every site adds its share, N(0, (z·C)² / minSites), so the sum of at least
minSites reports carries at least that). Adding or removing one site's data changes the sum by at most
C (site-level neighbouring; updates are weighted equally when DP is on), so one round is the Gaussian
mechanism with sensitivity C and noise multiplier z, whose Rényi DP of order α is α / (2 z²) (Mironov
2017, Prop. 7); T rounds compose additively. RDP converts to (ε, δ) by the conversion of Canonne, Kamath
and Steinke 2020 (also Balle et al. 2020, Thm. 21; what Google's dp-accounting and Opacus use):

    ε = min_α  T·α/(2z²) + log((α−1)/α) − (log δ + log α)/(α − 1)

No amplification by sampling is claimed (fractionFit < 1 selects sites without replacement, not by
Poisson sampling), so the bound is conservative. Google's dp-accounting (flwr's `dp` extra) pins attrs<24,
which this environment is past; this closed form needs no package and is tested against the exact
(ε, δ) curve of the Gaussian mechanism (Balle & Wang 2018) in tests/federated/test_aggregation.py.
"""

from __future__ import annotations

import math

#: Rényi orders searched (those dp-accounting uses by default, plus a finer grid near 1).
ORDERS = tuple([1.0 + x / 20 for x in range(1, 20)] + [2.0 + x / 4 for x in range(0, 40)]
               + list(range(12, 64)) + [64.0, 80.0, 96.0, 128.0, 256.0, 512.0, 1024.0])


def gaussian_rdp(order: float, noise_multiplier: float, rounds: int) -> float:
    """Rényi DP of order `order` of `rounds` compositions of the Gaussian mechanism."""
    if noise_multiplier <= 0:
        return math.inf
    return rounds * order / (2.0 * noise_multiplier ** 2)


def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """The smallest ε (over ORDERS) such that `rounds` rounds are (ε, δ)-DP; inf without noise; 0 for 0 rounds."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    best = math.inf
    for a in ORDERS:
        eps = gaussian_rdp(a, noise_multiplier, rounds) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, eps)
    return max(0.0, best)


def site_noise_std(clipping_norm: float, noise_multiplier: float, min_sites: int) -> float:
    """Each site's share of the noise: the sum over >= min_sites sites has std >= z·C."""
    return noise_multiplier * clipping_norm / math.sqrt(max(1, min_sites))
