"""Images in the prompt: the encoder's logits and the full generate against transformers.

A tiny random model whose image token ids lie inside its vocabulary. The image's soft
tokens replace the image-token embeddings; with ``use_bidirectional_attention: "vision"``
an image's tokens also see each other both ways, past the sliding window (12 soft tokens,
window 8). Without it the encoder stays causal.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from transformers.cache_utils import DynamicCache  # noqa: E402

from mlx_dgemma import load_model  # noqa: E402
from mlx_dgemma.drafter import DenoiseSettings  # noqa: E402
from mlx_dgemma.generate import generate_blocks  # noqa: E402
from tests.reference.compare import assert_logits_match  # noqa: E402
from tests.reference.hf_reference import TINY_IMAGE_TOKENS, build_reference, save_checkpoint, tiny_config  # noqa: E402
from tests.test_generate import L, run_ours, run_reference  # noqa: E402
from tests.test_vision import grid  # noqa: E402

pytestmark = pytest.mark.reference

BOI, IMG, EOI = (TINY_IMAGE_TOKENS[k] for k in ("boi_token_id", "image_token_id", "eoi_token_id"))


@pytest.fixture(scope="module", params=["vision", None], ids=["bidirectional", "causal"])
def pair(request, tmp_path_factory):
    cfg = tiny_config(canvas_length=L, top_k_experts=8, use_bidirectional_attention=request.param,
                      top_level=TINY_IMAGE_TOKENS)
    ref = build_reference(cfg, seed=5).cpu()
    with torch.no_grad():  # as tests/test_generate.py: peakier logits, tame self-conditioning
        ref.model.decoder.embed_tokens.weight.mul_(3.0)
        ref.model.decoder.self_conditioning.down_proj.weight.mul_(0.02)
    model, _ = load_model(save_checkpoint(ref, tmp_path_factory.mktemp("vprompt")))
    return ref, model, request.param


def prompt_with_images(images, seed=0):
    """text, image 1, text, image 2, text: each image as boi + n image tokens + eoi."""
    r = np.random.RandomState(seed)
    ids = list(r.randint(3, BOI, 5))
    for patches, _ in images:
        ids += [BOI] + [IMG] * (len(patches) // 9) + [EOI] + list(r.randint(3, BOI, 4))
    return np.array([ids])


def reference_inputs(images, ids):
    P = max(len(p) for p, _ in images)
    pv = np.zeros((len(images), P, 768), np.float32)
    pp = -np.ones((len(images), P, 2), np.int64)
    for i, (p, pos) in enumerate(images):
        pv[i, : len(p)], pp[i, : len(pos)] = p, pos
    return dict(pixel_values=torch.tensor(pv), image_position_ids=torch.tensor(pp),
                mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)))


def our_features(model, images):
    return mx.concatenate([model.image_features(p, pos) for p, pos in images])


IMAGES = [grid(9, 12, 0), grid(6, 3, 1)]  # 12 and 2 soft tokens


@pytest.mark.parametrize("chunk", [512, 5])
def test_encoder_logits_with_images_match_transformers(pair, chunk, monkeypatch):
    ref, model, mode = pair
    ids = prompt_with_images(IMAGES)
    with torch.no_grad():
        cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
        h = ref.model.encoder(input_ids=torch.tensor(ids).long(), cache=cache, position_ids=torch.arange(ids.shape[1])[None],
                              **reference_inputs(IMAGES, ids)).last_hidden_state
        x = ref.lm_head(h).float()
        want = (torch.tanh(x / ref.final_logit_softcapping) * ref.final_logit_softcapping).numpy()
    # chunks of 5 would cut the first image: its 12 tokens stay in one pass
    monkeypatch.setattr(model, "prefill_chunk", chunk)
    got = np.array(model.encode(mx.array(ids), model.make_cache(), return_logits=True,
                                image_features=our_features(model, IMAGES)))
    assert got.shape == want.shape
    assert_logits_match(want, got, exact=True)
    # the images matter: the same prompt with the image-token embeddings differs
    plain = np.array(model.encode(mx.array(ids), model.make_cache(), return_logits=True))
    assert np.abs(plain - want).max() > 100 * np.abs(got - want).max()


def test_bidirectional_mask_matters(pair):
    """With "vision", an image's first token sees the later ones: its logits change when a
    later soft token changes. Causal: they do not."""
    ref, model, mode = pair
    ids = prompt_with_images(IMAGES[:1])
    feats = our_features(model, IMAGES[:1])
    first = 6  # 5 text tokens, boi, then the first image token
    a = np.array(model.encode(mx.array(ids), model.make_cache(), True, image_features=feats))[0, first]
    changed = mx.concatenate([feats[:-1], feats[-1:] * 2])
    b = np.array(model.encode(mx.array(ids), model.make_cache(), True, image_features=changed))[0, first]
    assert (np.abs(a - b).max() > 1e-3) == (mode == "vision")


def test_generate_with_image_matches_reference_under_shared_noise(pair, monkeypatch):
    ref, model, mode = pair
    ids = prompt_with_images(IMAGES, seed=1)
    V = ref.config.text_config.vocab_size
    s = DenoiseSettings(max_denoising_steps=8, entropy_bound=0.5, t_min=0.4, t_max=0.8,
                        stability_threshold=0, confidence_threshold=1.0)
    feats = our_features(model, IMAGES)
    ours = np.concatenate([b.tokens for b in generate_blocks(
        model, ids, settings=s, max_tokens=3 * L, seeds=[4], eos_token_ids=[], pad_token_id=0,
        image_features=feats)], -1)
    seq, _, _ = run_reference(ref, monkeypatch, ids, V, s, 3, eos=[], seeds=[4], **reference_inputs(IMAGES, ids))
    np.testing.assert_array_equal(ours, seq)
    # and the image changed the answer
    text_only, _ = run_ours(model, ids, s, 3, eos=[], seeds=[4])
    assert (text_only != ours).any()
