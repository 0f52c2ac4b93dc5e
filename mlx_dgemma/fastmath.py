"""exp, tanh, softmax and log-sum-exp from multiplies and adds, for MLX's CPU backend.

MLX 0.32's CPU backend evaluates ``exp``, ``tanh``, ``sigmoid`` and ``erf`` at 12-18 ns an
element (one element at a time), against 0.2 ns for an add. A small training step spends
most of its time there, not in its matmuls: the GeGLU's tanh on every MLP and expert
activation, the soft-capped logits, every attention score's exp and the cross-entropy's
log-sum-exp (benchmarks/sudoku/throughput.md). Written as polynomials of plain
elementwise ops, which ``mx.compile`` fuses into one loop, the same functions run 4-10x
faster (as plain ops, eagerly: 2-4x), within a few float32 ulps of the libm values:

- ``exp``: Cody-Waite range reduction (``x = n ln2 + r``), a degree-7 Taylor polynomial of
  ``e^r`` on ``|r| <= ln2 / 2`` and ``2^n`` put into the exponent bits; inputs below -88
  give 0 (``-inf`` too: a hidden attention key weighs exactly nothing).
- ``tanh``: Eigen's rational approximation (``generic_fast_tanh_float``): odd degree-13
  over even degree-6, clamped where float32 tanh is +-1.

Each has its derivative written from its output (``custom_function``), as MLX's own ops
do, so the backward pass costs a multiply, not the polynomial's chain rule. ``enabled``
says whether a caller should use them: float32 on the CPU; on GPUs MLX's own kernels are
fast and are used unchanged.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693145751953125, 1.428606765330187e-06  # ln 2 = HI + LO, HI exact in few bits
_EXP_C = [1 / 5040, 1 / 720, 1 / 120, 1 / 24, 1 / 6, 1 / 2, 1.0, 1.0]  # e^r, highest power first

_TANH_CLAMP = 7.90531110763549805  # tanh(x) rounds to +-1 in float32 beyond this
_TANH_P = [-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
           1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03]
_TANH_Q = [1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03]


def enabled(x: mx.array) -> bool:
    """Whether ``x`` should go through these functions: float32 on the CPU backend."""
    return x.dtype == mx.float32 and mx.default_device() == mx.cpu


def _horner(coefficients, x: mx.array) -> mx.array:
    p = coefficients[0]
    for c in coefficients[1:]:
        p = p * x + c
    return p


def _exp(x: mx.array) -> mx.array:
    x = mx.clip(x, -88.0, 88.0)  # e^88 is finite; at -88, n = -127 below makes 2^n exactly 0
    n = mx.round(x * _LOG2E)
    r = (x - n * _LN2_HI) - n * _LN2_LO
    two_n = mx.left_shift(n.astype(mx.int32) + 127, 23).view(mx.float32)
    return _horner(_EXP_C, r) * two_n


def _tanh(x: mx.array) -> mx.array:
    c = mx.clip(x, -_TANH_CLAMP, _TANH_CLAMP)
    c2 = c * c
    return c * _horner(_TANH_P, c2) / _horner(_TANH_Q, c2)  # near 0: x * (1 - 1e-8)


@mx.custom_function
def exp(x: mx.array) -> mx.array:
    return _exp(x)


@exp.vjp
def _exp_vjp(primals, cotangent, output):
    return cotangent * output


@mx.custom_function
def tanh(x: mx.array) -> mx.array:
    return _tanh(x)


@tanh.vjp
def _tanh_vjp(primals, cotangent, output):
    return cotangent * (1 - output * output)


# sqrt(2 / pi); nn.gelu_approx's cubic term. The cube is two multiplies, not ``**3``: MLX's
# CPU power calls libm's powf per element, ~10% of a training step (perf) before this.
_GELU_C, _GELU_A = 0.7978845608028654, 0.044715


@mx.custom_function
def geglu(gate: mx.array, x: mx.array) -> mx.array:
    """``nn.gelu_approx(gate) * x``, the GeGLU of the MLPs and experts."""
    return 0.5 * gate * (1 + _tanh(_GELU_C * (gate + _GELU_A * (gate * gate * gate)))) * x


@geglu.vjp
def _geglu_vjp(primals, cotangent, output):
    gate, x = primals
    t = _tanh(_GELU_C * (gate + _GELU_A * (gate * gate * gate)))
    gelu = 0.5 * gate * (1 + t)
    d_gelu = 0.5 * (1 + t) + 0.5 * gate * (1 - t * t) * _GELU_C * (1 + 3 * _GELU_A * gate * gate)
    return cotangent * x * d_gelu, cotangent * gelu


def softcap(x: mx.array, cap: float) -> mx.array:
    """``tanh(x / cap) * cap``, the logits' soft-cap."""
    return tanh(x / cap) * cap


@mx.custom_function
def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis (rows all ``-inf`` give NaN, as ``mx.softmax``)."""
    e = _exp(x - mx.stop_gradient(x.max(-1, keepdims=True)))
    return e / e.sum(-1, keepdims=True)


@softmax.vjp
def _softmax_vjp(primals, cotangent, output):
    return output * (cotangent - (cotangent * output).sum(-1, keepdims=True))


@mx.custom_function
def logsumexp(x: mx.array) -> mx.array:
    """log-sum-exp over the last axis (no kept dimension)."""
    m = mx.stop_gradient(x.max(-1, keepdims=True))
    return (mx.log(_exp(x - m).sum(-1, keepdims=True)) + m).squeeze(-1)


@logsumexp.vjp
def _logsumexp_vjp(primals, cotangent, output):
    x = primals[0] if isinstance(primals, (list, tuple)) else primals
    return cotangent[..., None] * _exp(x - output[..., None])


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """``nn.losses.cross_entropy(logits, targets)`` (integer targets, no reduction)."""
    if not enabled(logits):
        import mlx.nn as nn

        return nn.losses.cross_entropy(logits, targets)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    return logsumexp(logits) - picked


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None) -> mx.array:
    """``mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)`` with the
    softmax above: q [B, H, L, D], k/v [B, Hkv, S, D]; ``mask`` None, ``"causal"`` (the
    queries are the last L keys) or a boolean mask broadcastable to [B, H, L, S]."""
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    qg = q.reshape(B, Hkv, (H // Hkv) * L, D) if H != Hkv else q  # query heads grouped by KV head
    s = (qg * scale) @ k.swapaxes(-1, -2)
    if H != Hkv:
        s = s.reshape(B, Hkv, H // Hkv, L, S)
    bias = _mask_bias(mask, L, S)
    if bias is not None:
        if H != Hkv and bias.ndim == 4:  # [b, h, L, S] -> [b, 1, h, L, S] beside the groups
            bias = bias[:, :, None] if bias.shape[1] == 1 else bias.reshape(bias.shape[0], Hkv, H // Hkv, L, S)
        s = s + bias
    p = softmax(s)
    if H != Hkv:
        p = p.reshape(B, Hkv, (H // Hkv) * L, S)
    return (p @ v).reshape(B, H, L, v.shape[-1])


def _mask_bias(mask, L: int, S: int) -> Optional[mx.array]:
    """0 where a key is visible, -inf where it is hidden (an add: ``where`` on a full
    score tensor costs as much as the exp on this backend)."""
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"mask must be None, 'causal' or an array, got {mask!r}")
        mask = mx.arange(S)[None] <= mx.arange(S - L, S)[:, None]
    if mask.dtype == mx.bool_:
        return mx.where(mask, mx.array(0.0, mx.float32), mx.array(-mx.inf, mx.float32))
    return mask
