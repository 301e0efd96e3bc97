"""GPTQ's parts that need no model: the passes over the calibration data, and rounding with a known Hessian."""

from __future__ import annotations

from unittest import mock

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeops.compress import gptq


@given(st.dictionaries(st.text("abc", min_size=1, max_size=4), st.integers(1, 20000), max_size=12),
       st.integers(1, 1 << 30))
def test_passes_hold_each_activation_once_in_order_within_the_memory_bound(widths: dict[str, int],
                                                                           budget: int) -> None:
    with mock.patch.object(gptq, "HESSIAN_BYTES", budget):
        groups = gptq.passes(widths)
    assert [t for g in groups for t in g] == list(widths)
    for group in groups:
        assert group and (len(group) == 1 or sum(widths[t] ** 2 * 8 for t in group) <= budget)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 12), st.integers(0, 2 ** 32 - 1), st.booleans())
def test_uncorrelated_channels_carry_no_error_so_gptq_rounds_to_nearest(rows: int, cols: int, seed: int,
                                                                      reciprocal: bool) -> None:
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 1, (rows, cols)).astype(np.float32)
    scale = (np.abs(weight).max(axis=0) / 127 + 1e-3).astype(np.float32)
    hessian = np.diag(rng.uniform(0, 5, rows) * (rng.random(rows) > 0.2))  # some channels never driven
    levels = gptq.round_rows(weight, scale, np.zeros(1), -127, 127, gptq.factor(hessian), reciprocal)
    ratio = weight * (np.float32(1) / scale) if reciprocal else weight / scale
    assert np.array_equal(levels, np.clip(np.rint(ratio), -127, 127))


def test_correlated_channels_get_a_smaller_output_error_than_rounding_to_nearest() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (512, 8)) @ rng.normal(0, 1, (8, 64))  # 64 channels driven by 8 factors: correlated
    weight = rng.normal(0, 1, (64, 32)).astype(np.float32)
    scale = (np.abs(weight).max(axis=0) / 7).astype(np.float32)  # 4-bit-like: few levels, big rounding errors
    nearest = np.clip(np.rint(weight / scale), -8, 7)
    rounded = gptq.round_rows(weight, scale, np.zeros(1), -8, 7, gptq.factor(x.T @ x))
    error = {name: np.linalg.norm(x @ weight - x @ (q * scale)) for name, q in
             (("nearest", nearest), ("gptq", rounded))}
    assert error["gptq"] < 0.5 * error["nearest"], error
