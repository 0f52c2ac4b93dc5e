"""The prefix KV cache that the encoder writes and the decoder only reads (it lives in
the model file, models/diffusion_gemma.py, so that the file lifts into mlx-lm alone)."""

from .models.diffusion_gemma import FullCache, PrefixCache, SlidingCache, make_prefix_cache

__all__ = ["FullCache", "PrefixCache", "SlidingCache", "make_prefix_cache"]
