"""How MLX logits are compared with the reference's (see the spec note on MoE near-ties)."""

from __future__ import annotations

import numpy as np

TOL = 1e-4


def logits_report(ref: np.ndarray, ours: np.ndarray) -> dict:
    ref, ours = np.asarray(ref, np.float32), np.asarray(ours, np.float32)
    assert ref.shape == ours.shape, f"shape {ours.shape} != reference {ref.shape}"
    per_pos = np.abs(ref - ours).max(-1)  # worst vocabulary entry at each position
    return {
        "median": float(np.median(np.abs(ref - ours))),
        "max": float(per_pos.max()),
        "frac_within": float((per_pos <= TOL).mean()),
        "argmax_agree": float((ref.argmax(-1) == ours.argmax(-1)).mean()),
    }


def assert_logits_match(ref: np.ndarray, ours: np.ndarray, tol: float = TOL, exact: bool = False) -> dict:
    """Median within ``tol``, >= 99% of positions within ``tol`` (all if ``exact``), argmax everywhere."""
    r = logits_report(ref, ours)
    per_pos = np.abs(np.asarray(ref, np.float32) - np.asarray(ours, np.float32)).max(-1)
    within = float((per_pos <= tol).mean())
    assert r["median"] <= tol, f"median |diff| {r['median']:.2e} > {tol:.0e}: {r}"
    assert within >= (1.0 if exact else 0.99), f"only {within:.1%} of positions within {tol:.0e}: {r}"
    assert r["argmax_agree"] == 1.0, f"argmax differs at {1 - r['argmax_agree']:.1%} of positions: {r}"
    return r
