"""Gemma 4's vision tower and the multimodal embedder, in MLX.

DiffusionGemma's encoder reads images with Gemma 4's vision model (transformers'
``Gemma4VisionModel``) and projects its soft tokens into the text model's space
(``DiffusionGemmaMultimodalEmbedder``). The module tree mirrors the checkpoint's keys
under ``model.encoder.vision_tower.`` and ``model.encoder.embed_vision.``.

One image: patches [P, 3 * patch_size**2] in [0, 1] and their (x, y) grid positions
(``image_processor``) -> a bidirectional transformer with 2-D RoPE -> k x k average
pooling (k = ``pooling_kernel_size``) -> ``sqrt(hidden)`` scaling (-> standardisation)
-> RMS norm without weight -> linear to the text width: one soft token per pooled cell,
row-major over the pooled grid, as the reference orders them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs

from .errors import ConfigError


@dataclass
class VisionArgs(BaseModelArgs):
    model_type: str = "gemma4_vision"
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    rope_parameters: Optional[Dict[str, Any]] = None
    pooling_kernel_size: int = 3
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024
    use_clipped_linears: bool = False
    standardize: bool = False
    output_proj_dims: Optional[int] = None

    def __post_init__(self):
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "axial", "rope_theta": 100.0}
        if self.rope_parameters.get("rope_type", "axial") != "axial":
            raise ConfigError(f"vision_config.rope_parameters.rope_type {self.rope_parameters['rope_type']!r} "
                              "is not supported (Gemma 4 uses 'axial')")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_approx"):
            raise ConfigError(f"vision_config.hidden_activation {self.hidden_activation!r} is not supported "
                              "(Gemma 4 uses 'gelu_pytorch_tanh')")
        if self.head_dim % 4:
            raise ConfigError(f"vision_config.head_dim {self.head_dim} must be a multiple of 4 (2-D RoPE)")

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters.get("rope_theta", 100.0))


class ClippableLinear(nn.Module):
    """A bias-free linear under ``.linear``; with ``use_clipped_linears`` its input and
    output are clamped to bounds stored in the checkpoint (+-inf until loaded)."""

    def __init__(self, in_dims: int, out_dims: int, clip: bool):
        super().__init__()
        self.linear = nn.Linear(in_dims, out_dims, bias=False)
        self.clip = clip
        if clip:
            self.input_min, self.input_max = mx.array(-mx.inf), mx.array(mx.inf)
            self.output_min, self.output_max = mx.array(-mx.inf), mx.array(mx.inf)

    def __call__(self, x: mx.array) -> mx.array:
        if not self.clip:
            return self.linear(x)
        x = mx.clip(x, self.input_min, self.input_max)
        return mx.clip(self.linear(x), self.output_min, self.output_max)


def axial_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """x [B, P, H, D]: the first D/2 channels rotated by the x position, the rest by y,
    each half with the rotate-half (non-traditional) layout. cos/sin [B, P, 1, D]."""
    d2 = x.shape[-1] // 2

    def rotate_half(t):
        h = t.shape[-1] // 2
        return mx.concatenate([-t[..., h:], t[..., :h]], axis=-1)

    parts = [x[..., :d2], x[..., d2:]]
    return mx.concatenate([p * cos[..., i * d2:(i + 1) * d2] + rotate_half(p) * sin[..., i * d2:(i + 1) * d2]
                           for i, p in enumerate(parts)], axis=-1)


def axial_cos_sin(positions: mx.array, head_dim: int, theta: float, dtype) -> tuple:
    """cos, sin [B, P, 1, head_dim] for (x, y) positions [B, P, 2]: frequencies over
    head_dim / 2 channels, laid out x, x, y, y as the reference recomposes them."""
    d2 = head_dim // 2
    inv_freq = 1.0 / (theta ** (mx.arange(0, d2, 2, dtype=mx.float32) / d2))
    freqs = positions.astype(mx.float32)[..., None] * inv_freq  # [B, P, 2, d2 / 2]
    fx, fy = freqs[..., 0, :], freqs[..., 1, :]
    angles = mx.concatenate([fx, fx, fy, fy], axis=-1)[:, :, None, :]
    return mx.cos(angles).astype(dtype), mx.sin(angles).astype(dtype)


class VisionAttention(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        H, hd, clip = args.hidden_size, args.head_dim, args.use_clipped_linears
        self.q_proj = ClippableLinear(H, self.n_heads * hd, clip)
        self.k_proj = ClippableLinear(H, self.n_kv_heads * hd, clip)
        self.v_proj = ClippableLinear(H, self.n_kv_heads * hd, clip)
        self.o_proj = ClippableLinear(self.n_heads * hd, H, clip)
        self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.eps = args.rms_norm_eps  # v is normed without a weight

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, mask: Optional[mx.array]) -> mx.array:
        B, P, _ = x.shape
        q = axial_rope(self.q_norm(self.q_proj(x).reshape(B, P, self.n_heads, self.head_dim)), cos, sin)
        k = axial_rope(self.k_norm(self.k_proj(x).reshape(B, P, self.n_kv_heads, self.head_dim)), cos, sin)
        v = mx.fast.rms_norm(self.v_proj(x).reshape(B, P, self.n_kv_heads, self.head_dim), None, self.eps)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        out = self.attend(q, k, v, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, P, -1))

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask: Optional[mx.array]) -> mx.array:
        """Bidirectional, scale 1; ``mask`` None or a key mask [B, 1, 1, P] (padding).
        On the CPU, mlx_dgemma.backend swaps in the C kernel: MLX's SDPA fallback
        materialises every score (12 heads x 2,520^2 patches) with a scalar softmax."""
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)


class VisionMLP(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        H, W, clip = args.hidden_size, args.intermediate_size, args.use_clipped_linears
        self.gate_proj = ClippableLinear(H, W, clip)
        self.up_proj = ClippableLinear(H, W, clip)
        self.down_proj = ClippableLinear(W, H, clip)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class VisionLayer(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        H, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = VisionAttention(args)
        self.mlp = VisionMLP(args)
        self.input_layernorm = nn.RMSNorm(H, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(H, eps=eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(H, eps=eps)
        self.post_feedforward_layernorm = nn.RMSNorm(H, eps=eps)

    def __call__(self, x, cos, sin, mask) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class VisionEncoder(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.layers = [VisionLayer(args) for _ in range(args.num_hidden_layers)]


class PatchEmbedder(nn.Module):
    """Patches in [0, 1] -> [-1, 1] -> linear, plus learned x and y position embeddings
    (zero on padding patches)."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.input_proj = nn.Linear(3 * args.patch_size**2, args.hidden_size, bias=False)
        self.position_embedding_table = mx.ones((2, args.position_embedding_size, args.hidden_size))

    def __call__(self, patches: mx.array, positions: mx.array, padding: mx.array) -> mx.array:
        # the weights' float dtype (a quantized input_proj stores uint32 weights)
        dtype = self.position_embedding_table.dtype
        h = self.input_proj((2 * (patches - 0.5)).astype(dtype))
        p = mx.maximum(positions, 0)
        pos = self.position_embedding_table[0][p[..., 0]] + self.position_embedding_table[1][p[..., 1]]
        return h + mx.where(padding[..., None], mx.zeros((), pos.dtype), pos)


class VisionModel(nn.Module):
    """``Gemma4VisionModel``: patches [B, P, 3 p^2] and positions [B, P, 2] ((-1, -1) on
    padding) -> pooled soft tokens [B, P / k^2, hidden] (float32 scaled, standardised,
    back in the weights' dtype) and the number of real ones per image."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.patch_embedder = PatchEmbedder(args)
        self.encoder = VisionEncoder(args)
        if args.standardize:
            self.std_bias = mx.zeros((args.hidden_size,))
            self.std_scale = mx.ones((args.hidden_size,))

    def __call__(self, patches: mx.array, positions: mx.array) -> mx.array:
        args = self.args
        B, P, _ = patches.shape
        k = args.pooling_kernel_size
        length = P // (k * k)
        padding = (positions == -1).all(-1)  # [B, P]
        h = self.patch_embedder(patches, positions, padding)
        dtype = h.dtype
        # padding patches are hidden as keys (their own rows are dropped by the pooling)
        mask = (~padding)[:, None, None, :] if bool(padding.any()) else None
        cos, sin = axial_cos_sin(positions, args.head_dim, args.rope_theta, dtype)
        for layer in self.encoder.layers:
            h = layer(h, cos, sin, mask)
        h = mx.where(padding[..., None], mx.zeros((), dtype), h)
        if length != P:
            h = self._pool(h, positions, length, k)
        h = h.astype(mx.float32) * mx.array(args.hidden_size**0.5, mx.float32)
        if args.standardize:
            h = (h - self.std_bias.astype(mx.float32)) * self.std_scale.astype(mx.float32)
        return h.astype(dtype)

    @staticmethod
    def _pool(h: mx.array, positions: mx.array, length: int, k: int) -> mx.array:
        """Average over k x k cells of the patch grid; cell (cx, cy) goes to slot
        cx + (width / k) * cy, so the real cells fill the first slots row-major."""
        p = mx.maximum(positions, 0)
        width = p[..., 0].max(-1, keepdims=True) + 1
        cells = p // k
        slot = cells[..., 0] + (width // k) * cells[..., 1]  # [B, P]
        weights = (slot[..., None] == mx.arange(length)).astype(mx.float32) / (k * k)  # [B, P, length]
        return (weights.swapaxes(1, 2) @ h.astype(mx.float32)).astype(h.dtype)


class MultimodalEmbedder(nn.Module):
    """Soft tokens -> RMS norm without weight -> linear to the text model's width."""

    def __init__(self, args: VisionArgs, text_hidden: int):
        super().__init__()
        self.eps = args.rms_norm_eps
        self.embedding_projection = nn.Linear(args.output_proj_dims or args.hidden_size, text_hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.embedding_projection(mx.fast.rms_norm(x, None, self.eps))


class VisionParts(nn.Module):
    """``model.encoder``'s vision half: ``vision_tower`` and ``embed_vision``."""

    def __init__(self, args: VisionArgs, text_hidden: int):
        super().__init__()
        self.vision_tower = VisionModel(args)
        self.embed_vision = MultimodalEmbedder(args, text_hidden)

    def __call__(self, patches: mx.array, positions: mx.array) -> mx.array:
        """One image (batch 1, no padding needed) or a padded batch -> soft tokens in the
        text model's space [B, P / k^2, text hidden]; padded slots sit at the end."""
        return self.embed_vision(self.vision_tower(patches, positions))
