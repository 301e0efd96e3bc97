"""The privacy budget DP-FedAvg spends: Rényi DP of the subsampled Gaussian mechanism (Mironov, Talwar and
Zhang 2019, integer orders), composed over rounds and converted to (ε, δ) as Opacus and TF Privacy do
(Balle et al. 2020). A device's participation in a round is the unit protected (user-level privacy)."""

from __future__ import annotations

import math

ORDERS = tuple(range(2, 257))


def _log_add(a: float, b: float) -> float:
    high, low = max(a, b), min(a, b)
    return high if low == -math.inf else high + math.log1p(math.exp(low - high))


def rdp_subsampled_gaussian(q: float, sigma: float, order: int) -> float:
    """The Rényi divergence of order ``order`` of one round that asks each device with probability ``q`` and
    adds Gaussian noise of ``sigma`` times the clipping norm."""
    if sigma <= 0:
        return math.inf
    if q >= 1.0:
        return order / (2 * sigma ** 2)
    if q <= 0:
        return 0.0
    log_a = -math.inf
    for k in range(order + 1):
        term = (math.lgamma(order + 1) - math.lgamma(k + 1) - math.lgamma(order - k + 1)
                + k * math.log(q) + (order - k) * math.log1p(-q) + (k * k - k) / (2 * sigma ** 2))
        log_a = _log_add(log_a, term)
    return log_a / (order - 1)


def epsilon(q: float, sigma: float, rounds: int, delta: float) -> float:
    """The ε of (ε, δ)-DP after ``rounds`` rounds (inf without noise)."""
    if rounds <= 0:
        return 0.0
    if sigma <= 0:
        return math.inf
    best = math.inf
    for order in ORDERS:
        rdp = rounds * rdp_subsampled_gaussian(q, sigma, order)
        eps = rdp + math.log1p(-1 / order) - (math.log(delta) + math.log(order)) / (order - 1)
        best = min(best, eps)
    return max(best, 0.0)
