"""Prototype: the drafter's vocabulary work through NumPy, for MLX's CPU backend.

Not used by the package. ``run.py --sampler numpy`` measures what a CPU "kernel" for
``kernels.sample_step`` would give: MLX's CPU backend evaluates exp/log/tanh one element
at a time (~10-15 ns each), NumPy with SIMD (~1 ns), and the drafter makes several
passes over [B, L, V] per step. Same semantics as ``sampling.sample_step_mlx`` and the
same random numbers (``rng``'s NumPy twins), so the sampled and argmax tokens agree;
entropy and log-sum-exp agree to float32 rounding (tests/test_model_speedups.py).
"""

from __future__ import annotations

from typing import Union

import mlx.core as mx
import numpy as np

from mlx_dgemma import rng
from mlx_dgemma.sampling import StepSample


def sample_step_numpy(logits: mx.array, temp: Union[float, mx.array], keys: mx.array) -> StepSample:
    """``sample_step_mlx`` with every [B, L, V] pass in NumPy (evaluates ``logits``)."""
    x = np.asarray(logits.astype(mx.float32)) / np.float32(float(temp))
    m = x.max(-1, keepdims=True)
    xs = x - m
    e = np.exp(xs)
    s = e.sum(-1)
    log_s = np.log(s)
    lse = m[..., 0] + log_s
    ex = np.multiply(e, xs, out=xs)  # e * xs (0 where e underflowed, as e == 0 there)
    entropy = log_s - ex.sum(-1) / s
    argmax = x.argmax(-1).astype(np.int32)
    g = rng.gumbel(np.asarray(keys).astype(np.uint32), x.shape[-1])
    g += x
    sampled = g.argmax(-1).astype(np.int32)
    return StepSample(mx.array(sampled), mx.array(argmax), mx.array(entropy.astype(np.float32)),
                      mx.array(lse.astype(np.float32)))


def soft_embeddings_numpy(model, logits: mx.array, temp, lse: mx.array, top_k=None, tail="mean") -> mx.array:
    """``kernels.soft_embeddings`` (exact) with the probabilities computed in NumPy."""
    if top_k:
        from mlx_dgemma.kernels import soft_embeddings

        return soft_embeddings(model, logits, temp, lse, top_k, tail)
    x = np.asarray(logits.astype(mx.float32)) / np.float32(float(temp))
    x -= np.asarray(lse)[..., None]
    np.exp(x, out=x)
    return model.soft_embeddings(mx.array(x))
