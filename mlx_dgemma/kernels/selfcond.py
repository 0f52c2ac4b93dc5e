"""Self-conditioning signals from a step's logits, without a second full softmax.

Exact: ``probs = exp(logits / t - lse)`` with the log-sum-exp the sampling step already
computed, then ``model.soft_embeddings(probs)`` (``probs @ embedding * scale``; quantized
tables go through ``mx.quantized_matmul``). That reads the whole embedding table (V x H)
every step.

Top-k (opt-in, ``sc_top_k`` / ``--sc-top-k K``): per position only the K most likely
tokens' embedding rows are gathered (``mx.argpartition`` then ``take``), weighted by their
exact probabilities. The probabilities are NOT renormalised: the decoder's
self-conditioning block RMS-normalises the signal first (``pre_norm``), so a common
positive factor changes nothing, and leaving the weights as they are keeps the top-k
part equal, term for term, to the corresponding part of the exact sum. The missing tail
mass ``1 - sum(top-k p)`` is given to the mean embedding row (``tail="mean"``, the
default: right in expectation when the tail is spread evenly, and a large win on flat
distributions) or dropped (``tail="drop"``). Measured error and speed: mlx_dgemma/kernels/README.md.
"""

from __future__ import annotations

import weakref
from typing import Dict, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from ..sampling import probabilities

TAILS = ("mean", "drop")
# id(model) -> (weak reference to the model, id of its embedding table, scaled mean row)
_MEAN_ROWS: Dict[int, Tuple[weakref.ref, int, mx.array]] = {}


def _mean_row(model) -> mx.array:
    """The mean embedding row times the embedding scale, [H] in the table's dtype (cached)."""
    emb = model.decoder.embed_tokens
    key = id(model)
    hit = _MEAN_ROWS.get(key)
    if hit is not None and hit[0]() is model and hit[1] == id(emb.weight):
        return hit[2]
    V = emb.weight.shape[0]
    row = model.soft_embeddings(mx.full((1, V), 1.0 / V, dtype=mx.float32))[0]
    mx.eval(row)
    _MEAN_ROWS[key] = (weakref.ref(model), id(emb.weight), row)
    return row


def topk_soft_embeddings(
    model, logits: mx.array, temp: Union[float, mx.array], lse: mx.array, k: int, tail: str = "mean"
) -> mx.array:
    """Approximate ``model.soft_embeddings(softmax(logits / temp))`` from the top ``k`` tokens.

    logits [B, L, V] (raw, before temperature), lse [B, L] = logsumexp(logits / temp).
    Returns [B, L, H] in the embedding table's dtype, like ``model.soft_embeddings``.
    """
    if tail not in TAILS:
        raise ValueError(f"tail={tail!r}: expected one of {', '.join(TAILS)}")
    V = logits.shape[-1]
    if not 0 < k < V:
        if k >= V:
            return model.soft_embeddings(probabilities(logits, temp, lse))
        raise ValueError(f"sc_top_k={k}: expected a positive number of tokens")
    # temperature > 0 keeps the order: partition the raw logits (no division pass).
    idx = mx.argpartition(logits, kth=V - k, axis=-1)[..., V - k:]  # [B, L, k]
    x = mx.take_along_axis(logits, idx, axis=-1).astype(mx.float32) / temp
    p = mx.exp(x - lse[..., None])  # exact probabilities of the kept tokens
    rows = model.decoder.embed_tokens(idx)  # [B, L, k, H]; dequantized for quantized tables
    dtype = rows.dtype
    out = (p.astype(dtype)[..., None, :] @ rows)[..., 0, :]
    out = out * mx.array(model.embed_scale, dtype=dtype)
    if tail == "mean":
        rest = mx.maximum(1.0 - p.sum(-1), 0.0).astype(dtype)
        out = out + rest[..., None] * _mean_row(model)
    return out


def _table_dtype(model) -> mx.Dtype:
    emb = model.decoder.embed_tokens
    return emb.scales.dtype if isinstance(emb, nn.QuantizedEmbedding) else emb.weight.dtype


def _probs_fn(dtype: mx.Dtype):
    """exp(logits / t - lse) cast to the table's dtype, compiled into one elementwise pass
    (plain MLX runs divide, subtract, exp and cast as four passes over [B, L, V])."""
    if dtype not in _PROBS:
        def probs(logits: mx.array, t: mx.array, lse: mx.array) -> mx.array:
            return probabilities(logits, t, lse).astype(dtype)

        _PROBS[dtype] = mx.compile(probs)
    return _PROBS[dtype]


_PROBS: Dict[mx.Dtype, object] = {}


def soft_embeddings(
    model, logits: mx.array, temp: Union[float, mx.array], lse: mx.array,
    top_k: Optional[int] = None, tail: str = "mean", probs: Optional[mx.array] = None,
) -> mx.array:
    """The self-conditioning signal for the next step: exact, or top-k when ``top_k``.

    Exact is ``model.soft_embeddings(probabilities(logits, temp, lse))``, with the
    probabilities computed in one compiled pass (temperature passed as an array so a new
    temperature does not recompile), or taken from ``probs`` when the sampling pass
    already wrote them (the CPU kernel: float32 softmax(logits / temp)).
    """
    if top_k:
        return topk_soft_embeddings(model, logits, temp, lse, top_k, tail)
    if probs is not None:
        return model.soft_embeddings(probs.astype(_table_dtype(model)))
    t = mx.array(temp, dtype=mx.float32)
    return model.soft_embeddings(_probs_fn(_table_dtype(model))(logits, t, lse))
