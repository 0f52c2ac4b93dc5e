"""The MLX network against the PyTorch reference on tiny random float32 models."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_dgemma import ModelArgs, load_model
from tests.fixtures import tiny
from tests.reference.compare import assert_logits_match, assert_same_network_output
from tests.reference.hf_reference import (
    build_reference,
    reference_denoise,
    reference_encode,
    save_checkpoint,
    tiny_config,
)

# Compared with the reference: CI runs these under both BLAS libraries (README, Tests).
pytestmark = pytest.mark.reference

V = 160


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(reference model, our model loaded from the decoder-prefix checkpoint)."""
    ref = build_reference(tiny_config(), seed=0)
    path = save_checkpoint(ref, tmp_path_factory.mktemp("dec"), prefix="decoder")
    model, _ = load_model(path)
    return ref, model


@pytest.fixture(scope="module")
def decisive_pair(tmp_path_factory):
    """Every expert active (top_k == num_experts): routing has no near-ties."""
    ref = build_reference(tiny_config(top_k_experts=8), seed=1)
    path = save_checkpoint(ref, tmp_path_factory.mktemp("decisive"))
    return ref, load_model(path)[0]


def ours(model, chunks, canvas, sc=None):
    cache = model.make_cache()
    for c in chunks:
        model.encode(mx.array(c), cache)
    return np.array(model.denoise(mx.array(canvas), cache, None if sc is None else mx.array(sc))), cache


def theirs(ref, chunks, canvas, sc=None):
    return reference_denoise(ref, canvas, reference_encode(ref, chunks), sc)


def ids(rng, *shape):
    return rng.integers(0, V, shape)


def test_prefill_then_denoise_without_and_with_self_conditioning(pair):
    ref, model = pair
    rng = np.random.default_rng(0)
    prompt, canvas = ids(rng, 1, 7), ids(rng, 1, 16)
    r1 = theirs(ref, [prompt], canvas)
    o1, _ = ours(model, [prompt], canvas)
    assert_logits_match(r1, o1)
    # self-conditioning with temperature-scaled logits of the previous step
    sc = r1 / 0.6
    r2 = theirs(ref, [prompt], canvas, sc)
    o2, _ = ours(model, [prompt], canvas, sc)
    assert_logits_match(r2, o2)
    assert np.abs(r2 - r1).max() > 1e-2, "self-conditioning had no effect: the test proves nothing"


def test_decisive_routing_matches_everywhere(decisive_pair):
    ref, model = decisive_pair
    rng = np.random.default_rng(1)
    prompt, canvas = ids(rng, 1, 20), ids(rng, 1, 16)
    r = theirs(ref, [prompt], canvas)
    o, _ = ours(model, [prompt], canvas)
    assert_logits_match(r, o, exact=True)
    sc = r / 0.5
    assert_logits_match(theirs(ref, [prompt], canvas, sc), ours(model, [prompt], canvas, sc)[0], exact=True)


def test_prompt_longer_than_sliding_window(pair):
    ref, model = pair  # sliding_window = 8
    rng = np.random.default_rng(2)
    prompt, canvas = ids(rng, 1, 37), ids(rng, 1, 16)
    o, cache = ours(model, [prompt], canvas)
    assert_logits_match(theirs(ref, [prompt], canvas), o)
    # sliding layers keep only window - 1 tokens, full layers keep everything
    assert cache[0].keys.shape[2] == 7 and cache[2].offset == 37 and cache.offset == 37


def test_chunked_prefill_equals_single_prefill(decisive_pair):
    _, model = decisive_pair
    rng = np.random.default_rng(3)
    prompt, canvas = ids(rng, 1, 29), ids(rng, 1, 16)
    whole, _ = ours(model, [prompt], canvas)
    chunked, _ = ours(model, [prompt[:, :5], prompt[:, 5:6], prompt[:, 6:19], prompt[:, 19:]], canvas)
    assert_same_network_output(chunked, whole)


def test_several_committed_canvases_extend_the_cache(pair):
    ref, model = pair
    rng = np.random.default_rng(4)
    chunks = [ids(rng, 1, 9)] + [ids(rng, 1, 16) for _ in range(3)]
    canvas = ids(rng, 1, 16)
    for n in range(1, len(chunks) + 1):
        o, cache = ours(model, chunks[:n], canvas)
        assert_logits_match(theirs(ref, chunks[:n], canvas), o)
    assert cache.offset == 9 + 3 * 16


def test_batch_of_two(pair):
    ref, model = pair
    rng = np.random.default_rng(5)
    prompt, canvas = ids(rng, 2, 12), ids(rng, 2, 16)
    o, _ = ours(model, [prompt], canvas)
    assert_logits_match(theirs(ref, [prompt], canvas), o)
    # each row equals its solo run
    solo, _ = ours(model, [prompt[1:]], canvas[1:])
    assert_same_network_output(o[1:], solo)


def test_denoise_never_changes_the_cache(pair):
    _, model = pair
    rng = np.random.default_rng(6)
    cache = model.make_cache()
    model.encode(mx.array(ids(rng, 1, 10)), cache)
    before = [np.array(c.prefix()[0]) for c in cache]
    a = np.array(model.denoise(mx.array(ids(rng, 1, 16)), cache))
    model.denoise(mx.array(ids(rng, 1, 16)), cache)
    assert cache.offset == 10
    for c, b in zip(cache, before):
        np.testing.assert_array_equal(np.array(c.prefix()[0]), b)
    assert a.dtype == np.float32 and np.abs(a).max() <= 30.0  # soft-capped


@pytest.mark.parametrize("prefix", ["encoder", "both"])
def test_checkpoint_prefixes_load_the_same_model(pair, prefix, tmp_path):
    ref, model = pair
    other, _ = load_model(save_checkpoint(ref, tmp_path, prefix=prefix))
    rng = np.random.default_rng(7)
    prompt, canvas = ids(rng, 1, 10), ids(rng, 1, 16)
    np.testing.assert_array_equal(ours(other, [prompt], canvas)[0], ours(model, [prompt], canvas)[0])


def test_encoder_and_decoder_layer_scalars_are_separate(pair):
    ref, model = pair
    for i, layer in enumerate(model.layers):
        enc = ref.model.encoder.language_model.layers[i].layer_scalar.item()
        dec = ref.model.decoder.layers[i].layer_scalar.item()
        assert abs(enc - dec) > 0.1
        assert abs(layer.encoder_layer_scalar.item() - enc) < 1e-6
        assert abs(layer.layer_scalar.item() - dec) < 1e-6


def test_swapping_layer_scalars_breaks_the_match(tmp_path):
    """The scalars are used where they belong: loading them the wrong way round differs."""
    ref = build_reference(tiny_config(), seed=2)
    model, _ = load_model(save_checkpoint(ref, tmp_path))
    rng = np.random.default_rng(8)
    prompt, canvas = ids(rng, 1, 10), ids(rng, 1, 16)
    good, _ = ours(model, [prompt], canvas)
    for layer in model.layers:
        layer.layer_scalar, layer.encoder_layer_scalar = layer.encoder_layer_scalar, layer.layer_scalar
    bad, _ = ours(model, [prompt], canvas)
    assert np.abs(good - bad).max() > 1e-2


def test_both_config_forms(tmp_path):
    """per_layer_config (transformers' save_pretrained) and global_head_dim keys (released checkpoint)."""
    ref = build_reference(tiny_config(), seed=3)
    path = save_checkpoint(ref, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    assert "per_layer_config" in cfg["text_config"]
    a = ModelArgs.from_config(cfg)
    text = dict(cfg["text_config"])
    del text["per_layer_config"]
    text.update(global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True)
    b = ModelArgs.from_config({**cfg, "text_config": text})
    for args in (a, b):
        assert (args.full_head_dim, args.full_kv_heads, args.head_dim, args.num_key_value_heads) == (32, 1, 16, 2)
        assert args.canvas_length == 16 and args.eos_token_ids == [1, 106, 50]
    # the released checkpoint's values
    real = ModelArgs.from_config({
        "model_type": "diffusion_gemma", "canvas_length": 256,
        "text_config": {"hidden_size": 2816, "num_hidden_layers": 30, "global_head_dim": 512,
                        "num_global_key_value_heads": 2, "attention_k_eq_v": True, "head_dim": 256,
                        "num_key_value_heads": 8, "sliding_window": 1024}})
    assert real.layer_types[5] == "full_attention" and real.layer_types[4] == "sliding_attention"
    assert real.layer_head_dim(29) == 512 and real.layer_kv_heads(29) == 2 and real.layer_kv_heads(0) == 8


def test_reference_config_reads_as_its_mlx_twin():
    """The harness's transformers config, as save_checkpoint writes it, loads into the same
    text model as the builder's config.json that tests/test_model_speedups.py builds from."""
    saved = json.loads(json.dumps(tiny_config().to_dict(), default=str))
    ours = vars(ModelArgs.from_dict(tiny.reference_config(canvas_length=16)))
    theirs = vars(ModelArgs.from_dict(saved))
    assert theirs["vision_config"] is not None and ours["vision_config"] is None  # the harness adds a tower
    vision = ("vision_config", "image_token_id", "boi_token_id", "eoi_token_id")
    assert {k: v for k, v in theirs.items() if k not in vision} == {k: v for k, v in ours.items() if k not in vision}
