"""DiffusionGemma (Google's block-diffusion Gemma 4) in mlx-lm's shape.

One set of weights, two passes. ``encode`` runs the network causally over new tokens
and appends their K/V to the prefix cache (``Model.__call__`` is encode returning the
encoder's next-token logits, so mlx-lm's ``generate_step`` decodes with it
autoregressively). ``denoise`` runs the same layers bidirectionally over a canvas that
sees the whole cache, returns float32 soft-capped logits and never writes the cache.

This file imports only mlx, mlx.nn, mlx_lm and the standard library, so that it can be
copied into ``mlx_lm/models/diffusion_gemma.py`` as is. It holds the plain, traceable
computation on every device; faster paths for one backend (C kernels, host soft-cap,
grouped experts, compiled decoder steps) are applied from outside, after construction,
by swapping modules (mlx_dgemma/backend.py).

The module tree mirrors the checkpoint's key names (``model.decoder.…``), so the
Hugging Face layout and mlx-community's conversions load with only the expert split in
``sanitize``. The encoder's layer scalars are the only weights not shared with the
decoder; they live beside the decoder's as ``encoder_layer_scalar``. The vision tower,
when a checkpoint has one, is not built here (mlx-lm is text-only): a loader may attach
it as ``model.model.encoder`` before loading the weights, and ``sanitize`` then keeps
its keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.models.cache import KVCache
from mlx_lm.models.rope_utils import initialize_rope
from mlx_lm.models.switch_layers import SwitchGLU

MODEL_TYPES = ("diffusion_gemma", "diffusion_gemma_text")


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "diffusion_gemma"
    hidden_size: int = 2816
    num_hidden_layers: int = 30
    intermediate_size: int = 2112
    num_attention_heads: int = 16
    head_dim: int = 256
    num_key_value_heads: int = 8
    full_head_dim: Optional[int] = None
    full_kv_heads: Optional[int] = None
    rms_norm_eps: float = 1e-6
    vocab_size: int = 262144
    sliding_window: int = 1024
    layer_types: Optional[List[str]] = None
    rope_parameters: Optional[Dict[str, Dict[str, Any]]] = None
    max_position_embeddings: int = 262144
    final_logit_softcapping: Optional[float] = 30.0
    num_experts: int = 128
    top_k_experts: int = 8
    moe_intermediate_size: int = 704
    canvas_length: int = 256
    pad_token_id: int = 0
    eos_token_id: Union[int, List[int], None] = 1
    bos_token_id: int = 2
    attention_bias: bool = False
    hidden_activation: str = "gelu_pytorch_tanh"
    # Images (None: a text-only model). ``vision_config`` is Gemma 4's vision config as
    # written in config.json; image tokens are replaced by the tower's soft tokens, and
    # with ``use_bidirectional_attention == "vision"`` they attend to each other both ways.
    vision_config: Optional[Dict[str, Any]] = None
    image_token_id: Optional[int] = None
    boi_token_id: Optional[int] = None
    eoi_token_id: Optional[int] = None
    use_bidirectional_attention: Optional[str] = None

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = [
                "full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                for i in range(self.num_hidden_layers)
            ]
        # The reference forces the last layer to full attention.
        self.layer_types = list(self.layer_types)
        self.layer_types[-1] = "full_attention"
        if self.rope_parameters is None:
            self.rope_parameters = {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {
                    "rope_type": "proportional",
                    "partial_rotary_factor": 0.25,
                    "rope_theta": 1_000_000.0,
                },
            }
        if self.full_head_dim is None:
            self.full_head_dim = 512
        if self.full_kv_heads is None:
            self.full_kv_heads = self.num_key_value_heads
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_approx"):
            raise ValueError(
                f"hidden_activation {self.hidden_activation!r} is not supported "
                "(DiffusionGemma uses 'gelu_pytorch_tanh')"
            )

    def layer_head_dim(self, i: int) -> int:
        return self.full_head_dim if self.is_full(i) else self.head_dim

    def layer_kv_heads(self, i: int) -> int:
        return self.full_kv_heads if self.is_full(i) else self.num_key_value_heads

    def is_full(self, i: int) -> bool:
        return self.layer_types[i] == "full_attention"

    @property
    def eos_token_ids(self) -> List[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    @classmethod
    def from_dict(cls, params: Dict[str, Any]) -> "ModelArgs":
        """From config.json as written (mlx-lm's loader calls this): the text model nested
        under ``text_config`` or at the top level, and the full layers' head size and K/V
        heads in either form (the released checkpoint's ``global_head_dim`` /
        ``num_global_key_value_heads``, or the ``per_layer_config`` map that transformers
        5.24 ``save_pretrained`` writes), normalised into ``full_head_dim``/``full_kv_heads``."""
        if "text_config" not in params and "full_head_dim" in params:
            return super().from_dict(params)  # already normalised
        return cls.from_config(params)

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "ModelArgs":
        """Build from a DiffusionGemma config dict (top-level or text config)."""
        model_type = config.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type is {model_type!r}, expected one of {', '.join(MODEL_TYPES)}")
        text = dict(config.get("text_config") or config)
        text.setdefault("canvas_length", config.get("canvas_length", 256))
        for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
            if key not in text and key in config:
                text[key] = config[key]
        for key in ("vision_config", "image_token_id", "boi_token_id", "eoi_token_id"):
            if key in config and config.get("text_config") is not None:
                text[key] = config[key]
        layer_types = text.get("layer_types")
        if layer_types is None:
            num_layers = text.get("num_hidden_layers", cls.num_hidden_layers)
            layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(num_layers)]
            layer_types[-1] = "full_attention"
        # Form 1: per_layer_config {"29": {"head_dim": 512, "num_key_value_heads": 2}}.
        plc = text.get("per_layer_config") or {}
        full_overrides = [
            v for k, v in plc.items()
            if str(k).isdigit() and int(k) < len(layer_types) and layer_types[int(k)] == "full_attention"
        ]
        full_head_dim = next((o["head_dim"] for o in full_overrides if "head_dim" in o), None)
        full_kv = next((o["num_key_value_heads"] for o in full_overrides if "num_key_value_heads" in o), None)
        # Form 2: global_head_dim / num_global_key_value_heads (/ attention_k_eq_v).
        if full_head_dim is None:
            full_head_dim = text.get("global_head_dim", 512)
        if full_kv is None and text.get("attention_k_eq_v", True):
            full_kv = text.get("num_global_key_value_heads")
        text.update(full_head_dim=full_head_dim, full_kv_heads=full_kv, layer_types=layer_types,
                    model_type="diffusion_gemma")
        return super().from_dict(text)


# -- the prefix KV cache ---------------------------------------------------------------
# The encoder writes it and the decoder only reads it. Full-attention layers keep every
# token (mlx-lm's KVCache). Sliding layers keep only the last ``sliding_window - 1``
# tokens, exactly as the reference's DynamicSlidingWindowLayer: that is all a future
# query can see through the window, and all the decoder is shown.
#
# Trimming (verified decoding drops a rejected draft tail): a full layer just moves its
# offset back. A sliding layer cannot bring back tokens that scrolled out of its window,
# so ``PrefixCache.reserve_trim(n)`` makes its sliding layers keep up to ``n`` tokens of
# history beyond the window; ``trim(k <= n)`` then restores exactly the state that
# encoding the kept tokens alone would have left.

class FullCache(KVCache):
    """Grows without bound; ``prefix()`` is what the decoder attends to.

    ``version`` changes whenever the stored K/V may have changed (append, trim, state
    load): the decoder keeps per-block work (prefix views, compiled step) keyed by it.
    """

    version = 0

    @property
    def state(self):
        return super().state

    @state.setter
    def state(self, v):
        KVCache.state.fset(self, v)
        self.version += 1

    def trim(self, n):
        self.version += 1
        return super().trim(n)

    def prefix(self) -> Tuple[Optional[mx.array], Optional[mx.array]]:
        if self.keys is None:
            return None, None
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def append(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Store new K/V; return every cached K/V including the new ones."""
        self.version += 1
        return self.update_and_fetch(keys, values)


class SlidingCache:
    """Keeps the last ``window - 1`` tokens (plus ``history`` more for ``trim``);
    ``offset`` counts every token seen."""

    def __init__(self, window: int, history: int = 0):
        self.window = window
        self.history = history  # extra tokens kept so that trim() can restore them
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0
        self.version = 0  # see FullCache.version

    def _last(self, n: int) -> Tuple[Optional[mx.array], Optional[mx.array]]:
        if self.keys is None or self.keys.shape[2] <= n:
            return self.keys, self.values
        start = self.keys.shape[2] - n
        return self.keys[..., start:, :], self.values[..., start:, :]

    def prefix(self) -> Tuple[Optional[mx.array], Optional[mx.array]]:
        """The last ``window - 1`` tokens: what the decoder attends to."""
        return self._last(self.window - 1)

    @property
    def length(self) -> int:
        """Tokens the decoder sees (at most ``window - 1``)."""
        return 0 if self.keys is None else min(self.keys.shape[2], self.window - 1)

    def append(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Store new K/V; return the cached window followed by the new K/V.

        The encoder masks the returned keys with the sliding window itself.
        """
        self.offset += keys.shape[2]
        self.version += 1
        old_k, old_v = self._last(self.window - 1)
        if self.keys is not None:
            all_k = mx.concatenate([self.keys, keys], axis=2)
            all_v = mx.concatenate([self.values, values], axis=2)
            if old_k is self.keys:  # no history beyond the window: the same arrays
                keys, values = all_k, all_v
            else:
                keys = mx.concatenate([old_k, keys], axis=2)
                values = mx.concatenate([old_v, values], axis=2)
        else:
            all_k, all_v = keys, values
        keep = max(self.window - 1, 0) + self.history
        start = max(all_k.shape[2] - keep, 0)
        self.keys, self.values = all_k[..., start:, :], all_v[..., start:, :]
        return keys, values

    def trimmable(self) -> int:
        """How many of the last tokens ``trim`` can drop."""
        stored = 0 if self.keys is None else self.keys.shape[2]
        if stored >= self.offset:  # nothing has scrolled out yet
            return self.offset
        # after dropping n, the window's min(offset - n, window - 1) tokens must remain
        return max(stored - max(self.window - 1, 0), 0)

    def trim(self, n: int) -> int:
        """Drop the last ``n`` tokens (at most ``trimmable()``); returns ``n``."""
        if n > self.trimmable():
            raise ValueError(f"sliding cache: cannot trim {n} tokens, only {self.trimmable()} are kept "
                             f"beyond the window (PrefixCache.reserve_trim)")
        if n:
            end = self.keys.shape[2] - n
            self.keys, self.values = self.keys[..., :end, :], self.values[..., :end, :]
            self.offset -= n
            self.version += 1
        return n

    @property
    def state(self):
        return self.keys, self.values

    @state.setter
    def state(self, v):
        self.keys, self.values = v
        self.version += 1

    @property
    def meta_state(self):
        return tuple(map(str, (self.window, self.offset)))

    @meta_state.setter
    def meta_state(self, v):
        self.window, self.offset = map(int, v)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def is_trimmable(self) -> bool:
        return self.trimmable() > 0

    def empty(self) -> bool:
        return self.keys is None


class PrefixCache(list):
    """One cache per layer, plus the sequence length the encoder has written."""

    @property
    def offset(self) -> int:
        return self[0].offset if self else 0

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self)

    @property
    def version(self) -> tuple:
        """Changes whenever any layer's stored K/V may have changed."""
        return tuple(c.version for c in self)

    def reserve_trim(self, n: int) -> None:
        """Let ``trim`` drop up to ``n`` tokens from here on: sliding layers keep ``n``
        tokens of history beyond their window (the memory of ``n`` more tokens each)."""
        for c in self:
            if isinstance(c, SlidingCache):
                c.history = max(c.history, int(n))

    def trimmable(self) -> int:
        """How many of the last tokens ``trim`` can drop now."""
        return min((c.trimmable() if isinstance(c, SlidingCache) else c.offset) for c in self) if self else 0

    def trim(self, n: int) -> None:
        """Drop the last ``n`` tokens of every layer, as if they had never been encoded.

        All or nothing: raises ValueError (and changes nothing) when a sliding layer has
        not kept enough history (see ``reserve_trim``).
        """
        if n < 0 or n > self.trimmable():
            raise ValueError(f"cannot trim {n} tokens from a cache of {self.offset}: at most {self.trimmable()} "
                             f"can be dropped (sliding layers keep the history reserve_trim asked for)")
        if n:
            for c in self:
                c.trim(n)

    def split_rows(self) -> List["PrefixCache"]:
        """One batch-1 cache per batch row (slices; arrays are immutable)."""
        B = next((c.keys.shape[0] for c in self if c.keys is not None), 1)
        rows = []
        for b in range(B):
            out = PrefixCache()
            for c in self:
                k, v = c.prefix() if isinstance(c, FullCache) else (c.keys, c.values)
                if isinstance(c, SlidingCache):
                    n = SlidingCache(c.window, c.history)
                else:
                    n = FullCache()
                if k is not None:
                    n.keys, n.values = k[b : b + 1], v[b : b + 1]
                n.offset = c.offset
                out.append(n)
            rows.append(out)
        return rows

    def copy(self) -> "PrefixCache":
        """A copy that can be extended without changing this one (arrays are immutable)."""
        out = PrefixCache()
        for c in self:
            if isinstance(c, SlidingCache):
                n = SlidingCache(c.window, c.history)
                n.keys, n.values, n.offset = c.keys, c.values, c.offset
            else:
                n = FullCache()
                if c.keys is not None:
                    n.keys, n.values = c.prefix()
                n.offset = c.offset
            out.append(n)
        return out


def make_prefix_cache(layer_is_full: List[bool], sliding_window: int) -> PrefixCache:
    return PrefixCache(FullCache() if full else SlidingCache(sliding_window) for full in layer_is_full)


# -- the network -------------------------------------------------------------------------


@partial(mx.compile, shapeless=True)
def geglu(gate: mx.array, x: mx.array) -> mx.array:
    return nn.gelu_approx(gate) * x


@partial(mx.compile, shapeless=True)
def softcap(x: mx.array, cap: float) -> mx.array:
    return mx.tanh(x / cap) * cap


class RMSNormNoScale(nn.Module):
    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, None, self.eps)


class SoftCap(nn.Module):
    """``tanh(x / cap) * cap`` on the float32 logits (a module, so a backend can swap it)."""

    def __init__(self, cap: Optional[float]):
        super().__init__()
        self.cap = cap

    def __call__(self, logits: mx.array) -> mx.array:
        return softcap(logits, self.cap) if self.cap else logits


class GeGLU(nn.Module):
    """gelu(tanh) on the gate, times up (SwitchGLU's activation slot, and the MLPs')."""

    def __call__(self, x: mx.array, gate: mx.array) -> mx.array:
        return geglu(gate, x)


class MLP(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)
        self.activation = GeGLU()

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.activation(self.up_proj(x), self.gate_proj(x)))


class Router(nn.Module):
    """RMS-norm (no weight) * scale / sqrt(H), project, softmax over all experts in
    float32, top-k, renormalise, times the chosen experts' ``per_expert_scale``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.top_k_experts
        self.eps = args.rms_norm_eps
        self.root_size = args.hidden_size**-0.5
        self.proj = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.scale = mx.ones((args.hidden_size,))
        self.per_expert_scale = mx.ones((args.num_experts,))

    def __call__(self, x: mx.array):
        x = mx.fast.rms_norm(x, None, self.eps) * self.scale * self.root_size
        scores = self.proj(x).astype(mx.float32)
        k = self.top_k
        indices = mx.stop_gradient(mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k])
        # softmax over all experts then renormalising the top k equals a softmax over
        # the top k scores.
        weights = mx.softmax(mx.take_along_axis(scores, indices, axis=-1), axis=-1)
        weights = weights * self.per_expert_scale[indices]
        return indices, weights


class Experts(nn.Module):
    """The routed experts' weighted sum (SwitchGLU: gather_mm, sorted by expert when
    there are many (token, expert) pairs)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.switch_glu = SwitchGLU(args.hidden_size, args.moe_intermediate_size, args.num_experts,
                                    activation=GeGLU())

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        y = self.switch_glu(x, indices)
        return (y * weights[..., None].astype(y.dtype)).sum(-2)


class ImageMask:
    """An encoder mask that is more than causal (image tokens see their whole image):
    attention that builds causal masks itself must not take it."""

    def __init__(self, mask: mx.array):
        self.mask = mask


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.is_full = args.is_full(layer_idx)
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.layer_kv_heads(layer_idx)
        self.head_dim = args.layer_head_dim(layer_idx)
        dim, eps, bias = args.hidden_size, args.rms_norm_eps, args.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        if not self.is_full:  # full layers use K = V (before k_norm and RoPE)
            self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=eps)
        self.v_norm = RMSNormNoScale(eps)
        self.window = None if self.is_full else args.sliding_window
        rope = args.rope_parameters["full_attention" if self.is_full else "sliding_attention"]
        self.rope = initialize_rope(
            dims=self.head_dim,
            base=rope.get("rope_theta", 10_000.0),
            traditional=False,
            scaling_config=rope,
            max_position_embeddings=args.max_position_embeddings,
        )

    def kv(self, x: mx.array, offset: int):
        B, L, _ = x.shape
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim) if not self.is_full else k
        k = self.rope(self.k_norm(k).transpose(0, 2, 1, 3), offset=offset)
        v = self.v_norm(v).transpose(0, 2, 1, 3)
        return k, v

    def __call__(self, x: mx.array, cache, offset, mask, write: bool) -> mx.array:
        """``write``: ``cache`` is this layer's cache and gets the new K/V (encoder).
        Otherwise ``cache`` is the (keys, values) prefix the canvas sees, ``offset`` an
        int or a per-row [B] array of positions, ``mask`` None or a key mask (decoder)."""
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim))
        q = self.rope(q.transpose(0, 2, 1, 3), offset=offset)
        k, v = self.kv(x, offset)
        if write:
            k, v = cache.append(k, v)
            out = self.encoder_attention(q, k, v, mask, offset)
        else:
            pk, pv = cache
            if pk is not None:
                if pk.shape[0] != B:  # one prompt, several canvases (seeds)
                    pk = mx.broadcast_to(pk, (B, *pk.shape[1:]))
                    pv = mx.broadcast_to(pv, (B, *pv.shape[1:]))
                k, v = mx.concatenate([pk, k], axis=2), mx.concatenate([pv, v], axis=2)
            out = self.decoder_attention(q, k, v, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def encoder_attention(self, q, k, v, mask, offset: int) -> mx.array:
        """Causal (and windowed) attention of the new queries at ``offset..`` over the
        keys ending with them; ``mask`` from ``encoder_mask`` or an ImageMask. Scale 1."""
        if isinstance(mask, ImageMask):
            mask = mask.mask
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)

    def decoder_attention(self, q, k, v, mask) -> mx.array:
        """Bidirectional; ``mask`` None or a key mask [B, 1, 1, S] (ragged prefixes)."""
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)


class DecoderLayer(nn.Module):
    """One transformer layer, used by both passes; only the layer scalar differs."""

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        H, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args, layer_idx)
        self.mlp = MLP(H, args.intermediate_size)
        self.router = Router(args)
        self.experts = Experts(args)
        self.input_layernorm = nn.RMSNorm(H, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(H, eps=eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(H, eps=eps)
        self.post_feedforward_layernorm = nn.RMSNorm(H, eps=eps)
        self.pre_feedforward_layernorm_2 = nn.RMSNorm(H, eps=eps)
        self.post_feedforward_layernorm_1 = nn.RMSNorm(H, eps=eps)
        self.post_feedforward_layernorm_2 = nn.RMSNorm(H, eps=eps)
        self.layer_scalar = mx.ones((1,))
        self.encoder_layer_scalar = mx.ones((1,))

    def __call__(self, x: mx.array, cache, offset, mask, write: bool) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cache, offset, mask, write))
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(h)))
        indices, weights = self.router(h)
        moe = self.post_feedforward_layernorm_2(self.experts(self.pre_feedforward_layernorm_2(h), indices, weights))
        out = h + self.post_feedforward_layernorm(dense + moe)
        return out * (self.encoder_layer_scalar if write else self.layer_scalar)


class SelfConditioning(nn.Module):
    """post_norm(e + down(gelu(gate(pre_norm(s))) * up(pre_norm(s)))), post_norm without weight."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.pre_norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_norm = RMSNormNoScale(args.rms_norm_eps)
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.activation = GeGLU()

    def __call__(self, embeds: mx.array, signal: Optional[mx.array]) -> mx.array:
        if signal is None:
            # Zero signal: the MLP of zeros is zero (no biases), so only the norm remains.
            return self.post_norm(embeds)
        s = self.pre_norm(signal)
        return self.post_norm(embeds + self.down_proj(self.activation(self.up_proj(s), self.gate_proj(s))))


class QuantizedEmbedding(nn.QuantizedEmbedding):
    def mix(self, probs: mx.array) -> mx.array:
        """``probs [.., V] @ table``, in the scales' dtype."""
        return mx.quantized_matmul(
            probs.astype(self.scales.dtype), self.weight, self.scales, self.get("biases"),
            transpose=False, group_size=self.group_size, bits=self.bits, mode=self.mode,
        )


class Embedding(nn.Embedding):
    """The token table, also the tied LM head (``as_linear``) and the self-conditioning
    signal's soft lookup (``mix``)."""

    def mix(self, probs: mx.array) -> mx.array:
        """``probs [.., V] @ table``, in the table's dtype."""
        return probs.astype(self.weight.dtype) @ self.weight

    def to_quantized(self, group_size: Optional[int] = None, bits: Optional[int] = None, mode: str = "affine",
                     quantize_input: bool = False):
        if quantize_input:
            raise ValueError("Quantized input is not supported.")
        q = nn.QuantizedEmbedding.from_embedding(self, group_size, bits, mode)
        q.__class__ = QuantizedEmbedding  # the same layer, with ``mix``
        return q


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.self_conditioning = SelfConditioning(args)


class DiffusionGemmaModel(nn.Module):
    """``decoder`` holds every text weight; ``encoder`` (the checkpoint's
    ``model.encoder.{vision_tower,embed_vision}``) is attached from outside when wanted."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.decoder = Decoder(args)


# -- masks and prefixes ----------------------------------------------------------------


def encoder_mask(n_new: int, offset: int, n_keys: int, window: Optional[int]):
    """Causal mask for ``n_new`` queries at ``offset..``; keys end with the queries.

    Sliding layers: key at position k is visible to query q when q - window < k <= q.
    """
    if window is None and n_keys == n_new:
        return "causal" if n_new > 1 else None
    q = mx.arange(offset, offset + n_new)[:, None]
    k = mx.arange(offset + n_new - n_keys, offset + n_new)[None]
    mask = k <= q
    if window is not None:
        mask = mask & (k > q - window)
    return mask


def image_groups(tokens: Sequence[int], image_token_id: int) -> List[int]:
    """Per position of ``tokens``: the index of the run of image tokens it is in (0, 1,
    ... in order), -1 for text (the reference's block_sequence_ids)."""
    out, run, prev = [], -1, False
    for t in tokens:
        is_image = int(t) == image_token_id
        if is_image and not prev:
            run += 1
        out.append(run if is_image else -1)
        prev = is_image
    return out


def image_runs_end(tokens: Sequence[int], image_token_id: int, at: int) -> int:
    """``at`` moved forward past the end of an image run it falls inside: prefill chunks
    never split an image (its tokens must see each other within one pass)."""
    while 0 < at < len(tokens) and tokens[at] == image_token_id and tokens[at - 1] == image_token_id:
        at += 1
    return at


def image_mask(causal, groups: List[int], n_new: int, n_keys: int) -> ImageMask:
    """``causal`` (an encoder_mask: "causal", None or [n_new, n_keys]) OR "the query and
    the key are in the same image" (the reference's blockwise overlay, which also
    overrides the sliding window). Keys before this chunk hold no image of it."""
    if causal is None or isinstance(causal, str):
        causal = mx.tril(mx.ones((n_new, n_keys), mx.bool_), k=n_keys - n_new)
    g = mx.array(groups)
    key_groups = mx.concatenate([mx.full((n_keys - n_new,), -1, g.dtype), g])
    same = (g[:, None] == key_groups[None, :]) & (g[:, None] >= 0)
    return ImageMask(causal | same)


# ``denoise``/``hidden`` take one PrefixCache (every canvas row shares it) or a list of
# PrefixCache, one per canvas row, whose prompts may differ in length (ragged batch).
CacheArg = Union[PrefixCache, Sequence[PrefixCache]]
Prefix = Tuple[Optional[mx.array], Optional[mx.array], Optional[mx.array]]


def decoder_prefixes(cache: CacheArg, B: int, L: int) -> Tuple[List[Prefix], Union[int, mx.array]]:
    """Per layer (keys, values, mask) that a canvas of ``L`` tokens attends to, and the
    canvas's first position (an int, or a [B] array when rows differ).

    One ``PrefixCache``: its K/V as stored, no mask. A list of ``PrefixCache`` (one per
    canvas row, each of batch 1, prompts of any lengths): each layer's prefixes are
    left-padded with zeros to the longest, and a boolean key mask [B, 1, 1, P + L] hides
    the padding; row b's canvas positions start at that row's ``offset``.
    """
    if isinstance(cache, PrefixCache):
        return [(*c.prefix(), None) for c in cache], cache.offset
    rows = list(cache)
    if len(rows) != B:
        raise ValueError(f"denoise: {len(rows)} prefix caches for a canvas of {B} rows (expected one per row)")
    if not all(isinstance(r, PrefixCache) for r in rows):
        raise ValueError("denoise: cache must be a PrefixCache or a list of PrefixCache, one per canvas row")
    offsets = [r.offset for r in rows]
    offset = offsets[0] if len(set(offsets)) == 1 else mx.array(offsets)
    out: List[Prefix] = []
    for layer in zip(*rows):
        parts = [c.prefix() for c in layer]
        for b, (k, _) in enumerate(parts):
            if k is not None and k.shape[0] != 1:
                raise ValueError(f"denoise: prefix cache {b} holds {k.shape[0]} rows; a list of caches needs one row each")
        lens = [0 if k is None else k.shape[2] for k, _ in parts]
        P = max(lens)
        if P == 0:
            out.append((None, None, None))
            continue
        k0, v0 = next((k, v) for k, v in parts if k is not None)
        keys, values = [], []
        for (k, v), n in zip(parts, lens):
            if n < P:
                pad = mx.zeros((1, k0.shape[1], P - n, k0.shape[3]), k0.dtype)
                k = pad if k is None else mx.concatenate([pad, k], axis=2)
                v = pad.astype(v0.dtype) if v is None else mx.concatenate([pad.astype(v0.dtype), v], axis=2)
            keys.append(k)
            values.append(v)
        mask = None
        if min(lens) < P:
            pos = mx.arange(P + L)[None]
            starts = mx.array([P - n for n in lens])[:, None]
            mask = (pos >= starts)[:, None, None, :]
        out.append((mx.concatenate(keys, axis=0), mx.concatenate(values, axis=0), mask))
    return out, offset


class DecoderStep:
    """One block's decoder: the prefixes and positions for one cache state, made once
    (within a block the prefix is constant). Callable as ``step(canvas, signal, head)``.
    A backend may give the model a subclass of this (``Model.decoder_step_type``), for
    example one that compiles the forward."""

    def __init__(self, model: "Model", prefixes: List[Prefix], offset, key, rows=None):
        self.model, self.prefixes, self.offset, self.key, self.rows = model, prefixes, offset, key, rows
        # materialise padded / concatenated prefixes once, not inside every step's graph
        mx.eval([a for p in prefixes for a in p if a is not None] + ([offset] if isinstance(offset, mx.array) else []))

    def forward(self, canvas: mx.array, signal: Optional[mx.array], head: bool) -> mx.array:
        return self.model.decode_layers(canvas, signal, self.prefixes, self.offset, head)

    def __call__(self, canvas: mx.array, signal: Optional[mx.array], head: bool) -> mx.array:
        return self.forward(canvas, signal, head)


class Model(nn.Module):
    decoder_step_type = DecoderStep
    # encode(): tokens per encoder pass (0 = all at once). A sliding layer then scores a
    # chunk against at most ``sliding_window - 1 + chunk`` keys instead of all T, and a
    # full layer skips most of the masked upper triangle.
    prefill_chunk = 512

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = DiffusionGemmaModel(args)
        self.embed_scale = args.hidden_size**0.5
        self.softcap = SoftCap(args.final_logit_softcapping)

    @property
    def decoder(self) -> Decoder:
        return self.model.decoder

    @property
    def layers(self):
        return self.model.decoder.layers

    def make_cache(self) -> PrefixCache:
        return make_prefix_cache([self.args.is_full(i) for i in range(self.args.num_hidden_layers)],
                                 self.args.sliding_window)

    def __call__(self, inputs: mx.array, cache: Optional[PrefixCache] = None, **kwargs) -> mx.array:
        """The encoder's next-token logits [B, T, V] for ``inputs`` [B, T], appending
        their K/V to ``cache`` (mlx-lm's model interface)."""
        return self.encode(inputs, self.make_cache() if cache is None else cache, return_logits=True)

    def embed(self, tokens: mx.array) -> mx.array:
        """Token embeddings times sqrt(hidden), in the table's dtype."""
        h = self.decoder.embed_tokens(tokens)
        return h * mx.array(self.embed_scale, dtype=h.dtype)

    # -- images (the tower itself is attached from outside) ----------------------------

    @property
    def has_vision(self) -> bool:
        return "encoder" in self.model

    def drop_vision(self) -> None:
        """Text only: a folder whose config names a vision tower but holds no weights for it."""
        if self.has_vision:
            del self.model["encoder"]

    def image_features(self, patches, positions) -> mx.array:
        """One image's soft tokens in the text model's space [n, hidden]: ``patches``
        [P, 3 * patch_size**2] in [0, 1] and ``positions`` [P, 2] (no padding)."""
        if not self.has_vision:
            raise ValueError("this model has no vision tower (a text-only folder): it cannot read images")
        return self.model.encoder(mx.array(patches)[None], mx.array(positions)[None])[0]

    # -- the encoder pass --------------------------------------------------------------

    def encode(self, tokens: mx.array, cache: PrefixCache, return_logits: bool = False,
               image_features: Optional[mx.array] = None) -> Optional[mx.array]:
        """Run the causal encoder over ``tokens`` [B, T] and append their K/V to ``cache``.

        Long inputs go through in chunks of ``prefill_chunk`` tokens (the same result:
        each chunk attends causally to the cache and itself). Nothing is evaluated here.

        ``return_logits``: also return the encoder's next-token logits [B, T, V] (float32,
        soft-capped): the reference's ``encoder_last_hidden_state`` (final norm) through
        the tied head. Position t predicts token t + 1. Costs the last layer's attention
        and FFN and the head, which a plain encode skips.

        ``image_features``: the soft tokens [n, hidden] of every image in ``tokens`` (one
        row, in prompt order); they replace the embeddings at the ``image_token_id``
        positions, in order.
        """
        if tokens.ndim == 1:
            tokens = tokens[None]
        if image_features is not None:
            return self._encode_with_images(tokens, cache, return_logits, image_features)
        T, chunk = tokens.shape[1], self.prefill_chunk
        if chunk and T > chunk:
            out = [self.encode_chunk(tokens[:, s : s + chunk], cache, return_logits) for s in range(0, T, chunk)]
            return mx.concatenate(out, axis=1) if return_logits else None
        return self.encode_chunk(tokens, cache, return_logits)

    def _encode_with_images(self, tokens, cache, return_logits, features) -> Optional[mx.array]:
        """encode() with images: chunks end outside images, and each takes its images' rows."""
        if tokens.shape[0] != 1:
            raise ValueError(f"encode: images go with one prompt row, got {tokens.shape[0]} rows")
        ids = tokens[0].tolist()
        image_id = self.args.image_token_id
        n_image = ids.count(image_id)
        if n_image != features.shape[0]:
            raise ValueError(f"encode: {n_image} image tokens in the prompt but {features.shape[0]} image features")
        T, chunk = len(ids), self.prefill_chunk or len(ids)
        out, start, used = [], 0, 0
        while start < T:
            end = image_runs_end(ids, image_id, min(T, start + chunk))
            n = ids[start:end].count(image_id)
            out.append(self.encode_chunk(tokens[:, start:end], cache, return_logits, features[used:used + n]))
            start, used = end, used + n
        return mx.concatenate(out, axis=1) if return_logits else None

    def encode_chunk(self, tokens: mx.array, cache: PrefixCache, return_logits: bool = False,
                     image_features: Optional[mx.array] = None) -> Optional[mx.array]:
        """One encoder pass over ``tokens`` [B, T] (``encode`` without chunking)."""
        T = tokens.shape[1]
        offset = cache.offset
        h = self.embed(tokens)
        groups = None
        if image_features is not None and image_features.shape[0]:
            ids = tokens[0].tolist()
            where = mx.array([i for i, t in enumerate(ids) if t == self.args.image_token_id])
            h[:, where] = image_features.astype(h.dtype)[None]
            if self.args.use_bidirectional_attention == "vision":
                groups = image_groups(ids, self.args.image_token_id)
        masks = {}
        last = len(self.layers) - 1
        for i, (layer, c) in enumerate(zip(self.layers, cache)):
            if i == last and not return_logits:
                # Only the last layer's K/V is ever read: skip its attention and FFN.
                k, v = layer.self_attn.kv(layer.input_layernorm(h), offset)
                c.append(k, v)
                break
            full = self.args.is_full(i)
            n_keys = T + (offset if full else min(offset, self.args.sliding_window - 1))
            key = (full, n_keys)
            if key not in masks:
                masks[key] = encoder_mask(T, offset, n_keys, None if full else self.args.sliding_window)
                if groups is not None:
                    masks[key] = image_mask(masks[key], groups, T, n_keys)
            h = layer(h, c, offset, masks[key], write=True)
        if not return_logits:
            return None
        return self.lm_head(self.decoder.norm(h))  # the encoder's norm is tied to the decoder's

    # -- the decoder pass --------------------------------------------------------------

    def decoder_step(self, cache: CacheArg, B: int, L: int) -> DecoderStep:
        """The per-block decoder state for ``cache`` (kept on the model, for the last
        cache it was made for; rebuilt when that cache changes)."""
        if isinstance(cache, PrefixCache):
            rows, key = None, (B, L, id(cache), cache.version)
        else:
            rows = list(cache)
            if not all(isinstance(r, PrefixCache) for r in rows):
                raise ValueError("denoise: cache must be a PrefixCache or a list of PrefixCache, one per canvas row")
            key = (B, L, tuple((id(r), r.version) for r in rows))
        memo = self.__dict__.get("_decoder_steps", {})
        kind = rows is None
        step = memo.get(kind)
        if step is None or step.key != key:
            # the step keeps ``cache`` referenced, so the ids in its key stay unique
            step = self.decoder_step_type(self, *decoder_prefixes(cache, B, L), key=key,
                                          rows=cache if rows is None else rows)
            object.__setattr__(self, "_decoder_steps", {**memo, kind: step})
        return step

    def decode_layers(self, canvas, signal, prefixes: List[Prefix], offset, head: bool) -> mx.array:
        """The decoder's layers over ``canvas`` given each layer's (keys, values, mask)."""
        h = self.decoder.self_conditioning(self.embed(canvas), signal)
        for layer, (pk, pv, mask) in zip(self.layers, prefixes):
            h = layer(h, (pk, pv), offset, mask, write=False)
        h = self.decoder.norm(h)
        return self.lm_head(h) if head else h

    def _run_decoder(self, canvas, cache, sc_logits, sc_embeddings, head: bool) -> mx.array:
        if canvas.ndim == 1:
            canvas = canvas[None]
        signal = sc_embeddings
        if signal is None and sc_logits is not None:
            signal = self.soft_embeddings(mx.softmax(sc_logits.astype(mx.float32), axis=-1))
        return self.decoder_step(cache, canvas.shape[0], canvas.shape[1])(canvas, signal, head)

    def hidden(self, canvas: mx.array, cache: CacheArg, self_conditioning_logits: Optional[mx.array] = None,
               self_conditioning_embeddings: Optional[mx.array] = None) -> mx.array:
        """The decoder's final hidden states for ``canvas`` [B, L]."""
        return self._run_decoder(canvas, cache, self_conditioning_logits, self_conditioning_embeddings, False)

    def denoise(self, canvas: mx.array, cache: CacheArg, self_conditioning_logits: Optional[mx.array] = None,
                self_conditioning_embeddings: Optional[mx.array] = None) -> mx.array:
        """Float32 soft-capped logits [B, L, V] for ``canvas``; the cache is only read.

        ``self_conditioning_logits`` are the previous step's temperature-scaled logits
        (or pass ``self_conditioning_embeddings`` already computed from them).
        """
        return self._run_decoder(canvas, cache, self_conditioning_logits, self_conditioning_embeddings, True)

    def lm_head(self, h: mx.array) -> mx.array:
        """Float32 soft-capped logits through the tied embedding."""
        return self.softcap(self.decoder.embed_tokens.as_linear(h).astype(mx.float32))

    def soft_embeddings(self, probs: mx.array) -> mx.array:
        """probs [.., V] (float32) @ embedding matrix * embedding scale, in the weights' dtype."""
        out = self.decoder.embed_tokens.mix(probs)
        return out * mx.array(self.embed_scale, dtype=out.dtype)

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Checkpoint keys (HF or mlx-community layout) -> this module tree.

        Shared weights may sit under the decoder prefix, the encoder prefix or both;
        the decoder copy wins. The vision tower is kept when the model has one (its
        keys need no renaming); the tied LM head and rotary buffers are dropped.
        """
        enc, dec = "model.encoder.language_model.", "model.decoder."
        out: Dict[str, mx.array] = {}
        from_encoder: Dict[str, mx.array] = {}
        for k, v in weights.items():
            if k.startswith(("model.encoder.vision_tower.", "model.encoder.embed_vision.")):
                if self.has_vision and "rotary_emb" not in k:
                    out[k] = v
                continue
            if k == "lm_head.weight" or "rotary_emb" in k:
                continue
            if k.startswith(enc):
                rest = k[len(enc):]
                if rest.endswith(".layer_scalar"):
                    out[dec + rest[: -len("layer_scalar")] + "encoder_layer_scalar"] = v
                else:
                    from_encoder[dec + rest] = v
                continue
            out[k] = v
        for k, v in from_encoder.items():
            out.setdefault(k, v)

        split = {}
        for k in list(out):
            for name in ("gate_up_proj", "down_proj"):
                marker = f".experts.{name}"
                if marker not in k:
                    continue
                base, suffix = k.split(marker)
                suffix = suffix or ".weight"
                v = out.pop(k)
                prefix = f"{base}.experts.switch_glu"
                if name == "down_proj":
                    split[f"{prefix}.down_proj{suffix}"] = v
                else:
                    # contiguous copies, not views of the fused tensor: kernels may read
                    # each expert's rows in place (the fused tensor is then freed)
                    gate, up = (mx.contiguous(t) for t in mx.split(v, 2, axis=-2))
                    split[f"{prefix}.gate_proj{suffix}"] = gate
                    split[f"{prefix}.up_proj{suffix}"] = up
        out.update(split)
        return out

    @property
    def quant_predicate(self):
        """The converter's mixed recipe: router, embeddings (= the tied LM head),
        attention, the dense MLP and the self-conditioning MLP at 8 bits (affine, group
        64); the experts at the chosen bits; norms, scalars and the vision tower in float."""

        def predicate(path: str, module: nn.Module):
            if not hasattr(module, "to_quantized") or path.startswith("model.encoder."):
                return False
            if (path.endswith(".embed_tokens") or ".self_attn." in path or ".router." in path
                    or ".mlp." in path or ".self_conditioning." in path):
                return {"group_size": 64, "bits": 8, "mode": "affine"}
            return True

        return predicate
