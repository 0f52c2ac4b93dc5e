"""Each drafter piece against the reference's own classes, and the drafter's contracts."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_dgemma import drafter, rng
from mlx_dgemma.config import small_model_config
from mlx_dgemma.kernels.selfcond import topk_soft_embeddings
from mlx_dgemma.drafter import (
    DenoiseSettings,
    SettingsError,
    StableAndConfident,
    denoise_block,
    entropy_bound_mask,
)
from mlx_dgemma.small_model import small_model
from mlx_dgemma.sampling import probabilities, sample_step_mlx, temperature
from tests.reference.compare import assert_same_network_output

# Compared with the reference: CI runs these under both BLAS libraries (README, Tests).
pytestmark = pytest.mark.reference

torch = pytest.importorskip("torch")
G = pytest.importorskip("transformers.models.diffusion_gemma.generation_diffusion_gemma")


# --- settings ------------------------------------------------------------------------------


def test_defaults_are_the_reference_defaults():
    ref = G.DiffusionGemmaGenerationConfig._get_default_generation_params()
    s = DenoiseSettings()
    assert s.max_denoising_steps == ref["max_denoising_steps"]
    assert s.entropy_bound == ref["sampler_config"].entropy_bound
    assert (s.t_min, s.t_max) == (ref["t_min"], ref["t_max"])
    assert s.stability_threshold == ref["stability_threshold"]
    assert s.confidence_threshold == ref["confidence_threshold"]
    assert DenoiseSettings.from_generation_config({}) == s


def test_from_generation_config_file_nested_and_overrides(tmp_path):
    cfg = {"max_denoising_steps": 20, "sampler_config": {"entropy_bound": 0.3, "_cls_name": "EntropyBoundSamplerConfig"},
           "t_min": 0.2, "eos_token_id": [1, 106, 50]}
    (tmp_path / "generation_config.json").write_text(json.dumps(cfg))
    for src in (tmp_path, tmp_path / "generation_config.json", cfg):
        s = DenoiseSettings.from_generation_config(src)
        assert (s.max_denoising_steps, s.entropy_bound, s.t_min, s.t_max) == (20, 0.3, 0.2, 0.8)
    s = DenoiseSettings.from_generation_config(tmp_path, max_denoising_steps=5, t_max=None, entropy_bound=1)
    assert (s.max_denoising_steps, s.t_max, s.entropy_bound) == (5, 0.8, 1.0)
    assert DenoiseSettings.from_generation_config({"entropy_bound": 0.7}).entropy_bound == 0.7
    assert DenoiseSettings.from_generation_config(tmp_path / "missing") == DenoiseSettings()


@pytest.mark.parametrize("kw, word", [
    (dict(max_denoising_steps=0), "max_denoising_steps"),
    (dict(max_denoising_steps=2.5), "max_denoising_steps"),
    (dict(entropy_bound=0.0), "entropy_bound"),
    (dict(entropy_bound=float("nan")), "entropy_bound"),
    (dict(t_min=-0.1), "t_min"),
    (dict(t_min=0.8, t_max=0.8), "t_max"),
    (dict(stability_threshold=-1), "stability_threshold"),
    (dict(confidence_threshold=0), "confidence_threshold"),
    (dict(sc_top_k=0), "sc_top_k"),
    (dict(t_max="hot"), "t_max"),
])
def test_bad_settings_one_line_errors(kw, word):
    with pytest.raises(SettingsError) as e:
        DenoiseSettings(**kw)
    assert word in str(e.value) and "\n" not in str(e.value)


def test_bad_generation_config(tmp_path):
    (tmp_path / "generation_config.json").write_text("{nope")
    with pytest.raises(SettingsError, match="generation_config.json"):
        DenoiseSettings.from_generation_config(tmp_path)
    with pytest.raises(SettingsError, match="unknown sampler setting"):
        DenoiseSettings.from_generation_config({}, temperature=1.0)


# --- pieces against the reference ---------------------------------------------------------


def test_temperature_schedule_matches_reference():
    N, logits = 48, np.random.RandomState(0).randn(2, 5, 7).astype(np.float32) * 10
    proc = G.LinearTemperatureScheduleLogitsProcessor(t_min=0.4, t_max=0.8, max_denoising_steps=N)
    for n in range(N, 0, -1):
        ref = proc(None, torch.as_tensor(logits), cur_step=torch.tensor(n, dtype=torch.int32)).numpy()
        ours = np.array(mx.array(logits) / temperature(n, N, 0.4, 0.8))
        np.testing.assert_allclose(ours, ref, rtol=1e-6)
    assert temperature(N, N, 0.4, 0.8) == pytest.approx(0.8) and temperature(1, N, 0.4, 0.8) > 0.4


def _entropy_ref(logits: np.ndarray) -> np.ndarray:
    return torch.distributions.Categorical(logits=torch.as_tensor(logits)).entropy().numpy()


def test_step_entropy_and_argmax_match_reference():
    logits = (np.random.RandomState(1).randn(3, 32, 50) * 4).astype(np.float32)
    keys = rng.position_keys([1, 2, 3], rng.SAMPLE, 0, 5, 32)
    s = sample_step_mlx(mx.array(logits), 0.6, keys)
    # atol: sampling.py computes lse - sum(p * x), which loses ~1e-5 to cancellation on
    # near-certain positions (torch sums p * log p); reported, not ours to change.
    np.testing.assert_allclose(np.array(s.entropy), _entropy_ref(logits / 0.6), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.array(s.argmax), (logits / 0.6).argmax(-1))


@pytest.mark.parametrize("bound", [1e-3, 0.1, 1.0, 5.0, 1e3])
def test_acceptance_and_renoise_match_reference(bound, monkeypatch):
    r = np.random.RandomState(2)
    B, L, V = 3, 40, 30
    scale = r.choice([0.5, 3.0, 20.0], size=(B, L, 1))  # a mix of sure and unsure positions
    logits = (r.randn(B, L, V) * scale).astype(np.float32)
    current = r.randint(0, V, size=(B, L))
    sampled = r.randint(0, V, size=(B, L))
    fresh = rng.random_tokens(rng.position_keys([4, 5, 6], rng.RENOISE, 1, 3, L, numpy=True), V)

    sampler = G.EntropyBoundSampler(G.EntropyBoundSamplerConfig(entropy_bound=float(bound)), L, V, 10)
    monkeypatch.setattr(sampler, "initialize_canvas", lambda batch_size, device: torch.as_tensor(fresh).long())
    accepted = sampler.accept_canvas(torch.as_tensor(current), torch.as_tensor(sampled), torch.as_tensor(logits), 3)
    ref_next = sampler.renoise_canvas(accepted, 3).numpy()
    ref_mask = sampler.accepted_token_mask.numpy()

    mask = np.array(entropy_bound_mask(mx.array(_entropy_ref(logits)), bound))
    np.testing.assert_array_equal(mask, ref_mask)
    assert mask.any(-1).all()  # the lowest-entropy position is always accepted
    ours = np.array(mx.where(mx.array(mask), mx.array(sampled), mx.array(fresh)))
    np.testing.assert_array_equal(ours, ref_next)


@pytest.mark.parametrize("S", [0, 1, 2])
def test_stopping_matches_reference(S):
    r = np.random.RandomState(3 + S)
    B, L, V = 4, 6, 5
    ref = G.StableAndConfidentStoppingCriteria(stability_threshold=S, confidence_threshold=0.9)
    ours = StableAndConfident(S, 0.9)
    canvas = r.randint(0, V, size=(B, L))
    fired = 0
    for step in range(12):
        change = r.rand(B) < 0.3  # rows keep their argmax most of the time
        canvas = np.where(change[:, None], r.randint(0, V, size=(B, L)), canvas)
        logits = (r.randn(B, L, V) * r.choice([0.3, 6.0], size=(B, 1, 1))).astype(np.float32)
        want = ref(torch.as_tensor(canvas), torch.as_tensor(logits)).numpy()
        got = ours(mx.array(canvas), _entropy_ref(logits).mean(-1))
        np.testing.assert_array_equal(got, want, err_msg=f"step {step}")
        fired += int(want.sum())
    assert fired > 0  # the criterion did trigger in this sequence
    assert not StableAndConfident(None, 0.1).enabled and not StableAndConfident(1, None).enabled


# --- the drafter on a tiny MLX model -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    model = small_model(small_model_config(
        vocab_size=64, canvas_length=8, hidden_size=32, num_hidden_layers=2, intermediate_size=48,
        num_attention_heads=2, head_dim=16, num_experts=4, top_k_experts=2, moe_intermediate_size=16,
        sliding_window=8, max_position_embeddings=512, eos_token_id=1, pad_token_id=0, bos_token_id=2), seed=0)
    model.update(dict(model=dict(decoder=dict(embed_tokens=dict(
        weight=model.decoder.embed_tokens.weight * 4)))))  # peakier logits
    mx.eval(model.parameters())
    cache = model.make_cache()
    model.encode(mx.array([[3, 4, 5, 6, 7], [9, 8, 7, 6, 5]]), cache)
    return model, cache


def test_committed_block_is_last_argmax_and_counts(tiny, monkeypatch):
    model, cache = tiny
    calls = []
    orig = drafter._sample_step

    def spy(logits, t, keys):  # the module-level indirection is what the drafter calls
        calls.append(t)
        return orig(logits, t, keys)

    monkeypatch.setattr(drafter, "_sample_step", spy)
    drafts = []
    s = DenoiseSettings(max_denoising_steps=10, stability_threshold=None)
    res = denoise_block(model, cache, s, [1, 2], block=0, on_draft=drafts.append)
    assert res.steps == len(drafts) == len(calls) == 10 and res.passes.tolist() == [10, 10]
    np.testing.assert_array_equal(np.array(res.tokens), np.array(drafts[-1].tokens))
    assert [d.remaining for d in drafts] == list(range(10, 0, -1))
    assert calls[0] == pytest.approx(0.8) and calls[-1] == pytest.approx(0.44)
    assert res.tokens.dtype == mx.int32 and res.tokens.shape == (2, 8)
    # an explicit sample_fn wins over the module-level one
    seen = []
    denoise_block(model, cache, s, [1, 2], block=0, sample_fn=lambda l, t, k: seen.append(t) or orig(l, t, k))
    assert len(seen) == 10 and len(calls) == 10


def test_rows_freeze_after_stopping_and_inactive_rows(tiny):
    model, cache = tiny
    s = DenoiseSettings(max_denoising_steps=16, stability_threshold=0, confidence_threshold=0.9, entropy_bound=0.5)
    drafts = []
    res = denoise_block(model, cache, s, [5, 6], block=2, on_draft=drafts.append)
    stop_step = {}
    for d in drafts:
        for r in range(2):
            if d.finished[r] and r not in stop_step:
                stop_step[r] = d.step
    assert stop_step, "no row stopped: raise confidence_threshold"
    for r, k in stop_step.items():
        frozen = np.array(drafts[k - 1].tokens)[r]
        for d in drafts[k:]:
            np.testing.assert_array_equal(np.array(d.tokens)[r], frozen)
        assert res.passes[r] == k and res.stopped[r]
    # a row marked inactive is never run, counts no pass, keeps its initial canvas
    alone = denoise_block(model, cache, s, [5, 6], block=2, active=[True, False])
    assert alone.passes[1] == 0 and not alone.stopped[1]
    np.testing.assert_array_equal(np.array(alone.tokens)[0], np.array(res.tokens)[0])
    np.testing.assert_array_equal(np.array(alone.tokens)[1],
                                  np.array(drafter.initial_canvas([5, 6], 2, 8, 64))[1])


def test_self_conditioning_signal_equals_the_reference_path(tiny):
    """Embeddings from the step's log-sum-exp == the decoder's own softmax of processed logits."""
    model, cache = tiny
    canvas = drafter.initial_canvas([1, 2], 0, 8, 64)
    logits = model.denoise(canvas, cache)
    t = 0.7
    s = sample_step_mlx(logits, t, rng.position_keys([1, 2], rng.SAMPLE, 0, 1, 8))
    sc = drafter.self_conditioning(model, logits, t, s, DenoiseSettings())
    a = model.denoise(canvas, cache, self_conditioning_embeddings=sc)
    b = model.denoise(canvas, cache, self_conditioning_logits=logits / t)
    assert_same_network_output(np.array(a), np.array(b))
    # top-k over the whole vocabulary is the same signal; a small k stays close
    full = topk_soft_embeddings(model, logits, t, s.lse, 64, tail="drop")
    np.testing.assert_allclose(np.array(full), np.array(sc), atol=1e-5)
    k4 = drafter.self_conditioning(model, logits, t, s, DenoiseSettings(sc_top_k=4))
    p = np.array(probabilities(logits, t, s.lse))
    tail = 1 - np.sort(p, -1)[..., -4:].sum(-1)
    err = np.abs(np.array(k4) - np.array(sc)).max(-1)
    assert (err <= (tail + 1e-5) * np.abs(np.array(model.decoder.embed_tokens.weight)).max() * model.embed_scale).all()


def test_same_seed_same_block_different_seed_differs(tiny):
    model, cache = tiny
    s = DenoiseSettings(max_denoising_steps=6)
    a = np.array(denoise_block(model, cache, s, [3, 4], block=1).tokens)
    b = np.array(denoise_block(model, cache, s, [3, 4], block=1).tokens)
    c = np.array(denoise_block(model, cache, s, [3, 4], block=2).tokens)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


# --- an addition to the reference: greedy acceptance (canvas pins: test_constraints.py) ---------


def test_greedy_takes_the_argmax_not_the_sample(tiny):
    """With ``greedy`` the step's sample is never used: replacing it changes nothing."""
    model, cache = tiny

    def scrambled(logits, t, keys):
        st = sample_step_mlx(logits, t, keys)
        return st._replace(sampled=(st.sampled + 7) % 64)

    for greedy, same in ((True, True), (False, False)):
        s = DenoiseSettings(max_denoising_steps=6, greedy=greedy)
        a = np.array(denoise_block(model, cache, s, [3, 4], block=1, sample_fn=sample_step_mlx).tokens)
        b = np.array(denoise_block(model, cache, s, [3, 4], block=1, sample_fn=scrambled).tokens)
        assert np.array_equal(a, b) == same
