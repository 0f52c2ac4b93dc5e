"""The encoder as a language model, and as the verifier of the decoder's drafts.

Exactness is checked against transformers on a tiny random float32 model whose routing
is decisive (``top_k_experts == num_experts``: every expert always contributes, so no
top-k near-tie can turn a float32 rounding difference into a different expert). Our
encoder logits then match the reference's within float32 rounding (the bounds of
``tests/reference/compare.py``), and at every generated position the test checks that
the reference's top-two margin is above twice that bound, so rounding cannot flip an
argmax: token sequences must be identical.

The post-sublayer norms are scaled up (x3) so that the layers, not the current token's
own embedding, dominate the residual stream: a random model otherwise repeats one
token forever under greedy decoding, which would make "same tokens" a weak check.
"""

from __future__ import annotations

import statistics

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from transformers.cache_utils import DynamicCache  # noqa: E402

from mlx_dgemma import load_model, rng  # noqa: E402
from mlx_dgemma.cache import PrefixCache  # noqa: E402
from mlx_dgemma.drafter import DenoiseSettings  # noqa: E402
from mlx_dgemma.generate import GenerateInputError, generate_steps  # noqa: E402
from mlx_dgemma.verify import EncoderRule, encoder_choice  # noqa: E402
from tests.reference.compare import RTOL, assert_logits_match, assert_same_network_output, bound  # noqa: E402
from tests.reference.hf_reference import build_reference, save_checkpoint, tiny_config  # noqa: E402

# Compared with the reference: CI runs these under both BLAS libraries (README, Tests).
pytestmark = pytest.mark.reference

L = 16  # canvas length
V = 160
W = 8  # sliding window of the tiny config
DRAFT = DenoiseSettings(max_denoising_steps=3, entropy_bound=0.5, stability_threshold=None,
                        confidence_threshold=None)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cfg = tiny_config(canvas_length=L, top_k_experts=8)
    ref = build_reference(cfg, seed=1).cpu()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "post_attention_layernorm" in name or "post_feedforward_layernorm.weight" in name:
                p.mul_(3.0)
    model, _ = load_model(save_checkpoint(ref, tmp_path_factory.mktemp("verify")))
    return ref, model


# --- transformers' encoder, head and soft-capping, token by token -----------------------


@torch.no_grad()
def hf_logits(ref, cache, ids, offset: int) -> np.ndarray:
    """encoder_last_hidden_state (final norm) -> tied head -> float32 -> soft-cap, [B, T, V]."""
    ids = torch.as_tensor(np.asarray(ids)).long()
    pos = torch.arange(offset, offset + ids.shape[1])[None]
    h = ref.model.encoder(input_ids=ids, cache=cache, position_ids=pos).last_hidden_state
    x = ref.lm_head(h).float()
    cap = ref.final_logit_softcapping
    return (torch.tanh(x / cap) * cap).numpy()


def hf_greedy(ref, prompt, n: int):
    """Greedy autoregressive continuation of ``prompt`` (n tokens), its smallest top-two
    logit margin and its largest |logit| (the scale rounding is relative to)."""
    cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
    lg = hf_logits(ref, cache, [prompt], 0)[0, -1]
    out, margin, scale = [], np.inf, 0.0
    for i in range(n):
        top = np.sort(lg)[-2:]
        margin, scale = min(margin, float(top[1] - top[0])), max(scale, float(np.abs(lg).max()))
        out.append(int(lg.argmax()))
        lg = hf_logits(ref, cache, [[out[-1]]], len(prompt) + i)[0, -1]
    return out, margin, scale


def tokens_of(steps, B):
    out = [[] for _ in range(B)]
    for s in steps:
        for b in range(B):
            out[b] += s.tokens[b]
    return out


# --- 1. the encoder's logits ------------------------------------------------------------


def test_encoder_logits_match_transformers(pair, monkeypatch):
    ref, model = pair
    r = np.random.RandomState(0)
    prompt, more = r.randint(3, V, (2, 13)), r.randint(3, V, (2, 9))  # 22 tokens > window 8
    hc = DynamicCache(config=ref.config.get_text_config(decoder=True))
    want = np.concatenate([hf_logits(ref, hc, prompt, 0), hf_logits(ref, hc, more, 13)], 1)

    monkeypatch.setattr(model, "prefill_chunk", 4)  # the logits of chunked encodes are concatenated
    cache = model.make_cache()
    got = np.concatenate([np.array(model.encode(mx.array(prompt), cache, return_logits=True)),
                          np.array(model.encode(mx.array(more), cache, return_logits=True))], 1)
    assert got.shape == want.shape == (2, 22, V) and got.dtype == np.float32
    assert_logits_match(want, got, exact=True)

    # Asking for logits leaves exactly the cache the fast path (last layer's K/V only) leaves.
    plain = model.make_cache()
    assert model.encode(mx.array(prompt), plain) is None
    model.encode(mx.array(more), plain)
    for a, b in zip(cache, plain):
        for x, y in zip(a.prefix(), b.prefix()):
            np.testing.assert_array_equal(np.array(x), np.array(y))


# --- 2. trimming the cache ----------------------------------------------------------------


def _encode_all(model, chunks, reserve=0):
    cache = model.make_cache()
    cache.reserve_trim(reserve)
    for c in chunks:
        model.encode(mx.array(c), cache)
    return cache


@pytest.mark.parametrize("prompt_len, k", [(5, 1), (5, L), (29, 3), (29, L - 1), (29, L)])
def test_trim_leaves_no_trace(pair, prompt_len, k):
    """Encode a block, trim its last k tokens, encode more: the same as never having
    encoded the rejected tail, on sliding and full layers, for prompts shorter and
    longer than the window."""
    _, model = pair
    r = np.random.RandomState(prompt_len + k)
    prompt, block, after = r.randint(3, V, (1, prompt_len)), r.randint(3, V, (1, L)), r.randint(3, V, (1, 5))
    canvas = mx.array(r.randint(0, V, (1, L)))

    trimmed = _encode_all(model, [prompt, block], reserve=L)
    v0 = trimmed.version
    trimmed.trim(k)
    assert trimmed.offset == prompt_len + L - k and all(a != b for a, b in zip(trimmed.version, v0))
    clean = _encode_all(model, [prompt, block[:, : L - k]] if k < L else [prompt])
    for a, b in zip(trimmed, clean):  # what the decoder and the next encode see
        assert a.offset == b.offset
        for x, y in zip(a.prefix(), b.prefix()):
            assert x.shape == y.shape
            # the kept K/V were computed in a longer batch: equal up to float32 rounding
            np.testing.assert_allclose(np.array(x), np.array(y), rtol=0, atol=bound(np.array(y)))
    assert trimmed[0].prefix()[0].shape[2] == min(prompt_len + L - k, W - 1)  # exactly window - 1

    got = np.array(model.encode(mx.array(after), trimmed, return_logits=True))
    want = np.array(model.encode(mx.array(after), clean, return_logits=True))
    assert_same_network_output(got, want)
    assert_same_network_output(np.array(model.denoise(canvas, trimmed)), np.array(model.denoise(canvas, clean)))


def test_trim_needs_reserved_history(pair):
    _, model = pair
    r = np.random.RandomState(9)
    cache = _encode_all(model, [r.randint(3, V, (1, 20)), r.randint(3, V, (1, L))])  # no reserve_trim
    assert cache.trimmable() == 0
    before = [np.array(c.prefix()[0]) for c in cache]
    with pytest.raises(ValueError, match="cannot trim 1 tokens"):
        cache.trim(1)
    assert cache.offset == 20 + L
    for c, b in zip(cache, before):  # all or nothing: the full layers were not trimmed either
        np.testing.assert_array_equal(np.array(c.prefix()[0]), b)
    short = _encode_all(model, [r.randint(3, V, (1, 5))])  # nothing has scrolled out yet
    assert short.trimmable() == 5
    cache = _encode_all(model, [r.randint(3, V, (1, 20)), r.randint(3, V, (1, L))], reserve=L)
    assert cache.trimmable() == L and cache.copy().trimmable() == L
    split = cache.split_rows()
    assert len(split) == 1 and split[0].trimmable() == L and isinstance(split[0], PrefixCache)


# --- 3. ar and verified against transformers' greedy loop -------------------------------------

MID = 5
PLAN = ["decoder", "full", "mid", "first", "full", "mid"]


def scripted_drafts(continuations, plan):
    """A draft function: round ``i`` follows ``plan[i]``: "decoder" (the real drafter),
    "full" (the encoder's own continuation: accepted whole, plus the bonus token),
    "mid" (wrong at position MID) or "first" (wrong at position 0)."""

    def draft(inp):
        kind = plan[inp.cycle % len(plan)]
        if kind == "decoder":
            return None
        out = []
        for b, done in zip(inp.rows, inp.generated):
            d = np.array(continuations[b][len(done): len(done) + L])
            assert len(d) == L, "continuation too short for the test"
            at = {"mid": MID, "first": 0}.get(kind)
            if at is not None:
                d[at] = (d[at] + 1) % V
            out.append(d)
        return np.stack(out)

    return draft


def test_verified_and_ar_greedy_equal_transformers(pair):
    ref, model = pair
    r = np.random.RandomState(8)
    prompts = [list(r.randint(3, V, 5)), list(r.randint(3, V, 27))]  # one shorter, one longer than the window
    M = 48
    want, margins, scales = zip(*(hf_greedy(ref, p, M + L) for p in prompts))
    tol = 2 * RTOL * max(scales)  # twice the rounding bound: neither side can cross the other
    assert min(margins) > tol, f"an argmax margin {min(margins):.1e} is within float32 rounding: pick other inputs"
    assert all(len(set(w[:M])) > 10 for w in want), "a degenerate continuation proves little"

    ar = tokens_of(generate_steps(model, prompts, decode="ar", max_tokens=M, seeds=[3, 4]), 2)
    assert ar == [w[:M] for w in want]

    caches = [model.make_cache(), model.make_cache()]
    steps = list(generate_steps(model, prompts, decode="verified", cache=caches, draft_settings=DRAFT,
                                max_tokens=M, seeds=[3, 4], draft_fn=scripted_drafts(want, PLAN)))
    assert tokens_of(steps, 2) == [w[:M] for w in want]
    # the scripted rounds did what they say, on both rows
    for s, kind in zip(steps[1:5], PLAN[1:5]):
        expect = {"full": (L, L + 1), "mid": (MID, MID + 1), "first": (0, 1)}[kind]
        assert [(int(s.accepted[b]), len(s.tokens[b])) for b in range(2)] == [expect] * 2, kind
    last = steps[-1]
    assert last.last and last.finish_reason == ["length", "length"] and (last.generated == M).all()
    assert (last.verifications == len(steps)).all() and (last.decoder_passes == 3).all()
    # every round but the last encodes its last token: one pass each, plus the commit passes
    # that ran (skipped when the first draft token is wrong: the "first" round at least)
    assert (last.encoder_passes <= 2 * len(steps) - 2).all() and (last.encoder_passes >= len(steps) + 2).all()
    for c, p in zip(caches, prompts):  # the cache holds every committed token but the last
        assert c.offset == len(p) + M - 1


def test_verified_stops_at_a_committed_eos(pair):
    ref, model = pair
    prompt = list(np.random.RandomState(6).randint(3, V, 11))
    want, _, _ = hf_greedy(ref, prompt, 3 * L)
    j = next(i for i in range(3, L) if want[i] not in want[:i])  # first occurrence, inside a full block
    eos = [want[j]]
    cache = model.make_cache()
    steps = list(generate_steps(model, prompt, decode="verified", cache=cache, max_tokens=3 * L,
                                eos_token_ids=eos, draft_fn=scripted_drafts([want], ["full"])))
    assert len(steps) == 1 and steps[0].tokens[0] == want[: j + 1] and steps[0].finish_reason == ["stop"]
    assert steps[0].accepted[0] == j + 1 and cache.offset == len(prompt) + j
    ar = list(generate_steps(model, prompt, decode="ar", max_tokens=3 * L, eos_token_ids=eos))
    assert tokens_of(ar, 1)[0] == want[: j + 1] and ar[-1].finish_reason == ["stop"]


# --- 4. sampled ------------------------------------------------------------------------------


def test_verified_sample_equals_ar_sample(pair):
    _, model = pair
    r = np.random.RandomState(7)
    prompts = [list(r.randint(3, V, 6)), list(r.randint(3, V, 19))]
    M, kw = 40, dict(verify="sample", temperature=0.8, max_tokens=40)
    ar = tokens_of(generate_steps(model, prompts, decode="ar", seeds=[11, 12], **kw), 2)
    # with the real drafter (its drafts are mostly rejected at once on a random model)
    real = tokens_of(generate_steps(model, prompts, decode="verified", draft_settings=DRAFT, seeds=[11, 12], **kw), 2)
    assert real == ar
    # with drafts that agree with the encoder's own samples: long accepted runs
    steps = list(generate_steps(model, prompts, decode="verified", seeds=[11, 12],
                                draft_fn=scripted_drafts([a + [0] * L for a in ar], ["full", "mid", "first"]), **kw))
    assert tokens_of(steps, 2) == ar
    assert [int(s.accepted[0]) for s in steps[:3]] == [L, MID, 0]
    # the seed matters, per row
    other = tokens_of(generate_steps(model, prompts, decode="ar", seeds=[11, 13], **kw), 2)
    assert other[0] == ar[0] and other[1] != ar[1]
    assert len(ar[0]) == M


def _chi_square(counts: np.ndarray, p: np.ndarray, alpha: float):
    """Pearson's statistic over the bins expected >= 5 times (the rest pooled), and the
    critical value at significance ``alpha`` (Wilson-Hilferty, good for df >= 3)."""
    exp = p * counts.sum()
    big = exp >= 5
    obs, exp = np.append(counts[big], counts[~big].sum()), np.append(exp[big], exp[~big].sum())
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    df = len(exp) - 1
    z = statistics.NormalDist().inv_cdf(1 - alpha)
    return float(((obs - exp) ** 2 / exp).sum()), df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def test_ar_samples_follow_the_encoder_softmax(tmp_path):
    """Over 4,000 seeds, the first token of decode="ar" is distributed as
    softmax(encoder logits / T): chi-square at significance 0.001 (a correct sampler
    fails with probability 0.001 over seed sets; these seeds are fixed, so the test is
    deterministic). The same test rejects a sampler at the wrong temperature and argmax."""
    cfg = tiny_config(canvas_length=L, vocab_size=16, num_hidden_layers=2, num_experts=2, top_k_experts=2,
                      layer_types=["sliding_attention", "full_attention"], eos_token_id=[1])
    model, _ = load_model(save_checkpoint(build_reference(cfg, seed=3), tmp_path))
    prompt, T, N, alpha = [3, 7, 9, 4], 1.5, 4000, 1e-3
    logits = np.array(model.encode(mx.array([prompt]), model.make_cache(), return_logits=True))[0, -1]
    p = np.exp((logits - logits.max()) / T)
    p /= p.sum()
    assert p.max() < 0.6 and (p * N >= 5).all()  # a spread-out target: a real test

    def first_tokens(verify, temperature):
        steps = list(generate_steps(model, [prompt] * N, decode="ar", verify=verify, temperature=temperature,
                                    max_tokens=1, seeds=range(N)))
        return np.bincount([t[0] for t in steps[-1].tokens], minlength=16)

    stat, crit = _chi_square(first_tokens("sample", T), p, alpha)
    assert stat < crit, f"chi-square {stat:.1f} >= {crit:.1f}: samples do not follow softmax(logits / {T})"
    for verify, t in (("sample", 0.75 * T), ("sample", 1.33 * T), ("greedy", T)):  # broken samplers
        bad, _ = _chi_square(first_tokens(verify, t), p, alpha)
        assert bad > crit, f"the test cannot tell {verify} at T={t} from the right sampler ({bad:.1f})"


def test_sequence_keys_depend_on_seed_and_position_only():
    a = rng.sequence_keys(5, rng.ENCODER, [10, 11, 12], numpy=True)
    np.testing.assert_array_equal(np.array(rng.sequence_keys(5, rng.ENCODER, [12])), a[2:])
    np.testing.assert_array_equal(rng.sequence_keys([5, 6, 5], rng.ENCODER, [10, 11, 12], numpy=True)[[0, 2]], a[[0, 2]])
    assert len({int(k) for k in a}) == 3
    assert not (rng.sequence_keys(6, rng.ENCODER, [10, 11, 12], numpy=True) == a).any()
    assert not (rng.sequence_keys(5, rng.SAMPLE, [10, 11, 12], numpy=True) == a).any()
    logits = mx.array(np.random.RandomState(0).randn(3, 50).astype(np.float32))
    g = encoder_choice(logits, [4, 5, 6], 1, EncoderRule("greedy"))
    np.testing.assert_array_equal(g, np.array(logits).argmax(-1))
    s = encoder_choice(logits, [4, 5, 6], 1, EncoderRule("sample", 0.5))
    np.testing.assert_array_equal(encoder_choice(logits[1:], [5, 6], 1, EncoderRule("sample", 0.5)), s[1:])


def test_bad_inputs(pair):
    _, model = pair
    with pytest.raises(GenerateInputError, match="decode must be"):
        next(generate_steps(model, [3, 4], decode="diffusion"))
    with pytest.raises(GenerateInputError, match="verify must be"):
        next(generate_steps(model, [3, 4], verify="top-p"))
    with pytest.raises(GenerateInputError, match="temperature"):
        next(generate_steps(model, [3, 4], verify="sample", temperature=0))
    with pytest.raises(GenerateInputError, match="empty prompt"):
        next(generate_steps(model, [[3, 4], []]))
    with pytest.raises(GenerateInputError, match="caches"):
        next(generate_steps(model, [[3, 4], [5]], cache=[model.make_cache()]))
    ctx = model.args.max_position_embeddings
    with pytest.raises(GenerateInputError, match="16-token canvas"):
        next(generate_steps(model, [3] * (ctx - L + 1)))
    with pytest.raises(GenerateInputError, match="max_tokens"):
        next(generate_steps(model, [3, 4], decode="ar", max_tokens=0))
