"""Images in a prompt: process them, run the vision tower, place their tokens.

The chat template writes one ``image_token_id`` per image (Gemma 4's ``<|image|>``);
:func:`expand_image_tokens` replaces each with ``boi`` + one image token per soft token
+ ``eoi``, as Gemma 4's processor does, and the encoder swaps those image tokens'
embeddings for the tower's soft tokens (``Model.encode(image_features=...)``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx

from .image_processor import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SOFT_TOKENS, ImageError, ImageInput, process_image


def check_vision(model) -> None:
    """A one-line ImageError when ``model`` cannot read images."""
    if not getattr(model, "has_vision", False):
        where = getattr(model, "path", None)
        raise ImageError(f"{where or 'this model'}: a text-only model folder (no vision tower): it cannot read images")
    if model.args.image_token_id is None or model.args.boi_token_id is None or model.args.eoi_token_id is None:
        raise ImageError("config.json: image_token_id, boi_token_id and eoi_token_id are needed to read images")


def max_soft_tokens_of(model) -> int:
    """The folder's processor_config.json ``image_processor.max_soft_tokens`` (or its
    top-level one), else Gemma 4's default of 280."""
    path = getattr(model, "path", None)
    f = Path(path) / "processor_config.json" if path else None
    if f is not None and f.is_file():
        try:
            cfg = json.loads(f.read_text())
            cfg = cfg.get("image_processor", cfg)
            return int(cfg.get("max_soft_tokens", DEFAULT_MAX_SOFT_TOKENS))
        except (ValueError, AttributeError, TypeError):
            pass
    return DEFAULT_MAX_SOFT_TOKENS


def prepare_images(model, images: Sequence[ImageInput], max_pixels: Optional[int] = None,
                   max_soft_tokens: Optional[int] = None) -> Tuple[mx.array, List[int]]:
    """(soft tokens of every image, concatenated [n, hidden]; soft-token count per image)."""
    check_vision(model)
    max_pixels = max_pixels or DEFAULT_MAX_PIXELS
    vision = model.model.encoder.vision_tower.args
    budget = max_soft_tokens or max_soft_tokens_of(model)
    processed = [process_image(im, vision.patch_size, vision.pooling_kernel_size, budget, max_pixels)
                 for im in images]  # every image checked before the tower runs
    feats = [model.image_features(p.patches, p.positions) for p in processed]
    return mx.concatenate(feats), [p.num_soft_tokens for p in processed]


def expand_image_tokens(ids: Sequence[int], counts: Sequence[int], args) -> List[int]:
    """Each ``image_token_id`` placeholder in ``ids`` (one per image, in order) becomes
    ``boi``, ``counts[i]`` image tokens and ``eoi``."""
    image = args.image_token_id
    found = sum(1 for t in ids if t == image)
    if found != len(counts):
        raise ImageError(f"the prompt has {found} image placeholders for {len(counts)} images "
                         "(one image part per image; the tokenizer must know the image token)")
    out: List[int] = []
    i = 0
    for t in ids:
        if t == image:
            out += [args.boi_token_id] + [image] * counts[i] + [args.eoi_token_id]
            i += 1
        else:
            out.append(int(t))
    return out


def with_image_parts(prompt, n_images: int):
    """A string prompt -> one user message with ``n_images`` image parts before the text
    (Gemma 4's recommended order); chat messages pass through."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]}]
    return prompt
