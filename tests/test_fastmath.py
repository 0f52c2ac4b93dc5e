"""fastmath's exp / tanh / GeGLU / softmax / log-sum-exp / attention against MLX's own ops
(float64 NumPy where the ulp count is the claim), values and gradients."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_dgemma import fastmath as F


def _ulps(got: mx.array, ref: np.ndarray) -> float:
    ulp = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    return float((np.abs(np.array(got).astype(np.float64) - ref) / ulp).max())


@pytest.fixture(scope="module")
def x():
    mx.random.seed(0)
    return mx.random.normal((64, 300)) * 6


def test_exp_within_two_ulps_and_zero_for_minus_infinity(x):
    assert _ulps(F.exp(x), np.exp(np.array(x).astype(np.float64))) <= 2
    edge = np.array(F.exp(mx.array([-np.inf, -1000.0, 0.0, 1.0])))
    assert edge[0] == 0 and edge[1] == 0 and edge[2] == 1 and abs(edge[3] - np.e) < 3e-7


def test_tanh_within_eight_ulps_and_saturates(x):
    assert _ulps(F.tanh(x), np.tanh(np.array(x).astype(np.float64))) <= 8
    small = mx.array([1e-6, -3e-5, 0.0])
    assert np.allclose(np.array(F.tanh(small)), np.array(small), rtol=2e-7, atol=0)
    assert np.array(F.tanh(mx.array([-np.inf, 50.0, np.inf]))).tolist() == [-1.0, 1.0, 1.0]


def _grad_close(f_fast, f_ref, x, rtol=1e-5):
    w = mx.random.normal(f_ref(x).shape)
    g1 = mx.grad(lambda x: (f_fast(x) * w).sum())(x)
    g2 = mx.grad(lambda x: (f_ref(x) * w).sum())(x)
    scale = float(mx.abs(g2).max())
    assert float(mx.abs(g1 - g2).max()) <= rtol * scale


@pytest.mark.parametrize("name", ["exp", "tanh", "softmax", "logsumexp", "softcap", "geglu"])
def test_values_and_gradients_match_mlx(x, name):
    y = x[:, :150] / 3  # a second operand for the GeGLU
    fast, ref = {
        "exp": (F.exp, lambda x: mx.exp(mx.clip(x, -80, 80))),
        "tanh": (F.tanh, mx.tanh),
        "softmax": (F.softmax, lambda x: mx.softmax(x, axis=-1, precise=True)),
        "logsumexp": (F.logsumexp, lambda x: mx.logsumexp(x, axis=-1)),
        "softcap": (lambda x: F.softcap(x, 30.0), lambda x: mx.tanh(x / 30.0) * 30.0),
        "geglu": (lambda x: F.geglu(x[:, 150:], y), lambda x: nn.gelu_approx(x[:, 150:]) * y),
    }[name]
    if name == "exp":
        x = mx.clip(x, -80, 80)
    a, b = fast(x), ref(x)
    assert float(mx.abs(a - b).max()) <= 1e-5 * max(1.0, float(mx.abs(b).max()))
    _grad_close(fast, ref, x)


def test_cross_entropy_matches_nn_losses_under_compile(x):
    t = mx.random.randint(0, x.shape[1], (x.shape[0],))
    ref = nn.losses.cross_entropy(x, t)
    got = mx.compile(F.cross_entropy)(x, t)
    assert np.allclose(np.array(got), np.array(ref), rtol=1e-5, atol=1e-5)
    g1 = mx.compile(mx.grad(lambda x: F.cross_entropy(x, t).sum()))(x)
    g2 = mx.grad(lambda x: nn.losses.cross_entropy(x, t).sum())(x)
    assert float(mx.abs(g1 - g2).max()) < 1e-6


@pytest.mark.parametrize("mask", [None, "causal", "keys"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
def test_attention_matches_sdpa_and_its_gradient(mask, heads):
    H, Hkv = heads
    mx.random.seed(1)
    q, k, v = mx.random.normal((2, H, 5, 8)), mx.random.normal((2, Hkv, 9, 8)), mx.random.normal((2, Hkv, 9, 8))
    m = (mx.random.uniform(shape=(2, 1, 1, 9)) > 0.4) | (mx.arange(9) == 8) if mask == "keys" else mask

    def fast(q):
        return F.attention(q, k, v, 0.5, m)

    def ref(q):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.5, mask=m)

    assert float(mx.abs(fast(q) - ref(q)).max()) < 1e-6
    _grad_close(fast, ref, q)


def test_enabled_only_for_float32_on_the_cpu():
    assert F.enabled(mx.zeros((2,), mx.float32)) == (mx.default_device() == mx.cpu)
    assert not F.enabled(mx.zeros((2,), mx.bfloat16))
