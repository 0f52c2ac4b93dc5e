"""Fused drafter kernels with a checked fallback.

``sample_step(logits, temp, keys)`` has the semantics of ``sampling.sample_step_mlx``
and runs, in order of preference:

- ``metal``: the fused kernel through ``mx.fast.metal_kernel`` (Apple GPUs),
- ``cuda``: the same algorithm through ``mx.fast.cuda_kernel`` (MLX's CUDA build),
- ``cpu``: a C extension on MLX's CPU backend (``cpu.py``, built by ``pip install``),
- ``mlx``: the pure-MLX path (everything else, and the fallback).

On first use in a process the chosen kernel is run against the MLX path on a small
random input (``self_check``); if it fails to build or run, or disagrees, a warning is
issued once and the MLX path is used instead. ``MLX_DGEMMA_SAMPLER=mlx|metal|cuda|cpu|auto``
forces a path (a forced kernel still goes through the self-check). ``backend()`` names
the active path.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Callable, Dict, Optional, Tuple, Union

import mlx.core as mx
import numpy as np

from .. import rng
from ..sampling import StepSample, probabilities, sample_step_mlx
from . import cpu, cuda, metal
from .selfcond import soft_embeddings, topk_soft_embeddings

ENV = "MLX_DGEMMA_SAMPLER"
CHOICES = ("auto", "mlx", "metal", "cuda", "cpu")
MLX = "mlx"

SampleFn = Callable[[mx.array, Union[float, mx.array], mx.array], StepSample]

# name -> (available(), make_sample_step()); tests swap in fakes here.
_KERNELS: Dict[str, Tuple[Callable[[], bool], Callable[[], SampleFn]]] = {
    metal.NAME: (metal.available, metal.make_sample_step),
    cuda.NAME: (cuda.available, cuda.make_sample_step),
    cpu.NAME: (cpu.available, cpu.make_sample_step),
}
_lock = threading.RLock()
_active: Optional[Tuple[str, str, SampleFn]] = None  # (env value, backend name, fn)
_reason = ""
_warned: set = set()

__all__ = [
    "ENV",
    "StepSample",
    "backend",
    "backend_reason",
    "probabilities",
    "reset",
    "sample_step",
    "sample_step_mlx",
    "self_check",
    "soft_embeddings",
    "topk_soft_embeddings",
]


def _env_choice() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(CHOICES)}")
    return value


def _warn_once(name: str, message: str) -> None:
    if name not in _warned:
        _warned.add(name)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def self_check(fn: SampleFn, seed: int = 0) -> Optional[str]:
    """Run ``fn`` against the MLX path on a small random input; None when they agree.

    The input has a vocabulary that is no multiple of the group size (tails), a peaked
    row (large |x|, as soft-capped logits at low temperature), an exact argmax tie (the
    lower token must win) and several batch rows with their own keys.
    """
    r = np.random.RandomState(seed)
    B, L, V = 2, 5, 3001
    x = r.standard_normal((B, L, V)).astype(np.float32) * 2.0
    x[0, 0] *= 15.0
    x[1, 2, [7, 2500]] = x[1, 2].max() + 1.0
    logits = mx.array(x)
    temp = 0.7
    keys = rng.position_keys([seed, seed + 1], rng.SAMPLE, 3, 5, L)
    want = sample_step_mlx(logits, temp, keys)
    got = fn(logits, temp, keys)
    mx.eval(want, got)
    for field in StepSample._fields:
        w, g = getattr(want, field), getattr(got, field)
        if g.shape != w.shape or g.dtype != w.dtype:
            return f"{field}: got {g.dtype}{tuple(g.shape)}, expected {w.dtype}{tuple(w.shape)}"
    if not np.array_equal(np.array(got.argmax), np.array(want.argmax)):
        return "argmax differs from the MLX path"
    sampled_g, sampled_w = np.array(got.sampled), np.array(want.sampled)
    if not np.array_equal(sampled_g, sampled_w):
        # Accept only last-ulp near-ties of x + g (log rounding differs per backend).
        y = np.array(logits / temp + rng.gumbel(keys, V))
        for b, l in zip(*np.nonzero(sampled_g != sampled_w)):
            a, c = y[b, l, sampled_g[b, l]], y[b, l, sampled_w[b, l]]
            if not abs(a - c) <= 1e-5 * max(1.0, abs(c)):
                return f"sampled token differs from the MLX path at {(int(b), int(l))}"
    if not np.allclose(np.array(got.lse), np.array(want.lse), rtol=1e-5, atol=1e-4):
        return "log-sum-exp differs from the MLX path"
    # The MLX path's ``lse - sum(p * x)`` cancels on peaked rows (error ~1e-5 * |lse|);
    # the kernels keep x - max and are closer to the exact value: allow for the former.
    e_got, e_want, lse = np.array(got.entropy), np.array(want.entropy), np.array(want.lse)
    if not np.all(np.abs(e_got - e_want) <= 1e-4 + 1e-4 * np.abs(e_want) + 1e-5 * np.abs(lse)):
        return "entropy differs from the MLX path"
    return None


def _select(choice: str) -> Tuple[str, SampleFn, str]:
    """(name, fn, reason) for an env choice; kernels are built and self-checked here."""
    if choice == MLX:
        return MLX, sample_step_mlx, f"{ENV}=mlx"
    if choice == "auto":
        names = [n for n, (avail, _) in _KERNELS.items() if avail()]
        if not names:
            if mx.default_device() == mx.cpu and not cpu.built():
                _warn_once(cpu.NAME, "mlx_dgemma: the CPU sampling kernel is not built (installing needs a C "
                                     "compiler); sampling uses the slower pure-MLX path")
                return MLX, sample_step_mlx, "CPU sampling kernel not built: the pure-MLX path"
            return MLX, sample_step_mlx, "no Metal or CUDA device: the pure-MLX path"
        name = names[0]
    else:
        name = choice
        if not _KERNELS[name][0]():
            _warn_once(name, f"{ENV}={name} but no {name} device here; using the MLX path")
            return MLX, sample_step_mlx, f"{name} forced but not available"
    try:
        fn = _KERNELS[name][1]()
        problem = self_check(fn)
    except Exception as e:  # compile errors, launch limits, missing device ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        problem = f"failed to build or run ({type(e).__name__}: {first})"
    if problem:
        _warn_once(name, f"mlx_dgemma: the {name} sampling kernel {problem}; using the MLX path")
        return MLX, sample_step_mlx, f"{name} kernel rejected: {problem}"
    return name, fn, f"{name} kernel (self-check passed)"


def _resolve() -> Tuple[str, SampleFn]:
    global _active, _reason
    choice = _env_choice()
    with _lock:
        if _active is None or _active[0] != choice:
            name, fn, _reason = _select(choice)
            _active = (choice, name, fn)
        return _active[1], _active[2]


def backend() -> str:
    """The active path: 'metal', 'cuda', 'cpu' or 'mlx' (selects and self-checks on first call)."""
    return _resolve()[0]


def backend_reason() -> str:
    """Why the active path was chosen (for logs and bug reports)."""
    _resolve()
    return _reason


def reset() -> None:
    """Forget the selection and the warnings (tests; after changing devices)."""
    global _active, _reason
    with _lock:
        _active, _reason = None, ""
        _warned.clear()


def sample_step(logits: mx.array, temp: Union[float, mx.array], keys: mx.array) -> StepSample:
    """``sample_step_mlx`` semantics on the fastest checked backend.

    logits [B, L, V] float32; keys [B, L] uint32 (``rng.position_keys(.., rng.SAMPLE, ..)``).
    """
    global _active, _reason
    name, fn = _resolve()
    if name == MLX:
        return fn(logits, temp, keys)
    try:
        return fn(logits, temp, keys)
    except Exception as e:  # a shape the self-check did not cover
        _warn_once(name, f"mlx_dgemma: the {name} sampling kernel raised {type(e).__name__}: {e}; "
                         "using the MLX path")
        with _lock:
            _active = (_active[0], MLX, sample_step_mlx) if _active else None
            _reason = f"{name} kernel raised {type(e).__name__}"
        return sample_step_mlx(logits, temp, keys)
