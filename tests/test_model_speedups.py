"""Optimised and batched decoder paths against the plain single-prompt path.

The models here are MLX-initialised tiny random models (no torch needed): these tests
compare our own paths with each other; tests/test_model.py compares with the reference.
"""

import mlx.core as mx
import numpy as np
import pytest

from mlx_dgemma import Model, ModelArgs, backend
from mlx_dgemma.kernels import cpu as cpu_kernels
from mlx_dgemma.model import ImageMask, decoder_prefixes
from tests.fixtures import tiny
from tests.reference.compare import assert_same_network_output

needs_cpu_attention = pytest.mark.skipif(
    not cpu_kernels.attention_available(),
    reason="the C attention needs the built CPU kernel and OpenBLAS (pip install; apt-get install libopenblas0-pthread)")


def tiny_model(seed: int = 0) -> Model:
    """The reference harness's tiny model (tests/fixtures/tiny.py), loaded from its
    config.json as a model folder's is, with MLX's random weights."""
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(tiny.reference_config(canvas_length=16)))
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


def close(a, b):
    """The same output up to float32 rounding, relative to its scale (argmax equal): batch
    size changes OpenBLAS's blocking, so the batched and solo paths round differently.
    The bound and its reasoning: tests/reference/compare.py."""
    assert_same_network_output(a, b)


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


# ---------------------------------------------------------------------------------------
# speed switches: every optimised path against the plain one


def switched(model, prefill_chunk=None, **settings):
    """Run with the given backend paths (``backend.configure``) and prefill chunk,
    restoring the model's afterwards."""
    class Ctx:
        def __enter__(self):
            self.old, self.chunk = backend.settings(model), model.prefill_chunk
            backend.configure(model, compile=False)
            backend.configure(model, **settings)
            if prefill_chunk is not None:
                model.prefill_chunk = prefill_chunk

        def __exit__(self, *a):
            backend.configure(model, compile=False)
            backend.configure(model, **self.old)
            model.prefill_chunk = self.chunk
    return Ctx()


PLAIN = dict(compile=False, experts="gather", host_softcap=False, attention=False, dequantize=False, fastmath=False)
VARIANTS = [
    dict(PLAIN, compile=True),
    pytest.param(dict(PLAIN, attention=True), marks=needs_cpu_attention),
    dict(PLAIN, experts="grouped"),
    dict(PLAIN, experts="dense"),
    dict(PLAIN, experts="dense", compile=True),
    dict(PLAIN, experts="blocked"),
    dict(PLAIN, experts="blocked", compile=True),
    pytest.param(dict(PLAIN, experts="cpu"), marks=needs_cpu_attention),
    pytest.param(dict(PLAIN, experts="cpu", attention=True, host_softcap=True), marks=needs_cpu_attention),
    dict(PLAIN, host_softcap=True),
    dict(PLAIN, experts="grouped", host_softcap=True),
    dict(PLAIN, fastmath=True),
    dict(PLAIN, fastmath=True, experts="dense", compile=True),
    dict(PLAIN, fastmath=True, experts="blocked", compile=True),
    pytest.param(dict(PLAIN, fastmath=True, experts="cpu", attention=True, host_softcap=True),
                 marks=needs_cpu_attention),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "+".join(k for k, x in v.items() if x and x != "gather") or "plain")
def test_speed_switches_keep_the_logits(model, variant):
    rng = np.random.default_rng(3)
    caches = [encoded(model, rng.integers(0, 160, 12)), encoded(model, rng.integers(0, 160, 3))]
    canvas = mx.array(rng.integers(0, 160, (2, 16)))
    sc = model.soft_embeddings(mx.softmax(mx.array(rng.normal(size=(2, 16, 160)).astype(np.float32)), -1))
    cases = [(canvas[:1], caches[0], None), (canvas, caches[0], sc), (canvas, caches, sc)]
    with switched(model, **PLAIN):
        plain = [np.array(model.denoise(c, k, self_conditioning_embeddings=s)) for c, k, s in cases]
        plain_h = np.array(model.hidden(canvas[:1], caches[1]))
    with switched(model, **variant):
        for (c, k, s), want in zip(cases, plain):
            close(np.array(model.denoise(c, k, self_conditioning_embeddings=s)), want)
        close(np.array(model.hidden(canvas[:1], caches[1])), plain_h)


@pytest.mark.parametrize("variant", [
    pytest.param(dict(attention=True), marks=needs_cpu_attention),
    dict(experts="grouped"),
    pytest.param(dict(experts="cpu"), marks=needs_cpu_attention),
    dict(fastmath=True),
], ids=lambda v: "+".join(f"{k}={x}" for k, x in v.items()))
def test_encoder_speed_switches_keep_the_cache(model, variant):
    """Prefill in chunks past the sliding window (8), then a committed block: the cache
    and the next logits equal the plain path's (causal and windowed masks, offsets)."""
    rng = np.random.default_rng(8)
    prompt = mx.array(rng.integers(0, 160, (1, 37)))
    block = mx.array(rng.integers(0, 160, (1, 16)))
    canvas = mx.array(rng.integers(0, 160, (1, 16)))
    results = []
    for settings in (dict(PLAIN, prefill_chunk=16), dict(PLAIN, prefill_chunk=16, **variant)):
        with switched(model, **settings):
            cache = model.make_cache()
            model.encode(prompt, cache)
            model.encode(block, cache)
            results.append(([np.array(c.state[0]) for c in cache] + [np.array(c.state[1]) for c in cache],
                            np.array(model.denoise(canvas, cache))))
    (want_kv, want), (got_kv, got) = results
    for a, b in zip(got_kv, want_kv):
        close(a, b)
    close(got, want)


@needs_cpu_attention
def test_cpu_experts_match_switch_glu_and_fall_back_when_quantized():
    import mlx.nn as nn

    model = tiny_model(5)
    experts = model.layers[0].experts
    x = mx.random.normal((2, 9, 64))
    idx = mx.argpartition(-mx.random.normal((2, 9, 8)), kth=1, axis=-1)[..., :2]
    w = mx.softmax(mx.random.normal((2, 9, 2)), axis=-1)
    want = (experts.switch_glu(x, idx) * w[..., None]).sum(-2)
    got = cpu_kernels.moe(experts.switch_glu, x, idx, w)
    # float32: the same products summed in another order (and tanh through exp): within
    # a few ulp of the output's scale
    assert got.shape == want.shape
    assert float(mx.abs(got - want).max()) <= 1e-5 * max(1.0, float(mx.abs(want).max()))
    # an expert no token uses, and a single token
    got1 = cpu_kernels.moe(experts.switch_glu, x[:1, :1], idx[:1, :1], w[:1, :1])
    close(np.array(got1), np.array(want[:1, :1]))
    nn.quantize(model, group_size=32, bits=4)
    experts = model.layers[0].experts
    assert not cpu_kernels.moe_supported(experts.switch_glu)
    backend.configure(model, experts="cpu")  # falls back to the grouped MLX path
    assert isinstance(experts, backend.KernelExperts)
    want = (experts.switch_glu(x, idx) * w[..., None]).sum(-2)
    assert float(mx.abs(experts(x, idx, w) - want).max()) <= 1e-4 * max(1.0, float(mx.abs(want).max()))


@pytest.mark.skipif(not cpu_kernels.built(), reason="the CPU kernel is not built here")
def test_cpu_softcap_matches_mlx():
    from mlx_dgemma.model import softcap

    x = mx.concatenate([mx.random.normal((3, 1000)) * 40, mx.array([[0.0, -0.0, 1e-7, -1e-7, 1e4, -1e4] * 3]).reshape(3, 6)
                        .astype(mx.float32)], axis=1)
    got, want = cpu_kernels.softcap(x, 30.0), softcap(x, 30.0)
    # tanh through MLX's exp, (1 - e) / (1 + e): within 4 ulp of the cap (measured: 3)
    assert float(mx.abs(got - want).max()) <= 4 * float(np.spacing(np.float32(30)))
    assert got.dtype == mx.float32 and got.shape == x.shape


@needs_cpu_attention
def test_cpu_geglu_matches_mlx():
    from mlx_dgemma.kernels import _cpu
    from mlx_dgemma.model import geglu

    g = np.concatenate([np.linspace(-12, 12, 2001), [0.0, -0.0, 1e-8, -1e-8, 40.0, -40.0]]).astype(np.float32)
    u = np.random.default_rng(0).normal(size=g.shape).astype(np.float32)
    out = np.empty_like(g)
    _cpu.geglu(g, u, out, g.size)
    want = np.array(geglu(mx.array(g), mx.array(u)))
    # tanh through exp: an absolute error of a few ulp of 1 in tanh, times 0.5 |g u|
    assert np.all(np.abs(out - want) <= 4e-7 * (np.abs(g * u) + 1e-6))


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantized_matmuls_match_quantized_matmul(bits, monkeypatch):
    """CPU: quantized layers, experts (grouped) and the embedding table (LM head, in row
    chunks; self-conditioning) run dequantized through float32 matmuls: the same weights,
    so the logits agree to float32 rounding of the sums."""
    import mlx.nn as nn

    model = tiny_model(9)
    nn.quantize(model, group_size=32, bits=bits)
    rng = np.random.default_rng(9)
    prompt, canvas = rng.integers(0, 160, 11), mx.array(rng.integers(0, 160, (1, 16)))
    probs = mx.softmax(mx.array(rng.normal(size=(1, 16, 160)).astype(np.float32)), -1)
    monkeypatch.setattr(backend.DequantizedEmbedding, "rows", 64)  # several chunks of the table
    out = []
    for on in (False, True):
        with switched(model, **dict(PLAIN, experts="grouped", dequantize=on)):
            assert isinstance(model.layers[0].self_attn.q_proj, backend.DequantizedLinear) == on
            cache = encoded(model, prompt)
            sc = model.soft_embeddings(probs)
            out.append((np.array(model.denoise(canvas, cache, self_conditioning_embeddings=sc)), np.array(sc)))
    (want, want_sc), (got, got_sc) = out
    close(got_sc, want_sc)
    close(got, want)


def test_grouped_experts_match_gather_mm_float_and_quantized():
    import mlx.nn as nn

    from mlx_dgemma.backend import grouped_switch_glu

    model = tiny_model(5)
    glu = model.layers[0].experts.switch_glu
    x = mx.random.normal((2, 9, 64))
    idx = mx.argpartition(-mx.random.normal((2, 9, 8)), kth=1, axis=-1)[..., :2]
    want = glu(x, idx)
    got = grouped_switch_glu(glu, x, idx)
    assert got.shape == want.shape
    assert float(mx.abs(got - want).max()) <= 1e-5
    nn.quantize(model, group_size=32, bits=4)
    glu = model.layers[0].experts.switch_glu
    want, got = glu(x, idx), grouped_switch_glu(glu, x, idx)
    assert float(mx.abs(got - want).max()) <= 1e-4 * max(1.0, float(mx.abs(want).max()))


@pytest.mark.parametrize("mode", ["dense", "blocked"])
@pytest.mark.parametrize("shape", [(2, 9), (3, 70)], ids=["one-block", "many-blocks"])
def test_traceable_experts_match_the_routed_sum_and_its_gradient(mode, shape):
    """Dense (every expert on every token, unrouted ones weighted 0) and blocked (the routed
    pairs in fixed-shape blocks per expert): the routed weighted sum, and the same
    gradients for the input and the expert weights (exact zeros for an expert no token
    chose); compiled too, since the trainer compiles its step."""
    import mlx.nn as nn

    model = tiny_model(6)
    experts = model.layers[0].experts
    x = mx.random.normal((*shape, 64))
    scores = mx.random.normal((*shape, 8)) - 1e9 * (mx.arange(8) == 5)  # no token chooses expert 5
    idx = mx.argpartition(-scores, kth=1, axis=-1)[..., :2]
    w = mx.softmax(mx.random.normal((*shape, 2)), axis=-1)

    def run(m, compiled=False):
        backend.configure(model, experts=m)
        f = nn.value_and_grad(experts, lambda x: (experts(x, idx, w) ** 2).sum())
        f = mx.compile(f) if compiled else f
        (loss, gw), gx = f(x), mx.grad(lambda x: (experts(x, idx, w) ** 2).sum())(x)
        return experts(x, idx, w), gw, gx

    want, gw_want, gx_want = run("gather")
    for compiled in (False, True):
        got, gw, gx = run(mode, compiled)
        assert float(mx.abs(got - want).max()) <= 1e-5 * max(1.0, float(mx.abs(want).max()))
        assert float(mx.abs(gx - gx_want).max()) <= 1e-5 * max(1.0, float(mx.abs(gx_want).max()))
        for name in ("gate_proj", "up_proj", "down_proj"):
            a, b = gw_want["switch_glu"][name]["weight"], gw["switch_glu"][name]["weight"]
            assert float(mx.abs(a - b).max()) <= 1e-5 * max(1.0, float(mx.abs(a).max())), name
        assert float(mx.abs(gw["switch_glu"]["gate_proj"]["weight"][5]).max()) == 0.0
    backend.configure(model, experts="gather")


def test_decoder_step_is_rebuilt_when_the_cache_changes(model):
    """The per-block state is kept on the model (not on the cache): appending a block must
    invalidate it."""
    rng = np.random.default_rng(4)
    cache = encoded(model, rng.integers(0, 160, 6))
    canvas = mx.array(rng.integers(0, 160, (1, 16)))
    first = np.array(model.denoise(canvas, cache))
    step = model.decoder_step(cache, 1, 16)
    assert model.decoder_step(cache, 1, 16) is step  # reused within the block
    assert not [k for k in vars(cache) if "step" in k]
    model.encode(canvas, cache)
    assert model.decoder_step(cache, 1, 16) is not step
    after = np.array(model.denoise(canvas, cache))
    assert np.abs(after - first).max() > 1e-3
    # the same cache state built from scratch gives the same logits
    again = model.make_cache()
    for c_new, c_old in zip(again, cache):
        c_new.state = c_old.state
        c_new.offset = c_old.offset
    close(np.array(model.denoise(canvas, again)), after)


def test_numpy_cpu_sampler_prototype_matches_sample_step_mlx():
    """benchmarks/cpu_sampler.py (the CPU 'kernel' what-if) keeps sample_step_mlx's tokens."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from cpu_sampler import sample_step_numpy, soft_embeddings_numpy

    from mlx_dgemma import rng
    from mlx_dgemma.sampling import probabilities, sample_step_mlx

    model = tiny_model(7)
    logits = mx.tanh(mx.random.normal((2, 16, 160)) * 2) * 30
    keys = rng.position_keys([3, 4], rng.SAMPLE, 0, 5, 16)
    for temp in (0.45, 0.8):
        a, b = sample_step_mlx(logits, temp, keys), sample_step_numpy(logits, temp, keys)
        assert (np.array(a.sampled) == np.array(b.sampled)).all()
        assert (np.array(a.argmax) == np.array(b.argmax)).all()
        assert np.allclose(np.array(a.entropy), np.array(b.entropy), atol=1e-4)
        assert np.allclose(np.array(a.lse), np.array(b.lse), atol=1e-4)
        want = model.soft_embeddings(probabilities(logits, temp, a.lse))
        got = soft_embeddings_numpy(model, logits, temp, a.lse)
        assert float(mx.abs(want - got).max()) <= 1e-4


def test_chunked_prefill_equals_one_pass(model):
    rng = np.random.default_rng(6)
    prompt = mx.array(rng.integers(0, 160, (1, 45)))
    canvas = mx.array(rng.integers(0, 160, (1, 16)))
    with switched(model, prefill_chunk=0):
        whole = model.make_cache()
        model.encode(prompt, whole)
        want = np.array(model.denoise(canvas, whole))
    with switched(model, prefill_chunk=16):  # 16 + 16 + 13, across the sliding window of 8
        chunked = model.make_cache()
        model.encode(prompt, chunked)
        got = np.array(model.denoise(canvas, chunked))
    assert chunked.offset == whole.offset == 45
    for a, b in zip(chunked, whole):
        close(np.array(a.state[0]), np.array(b.state[0]))
    close(got, want)


def test_backend_defaults_then_plain_keep_the_parameters():
    """The backend swaps module classes only: the parameter names and arrays stay; its
    CPU defaults are what benchmarks/README.md measured, and ``plain`` undoes them."""
    from mlx.utils import tree_flatten

    model = tiny_model(11)
    before = dict(tree_flatten(model.parameters()))
    backend.defaults(model)
    s = backend.settings(model)
    if mx.default_device() == mx.cpu:
        kernel = cpu_kernels.attention_available()
        assert s == dict(experts="cpu" if kernel else "grouped", attention=kernel, host_softcap=True,
                         dequantize=False, compile=False, fastmath=True)  # dequantize: nothing is quantized here
    after = dict(tree_flatten(model.parameters()))
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    backend.plain(model)
    assert backend.traceable(model) and type(model.layers[0].experts) is __import__(
        "mlx_dgemma.model", fromlist=["Experts"]).Experts
    assert backend.settings(model)["fastmath"] == (mx.default_device() == mx.cpu)  # traceable: kept for training
    with pytest.raises(ValueError, match="experts must be one of"):
        backend.configure(model, experts="fast")
    backend.configure(model, host_softcap=True)
    with pytest.raises(ValueError, match="compile needs the traceable paths"):
        backend.configure(model, compile=True)


@pytest.mark.parametrize("window", [None, 24])
def test_causal_halves_equal_one_pass_with_gradients(window):
    """The encoder's attention over a whole sequence in two query halves (backend.causal_halves,
    what FastAttention runs from CAUSAL_SPLIT_MIN tokens) gives one pass's values and
    gradients: the scores it leaves out are the ones the causal mask hides."""
    from mlx_dgemma import fastmath
    from mlx_dgemma.models.diffusion_gemma import encoder_mask

    L = max(backend.CAUSAL_SPLIT_MIN, 81)
    q = mx.random.normal((2, 4, L, 16), key=mx.random.key(0))
    k, v = (mx.random.normal((2, 2, L, 16), key=mx.random.key(i)) for i in (1, 2))  # grouped KV heads
    mask = encoder_mask(L, 0, L, window)
    w = mx.random.normal((2, 4, L, 16), key=mx.random.key(3))

    def loss(f):
        return lambda q, k, v: (f(q, k, v) * w).sum()

    whole = lambda q, k, v: fastmath.attention(q, k, v, 1.0, mask)  # noqa: E731
    halves = lambda q, k, v: backend.causal_halves(q, k, v, mask)  # noqa: E731
    close(np.array(halves(q, k, v)), np.array(whole(q, k, v)))
    grads = [mx.grad(loss(f), argnums=(0, 1, 2))(q, k, v) for f in (halves, whole)]
    for a, b in zip(*grads):
        close(np.array(a), np.array(b))
    assert (mask == "causal") if window is None else mask.shape == (L, L)


def test_fast_attention_splits_whole_causal_sequences_only(model, monkeypatch):
    """FastAttention takes the halves for a whole sequence from CAUSAL_SPLIT_MIN tokens (the
    training encoder), and one pass for short ones, prefill chunks after a prefix and image masks."""
    calls = []
    real = backend.causal_halves
    monkeypatch.setattr(backend, "causal_halves", lambda *a: calls.append(a[0].shape[2]) or real(*a))
    attn = model.layers[0].self_attn
    cls = type(attn)
    try:
        attn.__class__ = backend.FastAttention
        n = backend.CAUSAL_SPLIT_MIN
        q = mx.random.normal((1, attn.n_heads, n, attn.head_dim))
        kv = mx.random.normal((1, attn.n_kv_heads, n, attn.head_dim))
        attn.encoder_attention(q, kv, kv, "causal", 0)
        attn.encoder_attention(q[:, :, :n - 1], kv[:, :, :n - 1], kv[:, :, :n - 1], "causal", 0)
        attn.encoder_attention(q[:, :, -8:], kv, kv, mx.ones((8, n), dtype=mx.bool_), n - 8)
        attn.encoder_attention(q, kv, kv, ImageMask(mx.ones((n, n), dtype=mx.bool_)), 0)
    finally:
        attn.__class__ = cls
    assert calls == [n]


def test_fastest_paths_inside_the_block_and_the_models_own_after(model):
    """backend.fastest_paths: the device's defaults inside the block (a training run's
    evaluation by generation), then exactly the settings the model had, even after an error."""
    backend.configure(model, **dict(PLAIN, experts="blocked", fastmath=True))
    before = backend.settings(model)
    want = backend.settings(backend.defaults(model))
    backend.configure(model, **before)
    assert want != before
    with pytest.raises(RuntimeError):
        with backend.fastest_paths(model):
            assert backend.settings(model) == want
            raise RuntimeError
    assert backend.settings(model) == before
    backend.configure(model, **PLAIN)
