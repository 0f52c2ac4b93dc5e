"""Optimised and batched decoder paths against the plain single-prompt path.

The models here are MLX-initialised tiny random models (no torch needed): these tests
compare our own paths with each other; tests/test_model.py compares with the reference.
"""

import mlx.core as mx
import numpy as np
import pytest

from mlx_dgemma import Model, ModelArgs
from mlx_dgemma.model import decoder_prefixes

TINY = dict(
    vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, full_head_dim=32,
    full_kv_heads=1, sliding_window=8, num_experts=8, top_k_experts=2,
    moe_intermediate_size=32, canvas_length=16,
    layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention"],
)


def tiny_model(seed: int = 0, **overrides) -> Model:
    mx.random.seed(seed)
    model = Model(ModelArgs(**{**TINY, **overrides}))
    # random norms / scalars so that nothing is trivially 1
    leaves = {}
    for k, v in __import__("mlx.utils", fromlist=["tree_flatten"]).tree_flatten(model.parameters()):
        if "norm" in k or k.endswith("scale") or "layer_scalar" in k:
            leaves[k] = 1.0 + 0.2 * mx.random.normal(v.shape)
    model.load_weights(list(leaves.items()), strict=False)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def close(a, b, tol=1e-5):
    """Within ``tol`` relative to the logits' scale. Batch size changes OpenBLAS's
    blocking, which moves float32 logits by ~1e-6 relative (exactly 0 with MLX's own BLAS)."""
    err = np.abs(a - b).max() / max(1.0, np.abs(b).max())
    assert err <= tol, f"relative max |diff| {err:.2e} > {tol:.0e}"
    assert (a.argmax(-1) == b.argmax(-1)).all(), "argmax differs"


def encoded(model, tokens):
    cache = model.make_cache()
    model.encode(mx.array(tokens)[None], cache)
    return cache


def test_ragged_batch_equals_each_row_alone(model):
    rng = np.random.default_rng(0)
    # 5 tokens: sliding caches not yet full; 13: past the window (sliding caches hold 7)
    prompts = [rng.integers(0, 160, 5), rng.integers(0, 160, 13)]
    canvas = mx.array(rng.integers(0, 160, (2, 16)))
    caches = [encoded(model, p) for p in prompts]
    assert caches[0].offset != caches[1].offset
    batched = np.array(model.denoise(canvas, caches))
    for b in range(2):
        solo = np.array(model.denoise(canvas[b : b + 1], caches[b]))[0]
        close(batched[b], solo)
    # and with self-conditioning from different previous logits per row
    sc = mx.array(rng.normal(size=(2, 16, 160)).astype(np.float32) * 3)
    batched = np.array(model.denoise(canvas, caches, sc))
    for b in range(2):
        solo = np.array(model.denoise(canvas[b : b + 1], caches[b], sc[b : b + 1]))[0]
        close(batched[b], solo)
    # the rows really differ: a row's prompt matters
    other = np.array(model.denoise(canvas[:1], caches[1]))[0]
    assert np.abs(other - np.array(model.denoise(canvas[:1], caches[0]))[0]).max() > 1e-3


def test_ragged_batch_with_an_empty_prompt_and_equal_lengths(model):
    rng = np.random.default_rng(1)
    canvas = mx.array(rng.integers(0, 160, (3, 16)))
    p = rng.integers(0, 160, 9)
    caches = [model.make_cache(), encoded(model, p), encoded(model, p[:4])]
    batched = np.array(model.denoise(canvas, caches))
    for b in range(3):
        solo = np.array(model.denoise(canvas[b : b + 1], caches[b]))[0]
        close(batched[b], solo)
    # equal lengths: no mask, a plain int offset, same as the shared-cache batch
    same = [encoded(model, p), encoded(model, p)]
    prefixes, offset = decoder_prefixes(same, 2, 16)
    assert offset == 9 and all(m is None for _, _, m in prefixes)
    shared = np.array(model.denoise(canvas[:2], encoded(model, p)))
    close(np.array(model.denoise(canvas[:2], same)), shared)


def test_ragged_batch_rejects_mismatched_rows(model):
    c = encoded(model, [1, 2, 3])
    with pytest.raises(ValueError, match="one per row"):
        model.denoise(mx.zeros((3, 16), mx.int32), [c, c])


def test_one_prompt_several_canvases(model):
    """A batch-1 cache serves every canvas row (several seeds of one prompt)."""
    rng = np.random.default_rng(2)
    cache = encoded(model, rng.integers(0, 160, 11))
    canvas = mx.array(rng.integers(0, 160, (3, 16)))
    batched = np.array(model.denoise(canvas, cache))
    for b in range(3):
        close(batched[b], np.array(model.denoise(canvas[b : b + 1], cache))[0])
