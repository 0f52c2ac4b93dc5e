"""Canvas constraints (pinned tokens) and the confidence-threshold sampler.

Pinned positions must hold their token in every canvas the decoder sees and in every
draft, under every step budget and both samplers; they count as accepted; the
self-conditioning signal shows them as one-hot rows from the second step on; the free
positions follow the reference's entropy-bound rule applied to the free positions alone;
and with no constraints nothing changes.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_dgemma import drafter
from mlx_dgemma.config import small_model_config
from mlx_dgemma.drafter import (
    CanvasPins,
    ConstraintError,
    DenoiseSettings,
    SettingsError,
    confidence_mask,
    denoise_block,
    entropy_bound_mask,
)
from mlx_dgemma.generate import GenerateInputError, check_constraints, generate_blocks, template_constraints
from mlx_dgemma.small_model import small_model

L, V = 12, 64
PINS = [{0: 7, 3: 9, 11: 2}, {5: 63, 6: 1}]


@pytest.fixture(scope="module")
def tiny():
    model = small_model(small_model_config(
        vocab_size=V, canvas_length=L, hidden_size=32, num_hidden_layers=2, intermediate_size=48,
        num_attention_heads=2, head_dim=16, num_experts=4, top_k_experts=2, moe_intermediate_size=16,
        sliding_window=8, max_position_embeddings=512, eos_token_id=1, pad_token_id=0, bos_token_id=2), seed=3)
    model.update(dict(model=dict(decoder=dict(embed_tokens=dict(
        weight=model.decoder.embed_tokens.weight * 4)))))  # peaky logits: several accepted per step
    mx.eval(model.parameters())
    cache = model.make_cache()
    model.encode(mx.array([[3, 4, 5, 6, 7], [9, 8, 7, 6, 5]]), cache)
    return model, cache


class Spy:
    """Records every decoder input (canvas, self-conditioning signal) and output."""

    def __init__(self, model, monkeypatch):
        self.calls = []
        orig = model.denoise

        def denoise(canvas, cache, self_conditioning_logits=None, self_conditioning_embeddings=None):
            out = orig(canvas, cache, self_conditioning_logits, self_conditioning_embeddings)
            self.calls.append((np.array(canvas), None if self_conditioning_embeddings is None
                               else np.array(self_conditioning_embeddings), out))
            return out

        monkeypatch.setattr(model, "denoise", denoise)


def _assert_pinned(tokens: np.ndarray, pins=PINS):
    for r, row in enumerate(pins):
        for p, t in row.items():
            assert tokens[r, p] == t, (r, p)


@pytest.mark.parametrize("sampler", ["entropy-bound", "confidence"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8, 16, 48])
def test_pins_hold_in_every_canvas_and_draft(tiny, monkeypatch, steps, sampler):
    model, cache = tiny
    spy = Spy(model, monkeypatch)
    s = DenoiseSettings(max_denoising_steps=steps, sampler=sampler, threshold=0.5, stability_threshold=None)
    drafts = []
    res = denoise_block(model, cache, s, [1, 2], block=0, on_draft=drafts.append, constraints=PINS)
    assert len(spy.calls) == len(drafts) == steps
    for canvas, _, _ in spy.calls:  # what the decoder saw, from the first step on
        _assert_pinned(canvas)
    for d in drafts:
        _assert_pinned(np.array(d.tokens))
        assert (d.accepted >= [len(p) for p in PINS]).all()
    _assert_pinned(np.array(res.tokens))
    _assert_pinned(np.array(res.canvas))


def test_free_positions_follow_the_reference_rule_and_sc_is_one_hot(tiny, monkeypatch):
    torch = pytest.importorskip("torch")
    G = pytest.importorskip("transformers.models.diffusion_gemma.generation_diffusion_gemma")
    model, cache = tiny
    spy = Spy(model, monkeypatch)
    s = DenoiseSettings(max_denoising_steps=6, entropy_bound=0.5, stability_threshold=None)
    drafts = []
    denoise_block(model, cache, s, [4, 5], block=1, on_draft=drafts.append, constraints=PINS)
    onehot = np.array(model.embed(mx.array([[7, 9, 2], [63, 1, 1]])))
    for k, ((canvas, sc, logits), d) in enumerate(zip(spy.calls, drafts)):
        if k == 0:
            assert sc is None  # the first step takes the reference's no-self-conditioning path
        else:
            np.testing.assert_array_equal(sc[0, [0, 3, 11]], onehot[0])
            np.testing.assert_array_equal(sc[1, [5, 6]], onehot[1, :2])
        t = drafter.temperature(6 - k, 6, s.t_min, s.t_max)
        for r, row in enumerate(PINS):
            free = [p for p in range(L) if p not in row]
            sampler = G.EntropyBoundSampler(G.EntropyBoundSamplerConfig(entropy_bound=0.5), len(free), V, 6)
            lg = torch.as_tensor(np.array(logits)[r:r + 1, free] / t)
            cur = torch.zeros(1, len(free), dtype=torch.long)
            sampler.accept_canvas(cur, cur, lg, 6 - k)
            assert int(d.accepted[r]) == len(row) + int(sampler.accepted_token_mask.sum()), (k, r)


def test_no_constraints_is_unchanged(tiny):
    model, cache = tiny
    s = DenoiseSettings(max_denoising_steps=8, entropy_bound=0.5)
    a = denoise_block(model, cache, s, [9, 10], block=0)
    b = denoise_block(model, cache, s, [9, 10], block=0, constraints=[{}, None])
    np.testing.assert_array_equal(np.array(a.tokens), np.array(b.tokens))
    np.testing.assert_array_equal(a.passes, b.passes)
    # pins on one row leave the other row's tokens as they were
    c = denoise_block(model, cache, s, [9, 10], block=0, constraints=[PINS[0], None])
    np.testing.assert_array_equal(np.array(a.tokens)[1], np.array(c.tokens)[1])
    assert (np.array(a.tokens)[0] != np.array(c.tokens)[0]).any()


def test_confidence_mask_rule():
    conf = mx.array([[0.2, 0.95, 0.91, 0.5], [0.1, 0.3, 0.2, 0.25], [0.99, 0.1, 0.2, 0.3]])
    np.testing.assert_array_equal(np.array(confidence_mask(conf, 0.9)),
                                  [[0, 1, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0]])
    free = mx.array([[1, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]], dtype=mx.bool_)
    # the most confident FREE position is taken when none passes
    np.testing.assert_array_equal(np.array(confidence_mask(conf, 0.9, free)),
                                  [[0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])


def test_confidence_sampler_accepts_by_top_probability(tiny, monkeypatch):
    model, cache = tiny
    spy = Spy(model, monkeypatch)
    s = DenoiseSettings(max_denoising_steps=4, sampler="confidence", threshold=0.6, stability_threshold=None)
    drafts = []
    denoise_block(model, cache, s, [1, 2], block=0, on_draft=drafts.append)
    for k, ((_, _, logits), d) in enumerate(zip(spy.calls, drafts)):
        t = drafter.temperature(4 - k, 4, s.t_min, s.t_max)
        x = np.array(logits, np.float64) / t
        p = np.exp(x - x.max(-1, keepdims=True))
        top = (p / p.sum(-1, keepdims=True)).max(-1)
        np.testing.assert_array_equal(d.accepted, np.maximum((top > 0.6).sum(-1), 1))
    with pytest.raises(SettingsError, match="sampler"):
        DenoiseSettings(sampler="greedy")
    with pytest.raises(SettingsError, match="threshold"):
        DenoiseSettings(threshold=1.5)


def test_generate_blocks_pins_offsets_across_blocks(tiny):
    model, _ = tiny
    pins = [{0: 5, L - 1: 6, L: 7, 2 * L + 3: 8}, {L + 2: 9}]
    blocks = list(generate_blocks(model, [[3, 4, 5], [6, 7, 8]], settings=DenoiseSettings(max_denoising_steps=3),
                                  max_tokens=3 * L, seeds=[1, 2], eos_token_ids=[], constraints=pins))
    out = np.concatenate([b.tokens for b in blocks], -1)
    assert out.shape == (2, 3 * L)
    _assert_pinned(out, pins)
    with pytest.raises(GenerateInputError, match="outside the generated tokens"):
        list(generate_blocks(model, [[3, 4, 5]], max_tokens=L, constraints=[{L: 1}]))
    with pytest.raises(GenerateInputError, match="vocabulary"):
        list(generate_blocks(model, [[3, 4, 5]], max_tokens=L, constraints=[{0: V}]))
    with pytest.raises(GenerateInputError, match="constraint rows"):
        list(generate_blocks(model, [[3, 4, 5]], max_tokens=L, constraints=[{}, {}]))
    with pytest.raises(ConstraintError, match="outside the canvas"):
        CanvasPins.from_rows([{L: 1}], L, V)
    assert check_constraints({"3": 4}, 8, V) == {3: 4}  # JSON object keys


class CharTokenizer:
    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]


def test_template_constraints_holes():
    tok = CharTokenizer()
    assert template_constraints(tok, "ab__c") == {0: 97, 1: 98, 4: 99}
    assert template_constraints(tok, '{"k": ??}', hole="??") == {0: 123, 1: 34, 2: 107, 3: 34, 4: 58, 5: 32, 7: 125}
    assert template_constraints(tok, "__x") == {2: 120}
    with pytest.raises(GenerateInputError, match="empty"):
        template_constraints(tok, "")
