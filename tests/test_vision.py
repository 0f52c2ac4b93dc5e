"""The vision tower and the multimodal embedder against transformers' Gemma 4 vision model.

Tiny random float32 configs; the soft tokens are compared relative to their scale with the
bounds of tests/reference/compare.py (float32 rounding, not this CPU).
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mlx_dgemma import load_model  # noqa: E402
from mlx_dgemma.folder import write_model_folder  # noqa: E402
from mlx_dgemma.kernels import cpu as cpu_kernels  # noqa: E402
from tests.reference.compare import MEDIAN_RTOL, ATOL, bound  # noqa: E402
from tests.reference.hf_reference import TINY_IMAGE_TOKENS, build_reference, save_checkpoint, tiny_config  # noqa: E402

pytestmark = pytest.mark.reference

VARIANTS = {
    "plain": {},
    # the released tower's optional parts: clamped linears, standardised soft tokens, two layers
    "clipped_standardized": dict(use_clipped_linears=True, standardize=True, num_hidden_layers=2),
}


def grid(ph: int, pw: int, seed: int):
    """Random patches [ph * pw, 3 * 16 * 16] in [0, 1] and their (x, y) positions, row-major."""
    rs = np.random.RandomState(seed)
    patches = rs.rand(ph * pw, 3 * 16 * 16).astype(np.float32)
    gx, gy = np.meshgrid(np.arange(pw), np.arange(ph), indexing="xy")
    return patches, np.stack([gx, gy], -1).reshape(-1, 2)


def reference_features(ref, images, max_patches: int) -> list:
    """transformers' soft tokens for a padded batch of images, split per image."""
    pv = np.zeros((len(images), max_patches, 768), np.float32)
    pp = -np.ones((len(images), max_patches, 2), np.int64)
    for i, (patches, pos) in enumerate(images):
        pv[i, : len(patches)], pp[i, : len(pos)] = patches, pos
    with torch.no_grad():
        out = ref.model.encoder.get_image_features(torch.tensor(pv), torch.tensor(pp)).pooler_output.numpy()
    sizes = [len(p) // 9 for p, _ in images]
    return np.split(out.reshape(sum(sizes), -1), np.cumsum(sizes)[:-1])


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    cfg = tiny_config(vision=VARIANTS[request.param], top_level=TINY_IMAGE_TOKENS)
    ref = build_reference(cfg, seed=3).cpu()
    model, _ = load_model(save_checkpoint(ref, tmp_path_factory.mktemp("vision")))
    return ref, model


@pytest.mark.parametrize("c_attention", [False, True], ids=["sdpa", "c_kernel"])
def test_soft_tokens_match_reference(pair, c_attention):
    ref, model = pair
    assert model.has_vision
    if c_attention and not cpu_kernels.attention_available():
        pytest.skip("the C attention kernel is not built here (or no CBLAS sgemm)")
    # three aspect ratios; the reference pads them into one batch (its padding masked)
    images = [grid(6, 9, 0), grid(9, 6, 1), grid(3, 3, 2)]
    want = reference_features(ref, images, max_patches=81)
    from mlx_dgemma import backend

    before = backend.settings(model)["attention"]
    backend.configure(model, attention=c_attention)
    try:
        attn = model.model.encoder.vision_tower.encoder.layers[0].self_attn
        assert isinstance(attn, backend.KernelVisionAttention) == c_attention
        got = [np.array(model.image_features(patches, pos)) for patches, pos in images]
    finally:
        backend.configure(model, attention=before)
    for (patches, _), ours, w in zip(images, got, want):
        assert ours.shape == w.shape == (len(patches) // 9, 64)
        diff = np.abs(ours - w)
        scale = float(np.abs(w).max())
        assert diff.max() <= bound(w), f"max |diff| {diff.max():.2e} > {bound(w):.2e} (scale {scale:.3g})"
        assert np.median(diff) <= ATOL + MEDIAN_RTOL * scale


def test_folder_without_vision_weights_is_text_only(tmp_path):
    """A config naming a vision tower with no vision weights in the folder loads text-only,
    and then refuses images with a one-line error."""
    ref = build_reference(tiny_config(top_level=TINY_IMAGE_TOKENS), seed=0).cpu()
    path = save_checkpoint(ref, tmp_path / "with")
    cfg = json.loads((path / "config.json").read_text())
    weights = {}
    for f in sorted(path.glob("*.safetensors")):
        weights.update({k: v for k, v in mx.load(str(f)).items() if not k.startswith("model.encoder.vision")
                        and not k.startswith("model.encoder.embed_vision")})
    text_only = write_model_folder(tmp_path / "text", cfg, weights, shards=1)
    model, _ = load_model(text_only)
    assert not model.has_vision
    with pytest.raises(ValueError, match="no vision tower"):
        model.image_features(*grid(3, 3, 0))


def test_converted_folders_load_with_vision(pair, tmp_path):
    """Our 4-bit conversion keeps the tower in float (unchanged: the same soft tokens), and a
    folder whose tower's linears are stored at 8 bits (mlx-lm layout: .scales/.biases)
    loads too, its soft tokens within 8-bit quantization error."""
    from mlx_dgemma.convert import convert

    ref, model = pair
    src = tmp_path / "hf"
    save_checkpoint(ref, src)
    images = [grid(6, 9, 0), grid(3, 3, 2)]
    want = [np.array(model.image_features(p, pos)) for p, pos in images]

    q4 = tmp_path / "q4"
    convert(src, q4, quantize=True, q_bits=4, log=lambda s: None, progress=False)
    converted, _ = load_model(q4)
    assert converted.has_vision
    for (p, pos), w in zip(images, want):
        np.testing.assert_array_equal(np.array(converted.image_features(p, pos)), w)

    # the tower's linears at 8 bits, written by hand the way mlx-lm stores quantized layers
    cfg = json.loads((q4 / "config.json").read_text())
    weights = {}
    for f in sorted(q4.glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    for k in [k for k in weights if k.startswith("model.encoder.") and k.endswith(".weight") and weights[k].ndim == 2]:
        wq, scales, biases = mx.quantize(weights[k], group_size=32, bits=8)
        weights[k], weights[k[:-len("weight")] + "scales"], weights[k[:-len("weight")] + "biases"] = wq, scales, biases
    q8 = write_model_folder(tmp_path / "vision8", cfg, weights, shards=1)
    quantized, _ = load_model(q8)
    assert quantized.model.encoder.embed_vision.embedding_projection.bits == 8
    for (p, pos), w in zip(images, want):
        got = np.array(quantized.image_features(p, pos))
        rel = np.abs(got - w).max() / np.abs(w).max()
        assert 0 < rel < 0.05, rel
