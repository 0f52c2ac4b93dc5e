"""DiffusionGemma in MLX: one set of weights, two passes.

``encode`` runs the network causally over new tokens and appends their K/V to the
prefix cache. ``denoise`` runs the same layers bidirectionally over a canvas that sees
the whole cache, returns float32 soft-capped logits, and never writes the cache.

API (stable; the drafter, generate and the server call it):
  make_cache() -> PrefixCache; encode(tokens [B, T], cache, return_logits=False)
  (-> the encoder's next-token logits [B, T, V] when asked);
  denoise(canvas [B, L], cache, self_conditioning_logits=None,
          self_conditioning_embeddings=None) -> float32 logits [B, L, V];
  hidden(...) (same arguments) -> final hidden states; lm_head(h); soft_embeddings(probs);
  sanitize(weights); quant_predicate.
``cache`` in denoise/hidden is one PrefixCache shared by every canvas row, or a list of
PrefixCache (batch 1 each), one per row, with prompts of different lengths: the server's
ragged batch. Each layer's prefix K/V is then left-padded to the longest under a key
mask, and each row's canvas positions start at its own ``cache.offset``.

Speed switches (attributes of Model; outputs agree within float rounding; defaults per
backend, see benchmarks/README.md): ``compile_decoder`` (GPUs), ``expert_dispatch``
("gather": GPUs | "cpu": the C kernel, CPU | "grouped": CPU without it, quantized
experts | "dense": every expert on every token, for training small models on the CPU),
``encoder_expert_dispatch`` (None: the same), ``cpu_attention`` (CPU, the C
kernel), ``dequantize_matmuls`` (CPU), ``numpy_softcap`` (CPU; the C softcap where
built), ``merge_prefix`` (off), ``prefill_chunk`` (512 tokens per encoder pass).

The module tree mirrors the checkpoint's key names (``model.decoder.…``) so that the
on-disk layout of mlx-community's conversions loads with only the expert split in
``sanitize``. The encoder's layer scalars are the only weights not shared with the
decoder; they live beside the decoder's as ``encoder_layer_scalar``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.rope_utils import initialize_rope
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU, SwitchLinear

from . import fastmath
from .cache import PrefixCache, make_prefix_cache
from .config import ModelArgs
from .kernels import cpu as cpu_kernels
from .vision import VisionArgs, VisionParts

# ``denoise``/``hidden`` take one PrefixCache (every canvas row shares it) or a list of
# PrefixCache, one per canvas row, whose prompts may differ in length (ragged batch).
CacheArg = Union[PrefixCache, Sequence[PrefixCache]]


@partial(mx.compile, shapeless=True)
def _geglu(gate: mx.array, x: mx.array) -> mx.array:
    return nn.gelu_approx(gate) * x


def geglu(gate: mx.array, x: mx.array) -> mx.array:
    return fastmath.geglu(gate, x) if fastmath.enabled(gate) else _geglu(gate, x)


@partial(mx.compile, shapeless=True)
def _softcap(x: mx.array, cap: float) -> mx.array:
    return mx.tanh(x / cap) * cap


def softcap(x: mx.array, cap: float) -> mx.array:
    return fastmath.softcap(x, cap) if fastmath.enabled(x) else _softcap(x, cap)


def sdpa(q: mx.array, k: mx.array, v: mx.array, mask) -> mx.array:
    """Attention at scale 1: MLX's SDPA, or on the CPU (float32) fastmath's, whose softmax
    is 3x faster than the one SDPA's CPU fallback runs (and differentiable, unlike the
    C kernel)."""
    if fastmath.enabled(q) and k.dtype == mx.float32:
        return fastmath.attention(q, k, v, 1.0, mask)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)


def numpy_softcap(x: mx.array, cap: float) -> mx.array:
    """``softcap`` through NumPy, for MLX's CPU backend only: there MLX evaluates tanh
    one element at a time (~15 ns each; 256 x 262,144 logits take 1.5 s), NumPy with
    SIMD (5-9x faster, results within 1 ulp). Evaluates ``x`` (no lazy graph)."""
    y = np.asarray(x) / np.float32(cap)  # a view of the evaluated buffer: no copy
    np.tanh(y, out=y)
    y *= np.float32(cap)
    return mx.array(y)


def dequantized(m: nn.Module, rows=None) -> mx.array:
    """The float weight of a quantized layer (rows ``rows`` of it), float32 on the CPU."""
    w, scales, biases = m.weight, m.scales, m.get("biases")
    if rows is not None:
        w, scales = w[rows], scales[rows]
        biases = None if biases is None else biases[rows]
    out = mx.dequantize(w, scales, biases, group_size=m.group_size, bits=m.bits, mode=m.mode)
    return out.astype(mx.float32)


def linear(m: nn.Module, x: mx.array, dequantize: bool) -> mx.array:
    """``m(x)``. ``dequantize``: a quantized ``m`` runs as its dequantized weight through
    a float32 BLAS matmul: MLX 0.32's CPU ``quantized_matmul`` is a scalar loop, 20-35x
    slower at these shapes (benchmarks/README.md); the float weight lives for this call."""
    if not dequantize or not isinstance(m, nn.QuantizedLinear) or getattr(m, "global_scale", None) is not None:
        return m(x)
    y = (x.astype(mx.float32) @ dequantized(m).T).astype(x.dtype)
    return y + m.bias if "bias" in m else y


class RMSNormNoScale(nn.Module):
    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, None, self.eps)


class GeGLU(nn.Module):
    """SwitchGLU's activation slot: gelu(tanh) on the gate, times up."""

    def __call__(self, x: mx.array, gate: mx.array) -> mx.array:
        return geglu(gate, x)


class MLP(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)
        self.dequantize = False  # see linear()

    def __call__(self, x: mx.array) -> mx.array:
        d = self.dequantize
        return linear(self.down_proj, geglu(linear(self.gate_proj, x, d), linear(self.up_proj, x, d)), d)


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
        self.dequantize = False  # see linear()

    def __call__(self, x: mx.array):
        x = mx.fast.rms_norm(x, None, self.eps) * self.scale * self.root_size
        scores = linear(self.proj, x, self.dequantize).astype(mx.float32)
        k = self.top_k
        indices = mx.stop_gradient(mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k])
        # softmax over all experts then renormalising the top k equals a softmax over
        # the top k scores.
        weights = mx.softmax(mx.take_along_axis(scores, indices, axis=-1), axis=-1)
        weights = weights * self.per_expert_scale[indices]
        return indices, weights


def _expert_matmul(lin: nn.Module, x: mx.array, e: int, dequantize: bool = False) -> mx.array:
    """x [n, in] through expert ``e`` of a (Quantized)SwitchLinear: [n, out]."""
    if isinstance(lin, QuantizedSwitchLinear) and dequantize:
        y = (x.astype(mx.float32) @ dequantized(lin, e).T).astype(x.dtype)
    elif isinstance(lin, QuantizedSwitchLinear):
        y = mx.quantized_matmul(
            x, lin.weight[e], lin.scales[e], None if lin.biases is None else lin.biases[e],
            transpose=True, group_size=lin.group_size, bits=lin.bits, mode=lin.mode,
        )
    else:
        y = x @ lin.weight[e].T
    if "bias" in lin:
        y = y + lin.bias[e]
    return y


def grouped_switch_glu(glu: SwitchGLU, x: mx.array, indices: mx.array, dequantize: bool = False) -> mx.array:
    """SwitchGLU(x, indices) as one dense GEMM per expert over the rows routed to it.

    ``gather_mm`` on MLX's CPU backend runs one matrix-vector product per (token, expert)
    pair, reading the expert's weights once per pair (256 tokens x top-8 = 2,048 reads
    of each projection per layer); grouping reads every used expert's weights once. The
    group sizes are read back to the host, so this path cannot run inside mx.compile.
    """
    *lead, K = indices.shape
    H = x.shape[-1]
    flat = indices.reshape(-1)
    order = mx.argsort(flat)
    counts = np.bincount(np.array(flat), minlength=glu.gate_proj.weight.shape[0])
    xs = x.reshape(-1, H)[order // K]
    outs, start = [], 0
    for e in np.flatnonzero(counts):
        n = int(counts[e])
        xe = xs[start : start + n]
        start += n
        gate = _expert_matmul(glu.gate_proj, xe, int(e), dequantize)
        up = _expert_matmul(glu.up_proj, xe, int(e), dequantize)
        outs.append(_expert_matmul(glu.down_proj, glu.activation(up, gate), int(e), dequantize))
    y = mx.concatenate(outs)[mx.argsort(order)]
    return y.reshape(*lead, K, y.shape[-1])


def dense_switch_glu(glu: SwitchGLU, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
    """The weighted sum of the routed experts, computed as EVERY expert on every token
    (three dense GEMMs against the stacked expert weights) with the experts a token was
    not routed to weighted 0.

    The same numbers as the routed path (the extra terms are exact zeros), at E/K times the
    FLOPs but with no gather: on MLX's CPU backend ``gather_mm`` and its gradient cost
    more than the dense GEMMs for small experts (a 128-wide, 8-expert, top-2 model trains
    about twice as fast). Traceable, so it runs inside the trainer's compiled step.
    """
    E = glu.gate_proj.weight.shape[0]
    w = (weights[..., None].astype(x.dtype) * (indices[..., None] == mx.arange(E))).sum(-2)  # [.., E]
    gate = mx.einsum("...h,eih->...ei", x, glu.gate_proj.weight)
    up = mx.einsum("...h,eih->...ei", x, glu.up_proj.weight)
    act = glu.activation(up, gate) * w[..., None]
    return mx.einsum("...ei,ehi->...h", act, glu.down_proj.weight)


class Experts(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.switch_glu = SwitchGLU(
            args.hidden_size, args.moe_intermediate_size, args.num_experts, activation=GeGLU()
        )
        # "gather": SwitchGLU's gather_mm (sorted by expert when >= 64 pairs), the right
        # kernel on GPUs; "grouped": grouped_switch_glu, for the CPU backend; "cpu": the C
        # kernel (kernels.cpu.moe: float32 experts; others take the grouped path);
        # "dense": dense_switch_glu, for training small models on the CPU.
        self.dispatch = "gather"
        self.encoder_dispatch: Optional[str] = None  # the encoder's, when it differs
        self.dequantize = False  # quantized experts, grouped: see linear()

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array, encoder: bool = False) -> mx.array:
        glu = self.switch_glu
        dispatch = (self.encoder_dispatch or self.dispatch) if encoder else self.dispatch
        if dispatch == "dense" and isinstance(glu.gate_proj, SwitchLinear):
            return dense_switch_glu(glu, x, indices, weights)
        if dispatch == "cpu":
            if cpu_kernels.moe_supported(glu):
                return cpu_kernels.moe(glu, x, indices, weights)
            dispatch = "grouped"  # quantized or bf16 experts: the MLX grouped path
        if dispatch == "grouped" and getattr(glu.gate_proj, "global_scale", None) is None:
            y = grouped_switch_glu(glu, x, indices, self.dequantize)
        else:
            y = glu(x, indices)
        return (y * weights[..., None].astype(y.dtype)).sum(-2)


def _partial_attention(q: mx.array, k: mx.array, v: mx.array, mask: Optional[mx.array]):
    """Unnormalised attention of grouped queries q [B, Hkv, R*L, D] over k, v [b, Hkv, S, D]:
    (row max, sum of exp, exp-weighted values). ``mask`` [B, 1, 1, S] hides keys."""
    s = q @ k.swapaxes(-1, -2)
    if mask is not None:
        s = mx.where(mask, s, -mx.inf)
    # finite floor: a row with every key hidden gives weight 0, not NaN
    m = mx.maximum(s.max(-1, keepdims=True), -1e30)
    e = mx.exp(s - m)
    return m, e.sum(-1, keepdims=True), e @ v


def merged_attention(q: mx.array, pk: mx.array, pv: mx.array, k: mx.array, v: mx.array,
                     mask: Optional[mx.array]) -> mx.array:
    """softmax(q [k_prefix; k]^T) [v_prefix; v] without concatenating K/V: attention over
    the prefix and over the canvas separately, merged by their log-sum-exp. Scale 1.
    ``mask``: None or [B, 1, 1, P + L] (True = visible). Returns [B, H, L, D]."""
    B, H, L, D = q.shape
    Hkv, P = k.shape[1], pk.shape[2]
    qg = q.reshape(B, Hkv, (H // Hkv) * L, D)  # query heads grouped by their KV head
    # decoder_prefixes' masks only ever hide prefix padding: the canvas is always visible
    m1, l1, o1 = _partial_attention(qg, pk, pv, None if mask is None else mask[..., :P])
    m2, l2, o2 = _partial_attention(qg, k, v, None)
    m = mx.maximum(m1, m2)
    a1, a2 = mx.exp(m1 - m), mx.exp(m2 - m)
    out = (o1 * a1 + o2 * a2) / (l1 * a1 + l2 * a2)
    return out.reshape(B, H, L, D).astype(q.dtype)


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
        self.dequantize = False  # see linear()
        # CPU: the C attention kernel (kernels.cpu.attention) instead of MLX's SDPA, whose
        # CPU fallback materialises every score and runs a scalar softmax over them.
        self.cpu_attention = False
        # Decoder: attend to the prefix in place and merge with the canvas partial by
        # log-sum-exp (merged_attention) instead of concatenating K/V every step.
        self.merge_prefix = False
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
        d = self.dequantize
        k = linear(self.k_proj, x, d).reshape(B, L, self.n_kv_heads, self.head_dim)
        v = linear(self.v_proj, x, d).reshape(B, L, self.n_kv_heads, self.head_dim) if not self.is_full else k
        k = self.rope(self.k_norm(k).transpose(0, 2, 1, 3), offset=offset)
        v = self.v_norm(v).transpose(0, 2, 1, 3)
        return k, v

    def __call__(self, x: mx.array, cache, offset, mask, write: bool) -> mx.array:
        """``write``: ``cache`` is this layer's cache and gets the new K/V (encoder).
        Otherwise ``cache`` is the (keys, values) prefix the canvas sees, ``offset`` an
        int or a per-row [B] array of positions, ``mask`` None or a key mask (decoder)."""
        B, L, _ = x.shape
        q = self.q_norm(linear(self.q_proj, x, self.dequantize).reshape(B, L, self.n_heads, self.head_dim))
        q = self.rope(q.transpose(0, 2, 1, 3), offset=offset)
        k, v = self.kv(x, offset)
        if write:
            k, v = cache.append(k, v)
            if isinstance(mask, ImageMask):
                out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask.mask)
            elif self.cpu_attention and q.dtype == k.dtype == mx.float32:
                # the mask is causal (and windowed) over positions: the kernel builds it
                out = cpu_kernels.attention(q, k, v, 1.0, causal=True, q_pos0=offset,
                                            k_pos0=offset + L - k.shape[2], window=self.window or 0)
            else:
                out = sdpa(q, k, v, mask)
        else:
            pk, pv = cache
            if pk is None:
                out = self._decoder_attention(q, k, v, mask)
            elif self.merge_prefix:
                out = merged_attention(q, pk, pv, k, v, mask)
            else:
                if pk.shape[0] != B:  # one prompt, several canvases (seeds)
                    pk = mx.broadcast_to(pk, (B, *pk.shape[1:]))
                    pv = mx.broadcast_to(pv, (B, *pv.shape[1:]))
                k, v = mx.concatenate([pk, k], axis=2), mx.concatenate([pv, v], axis=2)
                out = self._decoder_attention(q, k, v, mask)
        return linear(self.o_proj, out.transpose(0, 2, 1, 3).reshape(B, L, -1), self.dequantize)

    def _decoder_attention(self, q, k, v, mask) -> mx.array:
        """Bidirectional; ``mask`` None or a key mask [B, 1, 1, S] (ragged prefixes)."""
        if self.cpu_attention and q.dtype == k.dtype == mx.float32:
            km = None if mask is None else mask.reshape(q.shape[0], -1)
            return cpu_kernels.attention(q, k, v, 1.0, key_mask=km)
        return sdpa(q, k, v, mask)


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
        h = x + self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(x), cache, offset, mask, write)
        )
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(h)))
        indices, weights = self.router(h)
        moe = self.experts(self.pre_feedforward_layernorm_2(h), indices, weights, encoder=write)
        moe = self.post_feedforward_layernorm_2(moe)
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
        self.dequantize = False  # see linear()

    def __call__(self, embeds: mx.array, signal: Optional[mx.array]) -> mx.array:
        if signal is None:
            # Zero signal: the MLP of zeros is zero (no biases), so only the norm remains.
            return self.post_norm(embeds)
        s, d = self.pre_norm(signal), self.dequantize
        mlp = linear(self.down_proj, geglu(linear(self.gate_proj, s, d), linear(self.up_proj, s, d)), d)
        return self.post_norm(embeds + mlp)


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.self_conditioning = SelfConditioning(args)


class DiffusionGemmaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.decoder = Decoder(args)
        if args.vision_config is not None:
            # the checkpoint's model.encoder.{vision_tower,embed_vision}
            self.encoder = VisionParts(VisionArgs.from_dict(args.vision_config), args.hidden_size)


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


class ImageMask:
    """An encoder mask that is more than causal (image tokens see their whole image): the
    C attention kernel, which builds causal masks itself, must not take it."""

    def __init__(self, mask: mx.array):
        self.mask = mask


def image_groups(tokens: np.ndarray, image_token_id: int) -> np.ndarray:
    """Per position of ``tokens`` [T]: the index of the run of image tokens it is in
    (0, 1, ... in order), -1 for text (the reference's block_sequence_ids)."""
    is_image = tokens == image_token_id
    starts = is_image & ~np.concatenate([[False], is_image[:-1]])
    return np.where(is_image, np.cumsum(starts) - 1, -1)


def image_runs_end(tokens: np.ndarray, image_token_id: int, at: int) -> int:
    """``at`` moved forward past the end of an image run it falls inside: prefill chunks
    never split an image (its tokens must see each other within one pass)."""
    while 0 < at < len(tokens) and tokens[at] == image_token_id and tokens[at - 1] == image_token_id:
        at += 1
    return at


def image_mask(causal, groups: np.ndarray, n_new: int, n_keys: int) -> ImageMask:
    """``causal`` (an encoder_mask: "causal", None or [n_new, n_keys]) OR "the query and
    the key are in the same image" (the reference's blockwise overlay, which also
    overrides the sliding window). Keys before this chunk hold no image of it."""
    if causal is None or isinstance(causal, str):
        causal = mx.tril(mx.ones((n_new, n_keys), mx.bool_), k=n_keys - n_new)
    key_groups = np.concatenate([np.full(n_keys - n_new, -1), groups])
    same = (groups[:, None] == key_groups[None, :]) & (groups[:, None] >= 0)
    return ImageMask(causal | mx.array(same))


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
    """One block's decoder: the prefixes, positions and compiled forwards for one cache
    state. Callable as ``step(canvas, signal, head)``; see ``Model.decoder_step``."""

    def __init__(self, model: "Model", prefixes: List[Prefix], offset, key, rows=None):
        self.model, self.prefixes, self.offset, self.key, self.rows = model, prefixes, offset, key, rows
        # materialise padded / concatenated prefixes once, not inside every step's graph
        mx.eval([a for p in prefixes for a in p if a is not None] + ([offset] if isinstance(offset, mx.array) else []))
        self._compiled: Dict[tuple, Any] = {}

    def _forward(self, signal_given: bool, head: bool):
        model, prefixes, offset = self.model, self.prefixes, self.offset
        if signal_given:
            return lambda canvas, signal: model._decode(canvas, signal, prefixes, offset, head)
        return lambda canvas: model._decode(canvas, None, prefixes, offset, head)

    def __call__(self, canvas: mx.array, signal: Optional[mx.array], head: bool) -> mx.array:
        model = self.model
        args = (canvas,) if signal is None else (canvas, signal)
        # grouped or C experts, the C attention and the NumPy softcap go through the host: not traceable
        if (not model.compile_decoder or model.expert_dispatch != "gather" or model.cpu_attention
                or (head and model.numpy_softcap)):
            return self._forward(signal is not None, head)(*args)
        key = (signal is not None, head, model.merge_prefix)
        fn = self._compiled.get(key)
        if fn is None:
            fn = self._compiled[key] = mx.compile(self._forward(signal is not None, head))
        return fn(*args)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = DiffusionGemmaModel(args)
        self.embed_scale = args.hidden_size**0.5
        # Speed switches (outputs agree within float rounding either way; the tests
        # compare both settings; benchmarks/README.md has what each wins). Defaults per
        # backend: on GPUs the compiled decoder step with gather_mm experts; on the CPU
        # backend, where compiling buys nothing measurable and costs seconds of C++
        # builds, eager steps with experts grouped into one GEMM per expert (gather_mm
        # there is a mat-vec per (token, expert) pair: 4.3x slower at mid shapes, 3.2x at
        # the real ones).
        gpu = mx.default_device() == mx.gpu
        self.compile_decoder = gpu
        self.expert_dispatch = "gather" if gpu else ("cpu" if cpu_kernels.attention_available() else "grouped")
        self.numpy_softcap = not gpu  # see numpy_softcap (not traceable: eager steps only)
        self.prefill_chunk = 512  # encode(): tokens per encoder pass (0 = all at once)
        # CPU: attention through the C kernel (needs the built extension and a CBLAS
        # sgemm in the process: OpenBLAS, loaded by mlx_dgemma.runtime). The encoder's
        # experts may be dispatched apart from the decoder's (None: the same).
        self.cpu_attention = not gpu and cpu_kernels.attention_available()
        self.encoder_expert_dispatch = None
        # CPU: quantized layers run dequantized (per call) through float32 BLAS; the
        # vocabulary-sized tables in row chunks of ``dequantize_rows``.
        self.dequantize_matmuls = not gpu
        self.dequantize_rows = 16384

    @property
    def decoder(self) -> Decoder:
        return self.model.decoder

    @property
    def layers(self):
        return self.model.decoder.layers

    def make_cache(self) -> PrefixCache:
        return make_prefix_cache(
            [self.args.is_full(i) for i in range(self.args.num_hidden_layers)],
            self.args.sliding_window,
        )

    def _embed(self, tokens: mx.array) -> mx.array:
        h = self.decoder.embed_tokens(tokens)
        return h * mx.array(self.embed_scale, dtype=h.dtype)

    @property
    def has_vision(self) -> bool:
        return "encoder" in self.model

    def drop_vision(self) -> None:
        """Text only: a folder whose config names a vision tower but holds no weights for it."""
        if self.has_vision:
            del self.model["encoder"]

    def image_features(self, patches, positions) -> mx.array:
        """One image's soft tokens in the text model's space [n, hidden]: ``patches``
        [P, 3 * patch_size**2] in [0, 1] and ``positions`` [P, 2] from
        :func:`mlx_dgemma.image_processor.process_image` (no padding)."""
        if not self.has_vision:
            raise ValueError("this model has no vision tower (a text-only folder): it cannot read images")
        out = self.model.encoder(mx.array(patches)[None], mx.array(positions)[None])[0]
        mx.eval(out)
        return out

    def encode(self, tokens: mx.array, cache: PrefixCache, return_logits: bool = False,
               image_features: Optional[mx.array] = None) -> Optional[mx.array]:
        """Run the causal encoder over ``tokens`` [B, T] and append their K/V to ``cache``.

        Long inputs go through in chunks of ``prefill_chunk`` tokens (the same result:
        each chunk attends causally to the cache and itself). A sliding layer then scores
        each chunk against at most ``sliding_window - 1 + chunk`` keys instead of all
        ``T``, and a full layer skips most of the masked upper triangle.

        ``return_logits``: also return the encoder's next-token logits [B, T, V] (float32,
        soft-capped): the reference's ``encoder_last_hidden_state`` (final norm) through
        the tied head, as its training computes the encoder's loss. Position t predicts
        token t + 1. Costs the last layer's attention and FFN and the head, which a plain
        encode skips.

        ``image_features``: the soft tokens [n, hidden] of every image in ``tokens`` (one
        row; :meth:`image_features` per image, concatenated in prompt order); they replace
        the embeddings at the ``image_token_id`` positions, in order.
        """
        if tokens.ndim == 1:
            tokens = tokens[None]
        if image_features is not None:
            return self._encode_with_images(tokens, cache, return_logits, image_features)
        T, chunk = tokens.shape[1], self.prefill_chunk
        if chunk and T > chunk:
            out = [self._encode(tokens[:, s : s + chunk], cache, return_logits) for s in range(0, T, chunk)]
            return mx.concatenate(out, axis=1) if return_logits else None
        return self._encode(tokens, cache, return_logits)

    def _encode_with_images(self, tokens, cache, return_logits, features) -> Optional[mx.array]:
        """encode() with images: chunks end outside images, and each takes its images' rows."""
        ids = np.array(tokens)
        if ids.shape[0] != 1:
            raise ValueError(f"encode: images go with one prompt row, got {ids.shape[0]} rows")
        ids = ids[0]
        image_id = self.args.image_token_id
        n_image = int((ids == image_id).sum())
        if n_image != features.shape[0]:
            raise ValueError(f"encode: {n_image} image tokens in the prompt but {features.shape[0]} image features")
        T, chunk = len(ids), self.prefill_chunk or len(ids)
        out, start, used = [], 0, 0
        while start < T:
            end = image_runs_end(ids, image_id, min(T, start + chunk))
            n = int((ids[start:end] == image_id).sum())
            out.append(self._encode(tokens[:, start:end], cache, return_logits, features[used:used + n]))
            start, used = end, used + n
        return mx.concatenate(out, axis=1) if return_logits else None

    def _encode(self, tokens: mx.array, cache: PrefixCache, return_logits: bool = False,
                image_features: Optional[mx.array] = None) -> Optional[mx.array]:
        T = tokens.shape[1]
        offset = cache.offset
        h = self._embed(tokens)
        groups = None
        if image_features is not None and image_features.shape[0]:
            ids = np.array(tokens)[0]
            where = mx.array(np.flatnonzero(ids == self.args.image_token_id))
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
            mx.eval([c.state for c in cache])
            return None
        logits = self.lm_head(self.decoder.norm(h))  # the encoder's norm is tied to the decoder's
        mx.eval([c.state for c in cache], logits)
        return logits

    # -- the decoder pass ------------------------------------------------------------
    # Within a block the prefix is constant, so everything derived from it (each layer's
    # prefix K/V view, the ragged batch's padding and mask, the canvas positions) is built
    # once per (cache state, batch, canvas length) and kept in a DecoderStep, which also
    # holds the compiled forward (mx.compile: one graph, fused element-wise work, no
    # Python per layer per step). ``compile_decoder = False`` runs the same code eagerly.

    @property
    def expert_dispatch(self) -> str:
        return self.layers[0].experts.dispatch if self.layers else "gather"

    @expert_dispatch.setter
    def expert_dispatch(self, mode: str) -> None:
        if mode not in ("gather", "grouped", "cpu", "dense"):
            raise ValueError(f"expert_dispatch must be 'gather', 'grouped', 'cpu' or 'dense', got {mode!r}")
        for layer in self.layers:
            layer.experts.dispatch = mode

    @property
    def dequantize_matmuls(self) -> bool:
        return bool(self.__dict__.get("_dequantize", False))

    @dequantize_matmuls.setter
    def dequantize_matmuls(self, on: bool) -> None:
        object.__setattr__(self, "_dequantize", bool(on))
        mods = [self.decoder.self_conditioning]
        for layer in self.layers:
            mods += [layer.self_attn, layer.mlp, layer.router, layer.experts]
        for m in mods:
            m.dequantize = bool(on)

    @property
    def cpu_attention(self) -> bool:
        return self.layers[0].self_attn.cpu_attention if self.layers else False

    @cpu_attention.setter
    def cpu_attention(self, on: bool) -> None:
        if on and not cpu_kernels.attention_available():
            raise ValueError("cpu_attention needs the built CPU kernel and a CBLAS sgemm (OpenBLAS) on the CPU")
        for layer in self.layers:
            layer.self_attn.cpu_attention = bool(on)
        if self.has_vision:
            for layer in self.model.encoder.vision_tower.encoder.layers:
                layer.self_attn.cpu_attention = bool(on)

    @property
    def encoder_expert_dispatch(self) -> Optional[str]:
        return self.layers[0].experts.encoder_dispatch if self.layers else None

    @encoder_expert_dispatch.setter
    def encoder_expert_dispatch(self, mode: Optional[str]) -> None:
        if mode not in (None, "gather", "grouped", "cpu"):
            raise ValueError(f"encoder_expert_dispatch must be None, 'gather', 'grouped' or 'cpu', got {mode!r}")
        for layer in self.layers:
            layer.experts.encoder_dispatch = mode

    def use_traceable_paths(self) -> None:
        """Switch off every path that runs through the host or the C kernels (grouped or C
        experts, the NumPy/C soft-cap, the C attention): they can be neither differentiated
        nor compiled. Training calls this; every speed switch added here must be listed.
        The outputs agree within float rounding either way (tests/test_model_speedups.py)."""
        if self.expert_dispatch in ("grouped", "cpu"):
            self.expert_dispatch = "gather"
        self.encoder_expert_dispatch = None
        self.numpy_softcap = False
        self.cpu_attention = False
        # soft_embeddings evaluates the dequantized table chunk by chunk (not traceable), and
        # a dequantized weight would be kept in float32 for the backward pass: QLoRA trains
        # on the quantized weights, as on GPUs
        self.dequantize_matmuls = False

    @property
    def merge_prefix(self) -> bool:
        return self.layers[0].self_attn.merge_prefix if self.layers else False

    @merge_prefix.setter
    def merge_prefix(self, on: bool) -> None:
        for layer in self.layers:
            layer.self_attn.merge_prefix = bool(on)

    def decoder_step(self, cache: CacheArg, B: int, L: int) -> "DecoderStep":
        """The per-block decoder state for ``cache`` (memoised; rebuilt when it changes)."""
        if isinstance(cache, PrefixCache):
            key = (B, L, cache.version)
            memo = getattr(cache, "_decoder_step", None)
            if memo is None or memo.key != key:
                memo = DecoderStep(self, *decoder_prefixes(cache, B, L), key=key)
                cache._decoder_step = memo
            return memo
        rows = list(cache)
        if not all(isinstance(r, PrefixCache) for r in rows):
            raise ValueError("denoise: cache must be a PrefixCache or a list of PrefixCache, one per canvas row")
        key = (B, L, tuple((id(r), r.version) for r in rows))
        memo = self.__dict__.get("_ragged_step")
        if memo is None or memo.key != key:
            # ``rows`` stays referenced by the step, so the ids in its key stay unique
            memo = DecoderStep(self, *decoder_prefixes(rows, B, L), key=key, rows=rows)
            object.__setattr__(self, "_ragged_step", memo)
        return memo

    def _decode(self, canvas, signal, prefixes, offset, head: bool) -> mx.array:
        h = self.decoder.self_conditioning(self._embed(canvas), signal)
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
        step = self.decoder_step(cache, canvas.shape[0], canvas.shape[1])
        return step(canvas, signal, head)

    def hidden(
        self,
        canvas: mx.array,
        cache: CacheArg,
        self_conditioning_logits: Optional[mx.array] = None,
        self_conditioning_embeddings: Optional[mx.array] = None,
    ) -> mx.array:
        """The decoder's final hidden states for ``canvas`` [B, L]."""
        return self._run_decoder(canvas, cache, self_conditioning_logits, self_conditioning_embeddings, False)

    def denoise(
        self,
        canvas: mx.array,
        cache: CacheArg,
        self_conditioning_logits: Optional[mx.array] = None,
        self_conditioning_embeddings: Optional[mx.array] = None,
    ) -> mx.array:
        """Float32 soft-capped logits [B, L, V] for ``canvas``; the cache is only read.

        ``self_conditioning_logits`` are the previous step's temperature-scaled logits
        (or pass ``self_conditioning_embeddings`` already computed from them).
        """
        return self._run_decoder(canvas, cache, self_conditioning_logits, self_conditioning_embeddings, True)

    def _table_chunks(self):
        """(rows, dequantized float32 rows) of a quantized embedding table, in chunks."""
        emb = self.decoder.embed_tokens
        V, step = emb.weight.shape[0], max(1, self.dequantize_rows)
        for start in range(0, V, step):
            rows = slice(start, min(V, start + step))
            yield rows, dequantized(emb, rows)

    def lm_head(self, h: mx.array) -> mx.array:
        emb = self.decoder.embed_tokens
        if self.dequantize_matmuls and isinstance(emb, nn.QuantizedEmbedding):
            hf = h.astype(mx.float32)
            logits = mx.concatenate([hf @ w.T for _, w in self._table_chunks()], axis=-1)
        else:
            logits = emb.as_linear(h).astype(mx.float32)
        cap = self.args.final_logit_softcapping
        if not cap:
            return logits
        if self.numpy_softcap:
            return cpu_kernels.softcap(logits, cap) if cpu_kernels.built() else numpy_softcap(logits, cap)
        return softcap(logits, cap)

    def soft_embeddings(self, probs: mx.array) -> mx.array:
        """probs [.., V] (float32) @ embedding matrix * embedding scale, in the weights' dtype."""
        emb = self.decoder.embed_tokens
        if isinstance(emb, nn.QuantizedEmbedding) and self.dequantize_matmuls:
            dtype = emb.scales.dtype
            p = probs.astype(mx.float32)
            out = None
            for rows, w in self._table_chunks():
                part = p[..., rows] @ w
                out = part if out is None else out + part
                mx.eval(out)  # one chunk of the table at a time
            out = out.astype(dtype)
        elif isinstance(emb, nn.QuantizedEmbedding):
            dtype = emb.scales.dtype
            out = mx.quantized_matmul(
                probs.astype(dtype), emb.weight, emb.scales, emb.biases,
                transpose=False, group_size=emb.group_size, bits=emb.bits, mode=emb.mode,
            )
        else:
            dtype = emb.weight.dtype
            out = probs.astype(dtype) @ emb.weight
        return out * mx.array(self.embed_scale, dtype=dtype)

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
                    # contiguous copies, not views of the fused tensor: the CPU kernels read
                    # each expert's rows in place (the fused tensor is then freed)
                    gate, up = (mx.contiguous(t) for t in mx.split(v, 2, axis=-2))
                    split[f"{prefix}.gate_proj{suffix}"] = gate
                    split[f"{prefix}.up_proj{suffix}"] = up
        out.update(split)
        return out

    @property
    def quant_predicate(self):
        """Keep what is sensitive at 8 bits: router, embeddings/LM head, attention, dense MLP;
        the vision tower stays in float, as the converter keeps it."""

        def predicate(path: str, module: nn.Module):
            if not hasattr(module, "to_quantized") or path.startswith("model.encoder."):
                return False
            if "router" in path or "embed_tokens" in path or ".self_attn." in path:
                return {"group_size": 64, "bits": 8}
            return True

        return predicate
