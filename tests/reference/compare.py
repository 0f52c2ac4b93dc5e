"""How float32 network outputs are compared: with the reference, or between our own paths.

The bounds come from float32 arithmetic, not from one CPU. Two float32 evaluations of the
same network differ by rounding alone: each logit sits at the end of a chain of about 50
rounded reductions (4 layers x ~12: norms, q/k/v/o, attention softmax and sum, dense MLP,
router and experts), each over up to ~100 terms, which different BLAS kernels (OpenBLAS
on AVX2 or AVX-512, MLX's own reference BLAS, PyTorch's) sum in different orders and
blockings. Such a sum is off by ~sqrt(n) u typically and n u at worst (u = 2^-24), and a
random network carries a relative error through each layer with a gain of order one. So
the error scales with the logits, and we bound it relative to their scale (max |ref|):

- every position (every one with decisive routing, >= 99% otherwise):
  max |diff| <= ATOL + RTOL * scale, RTOL = 2^-13 (2048 u);
- the median |diff| <= MEDIAN_RTOL * scale, MEDIAN_RTOL = 2^-16 (256 u);
- the argmax agrees everywhere (exact).

Measured on the tiny test models (AMD EPYC; OpenBLAS preloaded and MLX's own BLAS): the
worst position is 1.5e-5 of the scale (~250 u) and the worst median 1.2e-6 (~20 u), so
the bounds leave 8x and 12x for other CPUs and summation orders. They are still tight
enough to fail on real defects (tests/test_compare_bounds.py): a norm epsilon of 1e-5
instead of 1e-6 already moves the worst position by 7e-4 of the scale.

Top-k expert routing can flip on a near-tie (the spec note): a position then moves a lot
and legitimately, hence ">= 99%" unless routing is decisive (top_k == num_experts).
"""

from __future__ import annotations

import numpy as np

U = 2.0**-24  # float32 unit roundoff
RTOL = 2.0**-13  # per position, relative to the logits' scale (2048 u)
MEDIAN_RTOL = 2.0**-16  # median over every logit, relative to the scale (256 u)
ATOL = 1e-6  # keeps the bound meaningful for an all-zero reference


def bound(ref: np.ndarray, rtol: float = RTOL) -> float:
    """``ATOL + rtol * max|ref|``: the largest float32 rounding difference allowed."""
    return ATOL + rtol * float(np.abs(np.asarray(ref, np.float32)).max())


def logits_report(ref: np.ndarray, ours: np.ndarray) -> dict:
    ref, ours = np.asarray(ref, np.float32), np.asarray(ours, np.float32)
    assert ref.shape == ours.shape, f"shape {ours.shape} != reference {ref.shape}"
    diff = np.abs(ref - ours)
    per_pos = diff.reshape(-1, diff.shape[-1]).max(-1)  # worst vocabulary entry at each position
    scale = float(np.abs(ref).max())
    return {
        "scale": scale,
        "median": float(np.median(diff)),
        "max": float(per_pos.max()),
        "max_rel": float(per_pos.max()) / max(scale, 1e-30),
        "frac_within": float((per_pos <= bound(ref)).mean()),
        "argmax_agree": float((ref.argmax(-1) == ours.argmax(-1)).mean()),
    }


def assert_logits_match(ref: np.ndarray, ours: np.ndarray, exact: bool = False) -> dict:
    """``ours`` equals ``ref`` up to float32 rounding (see the module docstring).

    ``exact``: every position within the bound (routing is decisive); otherwise >= 99%.
    """
    r = logits_report(ref, ours)
    need = 1.0 if exact else 0.99
    assert r["median"] <= ATOL + MEDIAN_RTOL * r["scale"], (
        f"median |diff| {r['median']:.2e} > {ATOL + MEDIAN_RTOL * r['scale']:.2e} "
        f"(2^-16 of the scale {r['scale']:.3g}): {r}")
    assert r["frac_within"] >= need, (
        f"only {r['frac_within']:.1%} of positions within {bound(ref):.2e} "
        f"(2^-13 of the scale {r['scale']:.3g}; needed {need:.0%}): {r}")
    assert r["argmax_agree"] == 1.0, f"argmax differs at {1 - r['argmax_agree']:.1%} of positions: {r}"
    return r


def assert_same_network_output(ours: np.ndarray, want: np.ndarray) -> None:
    """Two of our own paths (chunked or one-shot, batched or alone, fused or plain) give
    the same logits up to float32 rounding: every position within the bound, argmax equal."""
    assert_logits_match(want, ours, exact=True)
