"""Speed for one backend, applied to a built model from outside.

``models/diffusion_gemma.py`` holds the plain computation, the same on every device and
traceable (it can be differentiated and compiled). The faster paths of one backend are
subclasses of its modules that compute the same numbers (within float rounding;
tests/test_model_speedups.py compares each with the plain one); ``configure`` swaps
them in after construction, ``plain`` swaps them out (training needs the traceable
paths). A swap changes a module's class only: its parameters, their names and the
checkpoint's layout stay as they are.

What each buys is measured in benchmarks/README.md. The defaults (``defaults``):

- GPUs: the compiled decoder step with SwitchGLU's gather_mm experts (the plain model).
- MLX's CPU backend, where compiling buys nothing measurable and costs seconds of C++
  builds: exp and tanh from multiplies and adds (``fastmath``: MLX's CPU backend runs
  transcendentals one element at a time) in every GeGLU, and in attention and the
  soft-cap where no C kernel takes them; experts through the C kernel (``experts="cpu"``; quantized or bfloat16 experts
  and machines without the kernel take ``"grouped"``: one GEMM per used expert, where
  gather_mm runs a mat-vec per (token, expert) pair), attention through the C kernel
  (MLX's CPU SDPA materialises every score and runs a scalar softmax over them), the
  soft-cap's tanh on the host (MLX runs it one element at a time), and quantized layers
  dequantized per call into a float32 BLAS matmul (MLX's CPU quantized_matmul is a
  scalar loop, 20-35x slower at these shapes).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU, SwitchLinear

from . import fastmath
from .kernels import cpu as cpu_kernels
from .models.diffusion_gemma import (
    Attention,
    DecoderStep,
    Experts,
    GeGLU,
    ImageMask,
    Model,
    QuantizedEmbedding,
    SoftCap,
)
from .vision import VisionAttention

EXPERTS = ("gather", "grouped", "cpu", "dense", "blocked")
TRACEABLE_EXPERTS = ("gather", "dense", "blocked")  # the dispatches that differentiate and compile


# -- dequantized matmuls (CPU) ---------------------------------------------------------


def dequantized(m: nn.Module, rows=None) -> mx.array:
    """The float weight of a quantized layer (rows ``rows`` of it), float32."""
    w, scales, biases = m.weight, m.scales, m.get("biases")
    if rows is not None:
        w, scales = w[rows], scales[rows]
        biases = None if biases is None else biases[rows]
    out = mx.dequantize(w, scales, biases, group_size=m.group_size, bits=m.bits, mode=m.mode)
    return out.astype(mx.float32)


class DequantizedLinear(nn.QuantizedLinear):
    """A quantized linear run as its dequantized weight through a float32 BLAS matmul;
    the float weight lives for this call only."""

    def __call__(self, x: mx.array) -> mx.array:
        y = (x.astype(mx.float32) @ dequantized(self).T).astype(x.dtype)
        return y + self.bias if "bias" in self else y


class DequantizedEmbedding(QuantizedEmbedding):
    """The tied head and the soft lookup over the dequantized table, ``rows`` rows at a time."""

    rows = 16384

    def _chunks(self):
        V = self.weight.shape[0]
        for start in range(0, V, self.rows):
            rows = slice(start, min(V, start + self.rows))
            yield rows, dequantized(self, rows)

    def as_linear(self, x: mx.array) -> mx.array:
        xf = x.astype(mx.float32)
        return mx.concatenate([xf @ w.T for _, w in self._chunks()], axis=-1)

    def mix(self, probs: mx.array) -> mx.array:
        p, out = probs.astype(mx.float32), None
        for rows, w in self._chunks():
            part = p[..., rows] @ w
            out = part if out is None else out + part
            mx.eval(out)  # one chunk of the table at a time
        return out.astype(self.scales.dtype)


# -- the soft-cap on the host (CPU) ----------------------------------------------------


def numpy_softcap(x: mx.array, cap: float) -> mx.array:
    """``tanh(x / cap) * cap`` through NumPy: MLX's CPU backend evaluates tanh one element
    at a time (~15 ns each; 256 x 262,144 logits take 1.5 s), NumPy with SIMD (5-9x
    faster, within 1 ulp). Evaluates ``x``."""
    y = np.asarray(x) / np.float32(cap)  # a view of the evaluated buffer: no copy
    np.tanh(y, out=y)
    y *= np.float32(cap)
    return mx.array(y)


class HostSoftCap(SoftCap):
    def __call__(self, logits: mx.array) -> mx.array:
        if not self.cap:
            return logits
        return cpu_kernels.softcap(logits, self.cap) if cpu_kernels.built() else numpy_softcap(logits, self.cap)


# -- fastmath: exp/tanh/softmax from multiplies and adds (MLX's CPU backend, float32) -----


class FastGeGLU(GeGLU):
    """gelu(tanh) * up with fastmath's tanh (float32; other dtypes as before)."""

    def __call__(self, x: mx.array, gate: mx.array) -> mx.array:
        if gate.dtype != mx.float32:
            return super().__call__(x, gate)
        return fastmath.geglu(gate, x)


class FastSoftCap(SoftCap):
    def __call__(self, logits: mx.array) -> mx.array:
        if not self.cap or logits.dtype != mx.float32:
            return super().__call__(logits)
        return fastmath.softcap(logits, self.cap)


CAUSAL_SPLIT_MIN = 64  # a whole causal sequence at least this long runs as two query halves


def causal_halves(q: mx.array, k: mx.array, v: mx.array, mask) -> mx.array:
    """fastmath's attention of a whole causal sequence (queries = keys) as two query halves,
    the first over the first half's keys alone: a quarter fewer scores, all of them ones
    the causal mask hides (they weigh exactly 0), so the same numbers. ``mask``: "causal"
    or a causal (and windowed) boolean [L, L] mask from ``encoder_mask``."""
    h = q.shape[2] // 2
    first = fastmath.attention(q[:, :, :h], k[:, :, :h], v[:, :, :h], 1.0,
                               mask if isinstance(mask, str) else mask[:h, :h])
    second = fastmath.attention(q[:, :, h:], k, v, 1.0, mask if isinstance(mask, str) else mask[h:])
    return mx.concatenate([first, second], axis=2)


class FastAttention(Attention):
    """Attention with fastmath's softmax: differentiable and traceable, unlike the C kernel,
    and 3x faster than the softmax of MLX's CPU SDPA fallback. The encoder's attention over
    a whole sequence (training) runs in causal halves (``causal_halves``: the loss and
    gradient of a Sudoku batch of 8, one thread, 680 against 722 ms; the two-process step
    within its noise)."""

    def encoder_attention(self, q, k, v, mask, offset: int) -> mx.array:
        if not q.dtype == k.dtype == mx.float32:
            return super().encoder_attention(q, k, v, mask, offset)
        if isinstance(mask, ImageMask):  # image tokens see their whole image: not causal
            return fastmath.attention(q, k, v, 1.0, mask.mask)
        if q.shape[2] == k.shape[2] >= CAUSAL_SPLIT_MIN and mask is not None:
            return causal_halves(q, k, v, mask)
        return fastmath.attention(q, k, v, 1.0, mask)

    def decoder_attention(self, q, k, v, mask) -> mx.array:
        if not q.dtype == k.dtype == mx.float32:
            return super().decoder_attention(q, k, v, mask)
        return fastmath.attention(q, k, v, 1.0, mask)


# -- attention through the C kernel (CPU) ----------------------------------------------


class KernelAttention(Attention):
    """Float32 attention through kernels.cpu.attention (it builds causal/window masks itself)."""

    def encoder_attention(self, q, k, v, mask, offset: int) -> mx.array:
        if isinstance(mask, ImageMask) or not q.dtype == k.dtype == mx.float32:
            return super().encoder_attention(q, k, v, mask, offset)
        L = q.shape[2]
        return cpu_kernels.attention(q, k, v, 1.0, causal=True, q_pos0=offset,
                                     k_pos0=offset + L - k.shape[2], window=self.window or 0)

    def decoder_attention(self, q, k, v, mask) -> mx.array:
        if not q.dtype == k.dtype == mx.float32:
            return super().decoder_attention(q, k, v, mask)
        km = None if mask is None else mask.reshape(q.shape[0], -1)
        return cpu_kernels.attention(q, k, v, 1.0, key_mask=km)


class KernelVisionAttention(VisionAttention):
    def attend(self, q, k, v, mask) -> mx.array:
        if q.dtype != mx.float32:
            return super().attend(q, k, v, mask)
        km = None if mask is None else mask.reshape(q.shape[0], -1)
        return cpu_kernels.attention(q, k, v, 1.0, key_mask=km)


# -- experts ---------------------------------------------------------------------------


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


@mx.custom_function
def _expert_rows(x: mx.array, token: mx.array, dest: mx.array) -> mx.array:
    """The rows of the blocked layout: ``x`` [N, H] with a zero row appended, taken at
    ``token`` [R] (N for a padding row). ``dest`` [N, K] (where each (token, slot) pair
    went) serves the derivative: a gather back, not MLX's scatter-add (slow on the CPU)."""
    return mx.concatenate([x, mx.zeros((1, x.shape[1]), x.dtype)])[token]


@_expert_rows.vjp
def _expert_rows_vjp(primals, cotangent, output):
    x, token, dest = primals
    return cotangent[dest].sum(1), mx.zeros_like(token), mx.zeros_like(dest)


@mx.custom_function
def _expert_slots(y: mx.array, dest: mx.array, source: mx.array) -> mx.array:
    """The blocked layout's rows [R, H] back in (token, slot) order: ``y[dest]``. Its
    derivative gathers through ``source`` [R] (the pair in each row, A for padding)."""
    return y[dest]


@_expert_slots.vjp
def _expert_slots_vjp(primals, cotangent, output):
    y, dest, source = primals
    padded = mx.concatenate([cotangent, mx.zeros((1, cotangent.shape[1]), cotangent.dtype)])
    return padded[source], mx.zeros_like(dest), mx.zeros_like(source)


def blocked_switch_glu(glu: SwitchGLU, x: mx.array, indices: mx.array, block: int = 64) -> mx.array:
    """SwitchGLU(x, indices) with the (token, expert) pairs laid out expert by expert in
    blocks of ``block`` rows, each block one GEMM against its expert's weights
    (``gather_mm`` over the blocks, sorted).

    Every shape is fixed by the number of pairs (each expert's rows are padded to whole
    blocks; the layout has room for the worst case), so it is traceable and compiles,
    unlike ``grouped_switch_glu``; and it does the routed experts' FLOPs (plus the
    padding) where ``dense_switch_glu`` does every expert's. The pairs move in and out of
    the layout by gathers whose derivatives are gathers too (``_expert_rows``,
    ``_expert_slots``). Training a 128-wide, 8-expert, top-2 model on the CPU: one layer's
    experts, forward and backward over 1,416 tokens, 9 ms against the dense path's 25.
    """
    *lead, K = indices.shape
    H = x.shape[-1]
    E = glu.gate_proj.weight.shape[0]
    pairs = indices.reshape(-1)
    A = pairs.shape[0]
    onehot = (pairs[:, None] == mx.arange(E)[None]).astype(mx.int32)  # [A, E]
    rank = mx.take_along_axis(mx.cumsum(onehot, axis=0) - onehot, pairs[:, None], axis=1)[:, 0]
    padded = (onehot.sum(0) + block - 1) // block * block
    starts = mx.cumsum(padded) - padded
    dest = starts[pairs] + rank  # each pair's row: its expert's start, then in pair order
    R = -(-(A + E * (block - 1)) // block) * block  # the worst case of the padding
    source = mx.zeros((R,), mx.int32).at[dest].add(mx.arange(1, A + 1, dtype=mx.int32)) - 1
    source = mx.where(source < 0, A, source)
    rows = _expert_rows(x.reshape(-1, H), source // K, dest.reshape(-1, K)).reshape(R // block, block, H)
    experts = (starts[None, :] <= (mx.arange(R // block) * block)[:, None]).sum(1) - 1  # each block's

    def project(lin: SwitchLinear, h: mx.array) -> mx.array:
        return mx.gather_mm(h, lin.weight.swapaxes(-1, -2), rhs_indices=experts, sorted_indices=True)

    h = glu.activation(project(glu.up_proj, rows), project(glu.gate_proj, rows))
    y = project(glu.down_proj, h).reshape(R, -1)
    return _expert_slots(y, dest, source).reshape(*lead, K, y.shape[-1])


class GroupedExperts(Experts):
    """One GEMM per used expert (``grouped_switch_glu``); quantized experts dequantized
    per expert when ``dequantize``."""

    dequantize = False

    def __call__(self, x, indices, weights):
        glu = self.switch_glu
        if getattr(glu.gate_proj, "global_scale", None) is not None:
            return super().__call__(x, indices, weights)
        y = grouped_switch_glu(glu, x, indices, self.dequantize)
        return (y * weights[..., None].astype(y.dtype)).sum(-2)


class KernelExperts(GroupedExperts):
    """Float32 experts through the C kernel (kernels.cpu.moe); others grouped."""

    def __call__(self, x, indices, weights):
        if cpu_kernels.moe_supported(self.switch_glu):
            return cpu_kernels.moe(self.switch_glu, x, indices, weights)
        return super().__call__(x, indices, weights)


class DenseExperts(Experts):
    """Every expert on every token (``dense_switch_glu``): traceable, for training small
    float models on the CPU."""

    def __call__(self, x, indices, weights):
        if not isinstance(self.switch_glu.gate_proj, SwitchLinear):
            return super().__call__(x, indices, weights)
        return dense_switch_glu(self.switch_glu, x, indices, weights)


class BlockedExperts(Experts):
    """The routed experts in fixed-shape blocks (``blocked_switch_glu``): traceable, for
    training on the CPU."""

    def __call__(self, x, indices, weights):
        glu = self.switch_glu
        if not isinstance(glu.gate_proj, SwitchLinear) or any(
                "bias" in lin for lin in (glu.gate_proj, glu.up_proj, glu.down_proj)):
            return super().__call__(x, indices, weights)
        y = blocked_switch_glu(glu, x, indices)
        return (y * weights[..., None].astype(y.dtype)).sum(-2)


EXPERT_TYPES = {"gather": Experts, "grouped": GroupedExperts, "cpu": KernelExperts, "dense": DenseExperts,
                "blocked": BlockedExperts}


# -- the compiled decoder step (GPUs) --------------------------------------------------


class CompiledDecoderStep(DecoderStep):
    """The decoder step through mx.compile: one graph, fused element-wise work, no Python
    per layer per step. Only for the plain (traceable) modules."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._compiled: Dict[tuple, object] = {}

    def __call__(self, canvas, signal, head):
        key = (signal is not None, head)
        fn = self._compiled.get(key)
        if fn is None:
            if signal is None:
                fn = mx.compile(lambda c: self.forward(c, None, head))
            else:
                fn = mx.compile(lambda c, s: self.forward(c, s, head))
            self._compiled[key] = fn
        return fn(canvas) if signal is None else fn(canvas, signal)


# -- configure -------------------------------------------------------------------------


def _swap(module: nn.Module, cls: type) -> None:
    """Give ``module`` the class ``cls`` (a subclass of its plain class, or that class):
    the same parameters, another ``__call__``."""
    plain = _plain_type(type(module))
    if not issubclass(cls, plain):
        raise TypeError(f"{cls.__name__} is not a {plain.__name__}")
    module.__class__ = cls


def _plain_type(cls: type) -> type:
    while cls.__module__ == __name__:
        cls = cls.__bases__[0]
    return cls


def _quantized_linears(model: Model):
    """The quantized linears outside the experts and the vision tower."""
    for path, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear) and not path.startswith("model.encoder."):
            yield m


def _geglus(model: Model):
    """Every GeGLU activation: the MLPs', the self-conditioning MLP's and the experts'."""
    for _, m in model.named_modules():
        if isinstance(m, GeGLU):
            yield m


def _vision_attention(model: Model):
    if model.has_vision:
        for layer in model.model.encoder.vision_tower.encoder.layers:
            yield layer.self_attn


def configure(model: Model, *, experts: Optional[str] = None, attention: Optional[bool] = None,
              host_softcap: Optional[bool] = None, dequantize: Optional[bool] = None,
              compile: Optional[bool] = None, fastmath: Optional[bool] = None) -> Model:
    """Switch the given paths (None: leave as is).

    ``experts``: "gather" (SwitchGLU's gather_mm: GPUs), "grouped" (one GEMM per used
    expert: the CPU), "cpu" (the C kernel for float32 experts, else grouped), "dense"
    (every expert on every token), "blocked" (the routed pairs in fixed-shape blocks:
    training on the CPU). ``attention``: the
    C attention kernel (the CPU). ``host_softcap``: the soft-cap's tanh on the host.
    ``dequantize``: quantized layers as float32 BLAS matmuls (the CPU). ``compile``: the
    decoder step through mx.compile (only with the traceable paths: gather, dense or
    blocked experts, no C attention, no host soft-cap, no per-call dequantizing). ``fastmath``:
    exp/tanh from multiplies and adds for float32 (the CPU; traceable): every GeGLU, and
    the attention and soft-cap that no C kernel or host path takes.
    """
    given = dict(experts=experts, attention=attention, host_softcap=host_softcap, dequantize=dequantize,
                 compile=compile, fastmath=fastmath)
    want = {**settings(model), **{k: v for k, v in given.items() if v is not None}}
    if want["experts"] not in EXPERT_TYPES:
        raise ValueError(f"experts must be one of {', '.join(EXPERTS)}, got {want['experts']!r}")
    if attention and not cpu_kernels.attention_available():
        raise ValueError("the C attention needs the built CPU kernel and a CBLAS sgemm (OpenBLAS) on the CPU")
    if want["compile"] and not _traceable(want):
        raise ValueError("compile needs the traceable paths (gather, dense or blocked experts, plain attention and "
                         "soft-cap, no per-call dequantizing)")
    fast = bool(want["fastmath"])
    for layer in model.layers:
        _swap(layer.experts, EXPERT_TYPES[want["experts"]])
        _swap(layer.self_attn, KernelAttention if want["attention"] else FastAttention if fast else Attention)
    for attn in _vision_attention(model):
        _swap(attn, KernelVisionAttention if want["attention"] else VisionAttention)
    _swap(model.softcap, HostSoftCap if want["host_softcap"] else FastSoftCap if fast else SoftCap)
    for m in _geglus(model):
        _swap(m, FastGeGLU if fast else GeGLU)
    for m in _quantized_linears(model):
        if getattr(m, "global_scale", None) is None:
            _swap(m, DequantizedLinear if want["dequantize"] else nn.QuantizedLinear)
    for layer in model.layers:
        if isinstance(layer.experts, GroupedExperts):
            layer.experts.dequantize = bool(want["dequantize"])
    emb = model.decoder.embed_tokens
    if isinstance(emb, QuantizedEmbedding):
        _swap(emb, DequantizedEmbedding if want["dequantize"] else QuantizedEmbedding)
    step_type = CompiledDecoderStep if want["compile"] else DecoderStep
    if model.decoder_step_type is not step_type:
        model.decoder_step_type = step_type
        object.__setattr__(model, "_decoder_steps", {})  # steps made with the other type
    return model


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def defaults(model: Model) -> Model:
    """The backend's fastest paths for the default device (see the module's docstring)."""
    if not on_cpu():
        return configure(model, experts="gather", attention=False, host_softcap=False, dequantize=False,
                         compile=True, fastmath=False)
    kernel = cpu_kernels.attention_available()
    return configure(model, compile=False, experts="cpu" if kernel else "grouped", attention=kernel,
                     host_softcap=True, dequantize=True, fastmath=True)


@contextmanager
def fastest_paths(model: Model) -> Iterator[Model]:
    """The device's fastest paths (``defaults``) inside the block, the model's own settings
    after it: a training run that evaluates by generating (it trains on the plain paths;
    on this CPU the C kernels solve the Sudoku validation puzzles 1.7x faster, with the
    same results)."""
    before = settings(model)
    defaults(model)
    try:
        yield model
    finally:
        configure(model, **before)


def plain(model: Model) -> Model:
    """The traceable paths (no host round trips, no C kernels, no per-call dequantizing):
    what training needs; on the CPU with fastmath's exp and tanh (traceable, and
    differentiable through their own derivatives). A model set to a traceable expert
    dispatch (gather, dense or blocked) keeps it; others take gather."""
    experts = settings(model)["experts"]
    configure(model, experts=experts if experts in TRACEABLE_EXPERTS else "gather", attention=False,
              host_softcap=False, dequantize=False, compile=False, fastmath=on_cpu())
    return model


def settings(model: Model) -> dict:
    """Which paths the model runs now (``configure``'s arguments)."""
    names = {cls: name for name, cls in EXPERT_TYPES.items()}
    experts = model.layers[0].experts if model.layers else None
    return dict(
        experts=names.get(type(experts), "gather") if experts is not None else "gather",
        attention=bool(model.layers) and isinstance(model.layers[0].self_attn, KernelAttention),
        host_softcap=isinstance(model.softcap, HostSoftCap),
        dequantize=any(isinstance(m, DequantizedLinear) for m in _quantized_linears(model))
        or isinstance(model.decoder.embed_tokens, DequantizedEmbedding)
        or any(getattr(layer.experts, "dequantize", False)
               and isinstance(layer.experts.switch_glu.gate_proj, QuantizedSwitchLinear) for layer in model.layers),
        compile=model.decoder_step_type is CompiledDecoderStep,
        fastmath=any(isinstance(m, FastGeGLU) for m in _geglus(model)),
    )


def _traceable(s: dict) -> bool:
    return s["experts"] in TRACEABLE_EXPERTS and not (s["attention"] or s["host_softcap"] or s["dequantize"])


def traceable(model: Model) -> bool:
    """Whether every path the model runs can be differentiated and compiled."""
    return _traceable(settings(model))
