"""The PyTorch reference harness: tiny random DiffusionGemma models in transformers.

Runs on CUDA when a GPU is present, else on the CPU. Everything here builds models from
configs; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
from transformers.cache_utils import DynamicCache

from mlx_dgemma.config import small_vision_config
from tests.fixtures import tiny

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The tiny model's configs, from the one builder of small configs: the text model through
# tests/fixtures/tiny.py (tests/test_model_speedups.py's MLX model shares it), the vision
# tower at small_vision_config's sizes.
TINY_TEXT = tiny.reference_config()["text_config"]
TINY_VISION = small_vision_config()


# Image tokens inside the tiny vocabulary (the released ids are past 258,000).
TINY_IMAGE_TOKENS = dict(boi_token_id=150, image_token_id=151, eoi_token_id=152)


def tiny_config(canvas_length: int = 16, vision: Optional[dict] = None, top_level: Optional[dict] = None,
                **text_overrides) -> DiffusionGemmaConfig:
    """``vision``: overrides of TINY_VISION; ``top_level``: keys beside text_config (image
    token ids: TINY_IMAGE_TOKENS)."""
    text = {**TINY_TEXT, **text_overrides}
    return DiffusionGemmaConfig(text_config=text, vision_config={**TINY_VISION, **(vision or {})},
                                canvas_length=canvas_length, **(top_level or {}))


def build_reference(config: DiffusionGemmaConfig, seed: int = 0,
                    distinct_scalars: bool = True) -> DiffusionGemmaForBlockDiffusion:
    """A float32 model with every weight random (norm weights around 1).

    ``distinct_scalars`` makes the encoder's and decoder's layer scalars differ. For
    routing without near-ties (exact checks), build the config with
    ``top_k_experts == num_experts``: every expert is used and top-k is continuous.
    """
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config).eval().to(torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("router.scale"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("per_expert_scale"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5))
        vision = model.model.encoder.vision_tower
        if getattr(vision.config, "standardize", False):  # buffers, left uninitialised by torch
            vision.std_bias.copy_(0.1 * torch.randn(vision.std_bias.shape, generator=g))
            vision.std_scale.copy_(1.0 + 0.2 * torch.randn(vision.std_scale.shape, generator=g))
        for name, b in vision.named_buffers():
            if name.endswith(("input_min", "output_min")):  # clipped linears: finite bounds
                b.fill_(-1.5)
            elif name.endswith(("input_max", "output_max")):
                b.fill_(1.5)
        enc_layers = model.model.encoder.language_model.layers
        for enc, dec in zip(enc_layers, model.model.decoder.layers):
            dec.layer_scalar.copy_(0.5 + torch.rand(dec.layer_scalar.shape, generator=g))
            enc.layer_scalar.copy_(dec.layer_scalar + (0.3 if distinct_scalars else 0.0))
    return model.to(DEVICE)


def save_checkpoint(model: DiffusionGemmaForBlockDiffusion, path: Path, prefix: str = "decoder",
                    shards: int = 2, extra_config: Optional[dict] = None) -> Path:
    """Write an HF-style folder with the shared weights under ``prefix``.

    ``decoder``: what transformers' save_pretrained writes (shared weights once, under
    model.decoder); ``encoder``: shared weights under model.encoder.language_model;
    ``both``: both copies. The encoder's layer scalars are always written.
    """
    from mlx_dgemma.folder import write_model_folder

    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    enc, dec = "model.encoder.language_model.", "model.decoder."
    out = {}
    for k, v in sd.items():
        if k == "lm_head.weight":
            continue
        if k.startswith(enc):
            if k.endswith("layer_scalar") or prefix in ("encoder", "both"):
                out[k] = v
            continue
        if k.startswith(dec):
            rest = k[len(dec):]
            shared = not rest.startswith("self_conditioning") and not rest.endswith("layer_scalar")
            if shared and prefix == "encoder":
                continue
            out[k] = v
            continue
        out[k] = v
    cfg = model.config.to_dict()
    cfg.update(extra_config or {})
    cfg = json.loads(json.dumps(cfg, default=str))
    return write_model_folder(path, cfg, {k: _to_mlx(v) for k, v in out.items()}, shards=shards)


def _to_mlx(t: torch.Tensor):
    import mlx.core as mx

    if t.dtype == torch.bfloat16:  # NumPy has no bfloat16
        return mx.array(t.float().numpy()).astype(mx.bfloat16)
    return mx.array(t.numpy())


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), device=DEVICE)


@torch.no_grad()
def reference_encode(model, chunks: Sequence, cache: Optional[DynamicCache] = None) -> DynamicCache:
    """Encode token chunks [B, T_i] one after the other into an HF cache (causal encoder)."""
    if cache is None:
        cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    for ids in chunks:
        ids = _t(ids).long()
        offset = cache.get_seq_length()
        pos = torch.arange(offset, offset + ids.shape[1], device=DEVICE)[None]
        model.model.encoder(input_ids=ids, cache=cache, position_ids=pos)
    return cache


@torch.no_grad()
def reference_denoise(model, canvas, cache: DynamicCache, self_conditioning_logits=None) -> np.ndarray:
    """Decoder logits [B, L, V] (float32, soft-capped) for ``canvas``; the cache is only read."""
    sc = None if self_conditioning_logits is None else _t(self_conditioning_logits).float()
    out = model(decoder_input_ids=_t(canvas).long(), cache=cache, self_conditioning_logits=sc)
    return out.logits.float().cpu().numpy()
