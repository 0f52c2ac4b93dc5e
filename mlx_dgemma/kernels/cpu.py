"""The fused sampling step on MLX's CPU backend: a C extension (``_cpu.c``), when built.

MLX's CPU backend runs element-wise ops one element at a time, and the MLX path makes
some 26 passes over [B, L, V] per step. ``_cpu`` makes one multi-threaded pass per
position instead (C, auto-vectorised, AVX2/FMA clone on x86-64 Linux) and draws the
very tokens the MLX path draws (see ``_cpu.c``). It also writes the self-conditioning
probabilities ``exp(logits / t - lse)`` from the same pass; they ride on the returned
sample (``probs``) for ``kernels.soft_embeddings`` to take instead of another pass.

Built by ``pip install`` (``setup.py``, optional: without a C compiler the install
still succeeds and the dispatch notes once that it uses the MLX path).
"""

from __future__ import annotations

import os
from typing import Optional, Union

import mlx.core as mx
import numpy as np

from ..sampling import StepSample
from ._launch import check_shapes

NAME = "cpu"

try:
    from . import _cpu
except ImportError:  # not built (no compiler at install time, or a source checkout)
    _cpu = None


_log_checked = False


def info() -> dict:
    """Which passes run: {'avx2': bool, 'vector_noise': bool} ({} when not built)."""
    return _cpu.info() if _cpu is not None else {}


class CPUStepSample(StepSample):
    """A ``StepSample`` that may also carry this step's softmax(logits / t) [B, L, V]
    float32 (``probs``), consumed (and dropped) by ``kernels.soft_embeddings``."""

    probs: Optional[mx.array] = None


def built() -> bool:
    return _cpu is not None


def available() -> bool:
    """Built, and MLX computes on the CPU (with a GPU the GPU kernels are the ones to use)."""
    return _cpu is not None and mx.default_device() == mx.cpu


_sgemm: Optional[bool] = None


def attention_available() -> bool:
    """The C attention can run: built, on the CPU, and a CBLAS sgemm is loaded globally
    (OpenBLAS, by mlx_dgemma.runtime or LD_PRELOAD)."""
    global _sgemm
    if _cpu is None or mx.default_device() != mx.cpu:
        return False
    if _sgemm is None:
        _sgemm = bool(_cpu.find_sgemm())
    return _sgemm


# Query rows per block: the scores of a block (rows x keys float32) are the workspace,
# e.g. 256 x 16,640 keys = 17 MB instead of 8 x 256 x 16,640 = 136 MB for all heads.
ATTENTION_BLOCK_ROWS = 256


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, *, causal: bool = False, q_pos0: int = 0,
              k_pos0: int = 0, window: int = 0, key_mask: Optional[mx.array] = None) -> mx.array:
    """softmax(q k^T * scale + mask) v through the C kernel (float32; evaluates its inputs).

    q [B, Hq, L, D]; k [Bk, Hkv, S, D], v [Bk, Hkv, S, Dv] with Bk 1 or B; grouped heads
    (Hq a multiple of Hkv). ``causal``: query i sits at ``q_pos0 + i`` and key j at
    ``k_pos0 + j``; a key is visible when not after the query and, with ``window``, less
    than ``window`` positions before it. ``key_mask`` [B, S] bool: visible keys. A query
    that sees no key gets 0.
    """
    B, Hq, L, D = q.shape
    Bk, Hkv, S, _ = k.shape
    Dv = v.shape[-1]
    qn = np.ascontiguousarray(np.asarray(q))
    kn = np.ascontiguousarray(np.asarray(k))
    vn = np.ascontiguousarray(np.asarray(v))
    mask = None if key_mask is None else np.ascontiguousarray(np.asarray(key_mask.astype(mx.uint8)))
    out = np.empty((B, Hq, L, Dv), np.float32)
    _cpu.attention(qn, kn, vn, out, B, Hq, Hkv, L, S, D, Dv, Bk, float(scale), bool(causal), int(q_pos0),
                   int(k_pos0), int(window), mask, ATTENTION_BLOCK_ROWS, threads())
    return mx.array(out)


def moe_supported(glu) -> bool:
    """A float32, unquantized SwitchGLU whose activation is GeGLU (DiffusionGemma's)."""
    from mlx_lm.models.switch_layers import SwitchLinear

    lins = (glu.gate_proj, glu.up_proj, glu.down_proj)
    return (attention_available() and all(type(p) is SwitchLinear and "bias" not in p for p in lins)
            and all(p.weight.dtype == mx.float32 and np.asarray(p.weight).flags.c_contiguous for p in lins))


def moe(glu, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
    """``sum_k weights[..., k] * SwitchGLU(x, indices)[..., k, :]`` with gelu(tanh) * up,
    through the C kernel (float32; evaluates its inputs). x [..., H]; indices, weights [..., K]."""
    *lead, H = x.shape
    K = indices.shape[-1]
    N = int(np.prod(lead)) if lead else 1
    wg, wu, wd = glu.gate_proj.weight, glu.up_proj.weight, glu.down_proj.weight
    E, I = wg.shape[0], wg.shape[1]
    xn = np.ascontiguousarray(np.asarray(x.astype(mx.float32)))
    idx = np.ascontiguousarray(np.asarray(indices.astype(mx.int32)))
    w = np.ascontiguousarray(np.asarray(weights.astype(mx.float32)))
    out = np.empty((N, H), np.float32)
    # the weights are used in place (a copy per call would cost more than the GEMMs)
    _cpu.moe(xn, idx, w, np.asarray(wg), np.asarray(wu), np.asarray(wd), out, N, K, E, H, I, threads())
    return mx.array(out).reshape(*lead, H)


def softcap(x: mx.array, cap: float) -> mx.array:
    """``tanh(x / cap) * cap`` (float32) through the C kernel; evaluates ``x``."""
    xn = np.ascontiguousarray(np.asarray(x.astype(mx.float32)))
    out = np.empty_like(xn)
    _cpu.softcap(xn, out, xn.size, float(cap), threads())
    return mx.array(out)


def threads() -> int:
    n = os.environ.get("MLX_DGEMMA_CPU_THREADS")
    if n and n.isdigit() and int(n) > 0:
        return int(n)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def make_sample_step(with_probs: bool = True):
    """``sample_step(logits, temp, keys)`` through ``_cpu``; evaluates ``logits``."""
    if _cpu is None:
        raise RuntimeError("the CPU sampling kernel is not built (pip install needs a C compiler)")
    n_threads = threads()
    global _log_checked
    if not _log_checked:  # once per process (~0.3 s): the vectorised noise must equal logf's
        _cpu.check_log()
        _log_checked = True

    def sample_step(logits: mx.array, temp: Union[float, mx.array], keys: mx.array) -> StepSample:
        check_shapes(logits, keys)
        B, L, V = logits.shape
        rows = B * L
        # zero-copy views of the evaluated arrays when they are contiguous
        x = np.ascontiguousarray(np.asarray(logits.astype(mx.float32)))
        k = np.ascontiguousarray(np.asarray(keys.astype(mx.uint32)))
        sampled, argmax = np.empty(rows, np.int32), np.empty(rows, np.int32)
        entropy, lse = np.empty(rows, np.float32), np.empty(rows, np.float32)
        probs = np.empty((B, L, V), np.float32) if with_probs else None
        _cpu.sample_step(x, float(np.float32(temp)), k, rows, V, sampled, argmax, entropy, lse, probs, n_threads)
        out = CPUStepSample(*(mx.array(a.reshape(B, L)) for a in (sampled, argmax, entropy, lse)))
        if probs is not None:
            out.probs = mx.array(probs)
        return out

    return sample_step
