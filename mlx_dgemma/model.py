"""The network, for the rest of mlx_dgemma: the model file (models/diffusion_gemma.py,
mlx-lm's shape, liftable into mlx-lm as is) plus what only this package adds to a built
model: the vision tower (mlx-lm is text-only) and the backend's fast paths (backend.py).

API (stable; the drafter, generate and the server call it):
  make_cache() -> PrefixCache; encode(tokens [B, T], cache, return_logits=False)
  (-> the encoder's next-token logits [B, T, V] when asked); model(tokens, cache) (the
  same, logits always); denoise(canvas [B, L], cache, self_conditioning_logits=None,
  self_conditioning_embeddings=None) -> float32 logits [B, L, V]; hidden(...) (same
  arguments) -> final hidden states; lm_head(h); soft_embeddings(probs); embed(tokens);
  sanitize(weights); quant_predicate.
"""

from __future__ import annotations

from .models.diffusion_gemma import (  # noqa: F401  (re-exported for the house)
    Attention,
    CacheArg,
    DecoderLayer,
    DecoderStep,
    Experts,
    ImageMask,
    Model,
    ModelArgs,
    RMSNormNoScale,
    SoftCap,
    decoder_prefixes,
    encoder_mask,
    geglu,
    image_groups,
    image_mask,
    image_runs_end,
    softcap,
)
from .vision import VisionArgs, VisionParts


def build_model(args: ModelArgs) -> Model:
    """The model for ``args``, with the vision tower attached when ``args`` names one
    (as ``model.model.encoder``: the checkpoint's ``model.encoder.*`` keys). Plain paths:
    ``backend.defaults(model)`` switches the device's fast ones on after loading."""
    model = Model(args)
    if args.vision_config is not None:
        model.model.encoder = VisionParts(VisionArgs.from_dict(args.vision_config), args.hidden_size)
    return model
