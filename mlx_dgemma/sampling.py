"""One denoising step's sampling, in plain MLX ops: the reference for the fused kernels.

For every canvas position, from the decoder's logits and the step's temperature:
the temperature-scaled logits' log-sum-exp, the entropy of their softmax, their argmax,
and a sample drawn by Gumbel-max with noise from ``rng`` (so the fused kernels, which
hash the same counters, draw the same sample).
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx

from . import rng


class StepSample(NamedTuple):
    sampled: mx.array  # [B, L] int32, a draw from softmax(logits / t)
    argmax: mx.array  # [B, L] int32
    entropy: mx.array  # [B, L] float32, entropy of softmax(logits / t)
    lse: mx.array  # [B, L] float32, logsumexp(logits / t)


def temperature(step: int, max_steps: int, t_min: float, t_max: float) -> float:
    """Linear schedule; ``step`` counts down from ``max_steps`` to 1 (as in the reference)."""
    return t_min + (t_max - t_min) * (step / max_steps)


def sample_step_mlx(logits: mx.array, temp: float, keys: mx.array) -> StepSample:
    """logits [B, L, V] float32; keys [B, L] uint32 from ``rng.position_keys(.., rng.SAMPLE, ..)``."""
    x = logits.astype(mx.float32) / temp
    # Sums relative to the max, as the fused kernels keep them: ``lse - sum(p * x)`` would
    # cancel catastrophically on nearly one-hot rows (x reaches 30 / t_min = 75).
    m = mx.max(x, axis=-1, keepdims=True)
    xs = x - m
    e = mx.exp(xs)
    s = e.sum(-1)
    log_s = mx.log(s)
    lse = m[..., 0] + log_s
    entropy = log_s - mx.where(e > 0, e * xs, 0.0).sum(-1) / s
    argmax = mx.argmax(x, axis=-1).astype(mx.int32)
    sampled = mx.argmax(x + rng.gumbel(keys, x.shape[-1]), axis=-1).astype(mx.int32)
    return StepSample(sampled, argmax, entropy, lse)


def probabilities(logits: mx.array, temp: float, lse: mx.array) -> mx.array:
    """softmax(logits / t) from an already known log-sum-exp (no second reduction)."""
    return mx.exp(logits.astype(mx.float32) / temp - lse[..., None])
