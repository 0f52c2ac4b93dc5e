"""Shared pieces of the benchmark: configurations, fixed inputs, timing, memory.

Imported by the orchestrator (``run.py``) and by every backend worker (``worker.py``);
it imports neither MLX nor torch, so each worker pays only for its own framework.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"

# The reference's sampler defaults (generation_config of the released checkpoint).
T_MIN, T_MAX, ENTROPY_BOUND = 0.4, 0.8, 0.1
STABILITY, CONFIDENCE = 1, 0.005

_REAL_LAYERS = ["sliding_attention", "full_attention"]

# Text-config overrides on top of tests/reference/hf_reference.TINY_TEXT.
CONFIGS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(canvas_length=16, text={}, e2e_steps=48),
    "mid": dict(
        canvas_length=256,
        e2e_steps=16,
        text=dict(
            vocab_size=32768, hidden_size=512, intermediate_size=384, num_hidden_layers=6,
            num_attention_heads=8, num_key_value_heads=4, head_dim=64, global_head_dim=128,
            num_global_key_value_heads=1, sliding_window=128, num_experts=32, top_k_experts=8,
            moe_intermediate_size=128,
            layer_types=["sliding_attention"] * 5 + ["full_attention"],
        ),
    ),
    # The released checkpoint's shapes (spec note) with 2 layers: one sliding, one full.
    "real-layer": dict(
        canvas_length=256,
        e2e_steps=4,
        text=dict(
            vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=2,
            num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
            num_global_key_value_heads=2, sliding_window=1024, num_experts=128, top_k_experts=8,
            moe_intermediate_size=704, layer_types=_REAL_LAYERS,
        ),
    ),
}

BACKENDS = ("reference", "mlx_dgemma", "mlx-vlm")
# "mlx_dgemma+np": ours with the drafter's vocabulary passes through NumPy
# (benchmarks/cpu_sampler.py), a what-if for a CPU sampling kernel; opt in with --backends.
ALL_BACKENDS = BACKENDS + ("mlx_dgemma+np",)
MLX_BACKENDS = ("mlx_dgemma", "mlx-vlm", "mlx_dgemma+np")


def temperature(n: int, N: int) -> float:
    """The reference's linear schedule; ``n`` counts down from ``N`` to 1."""
    return T_MIN + (T_MAX - T_MIN) * n / N


def prompt_tokens(length: int, vocab: int, seed: int = 0):
    """The fixed prompt: ``length`` ids drawn (NumPy, seeded) from 3 .. vocab-1."""
    import numpy as np

    return np.random.default_rng(seed).integers(3, vocab, length).astype(np.int32)


def fixed_canvas(length: int, vocab: int, seed: int = 1):
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab, (1, length)).astype(np.int32)


def now() -> float:
    return time.perf_counter()


def median_ms(xs: List[float]) -> Optional[float]:
    return round(1000 * statistics.median(xs), 3) if xs else None


def repeat(fn: Callable[[], Any], repeats: int, warmup: int, setup: Optional[Callable[[], Any]] = None) -> List[float]:
    """Seconds per call of ``fn(setup())`` (or ``fn()``), after ``warmup`` untimed calls."""
    out = []
    for i in range(warmup + repeats):
        arg = setup() if setup else None
        t = now()
        fn(arg) if setup else fn()
        dt = now() - t
        if i >= warmup:
            out.append(dt)
    return out


def peak_rss_gb() -> float:
    """The process's peak resident memory (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(r / (2**30 if sys.platform == "darwin" else 2**20), 3)


def vlm_quant_predicate(path: str, module) -> Any:
    """mlx-vlm's DiffusionGemma rule (what the mlx-community 4-bit folders hold): 8 bits for
    the embedding, the dense MLP, attention and the router, 4 bits for the rest (experts,
    self-conditioning). Applied to both MLX models so both run the same quantization.
    Only the text decoder is quantized (the vision tower is not used here)."""
    if not hasattr(module, "to_quantized") or not path.startswith("model.decoder"):
        return False
    if (
        path.endswith(("embed_tokens", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
        or ".self_attn." in path
        or "router" in path
    ):
        return {"group_size": 64, "bits": 8}
    return True


def quantize(model, bits: int, group_size: int) -> None:
    """Quantize in place with :func:`vlm_quant_predicate`; skip modules whose input width the
    group size does not divide (tiny models)."""
    import mlx.nn as nn

    def pred(path, m):
        q = vlm_quant_predicate(path, m)
        if not q:
            return False
        gs = q["group_size"] if isinstance(q, dict) else group_size
        gs = min(gs, group_size)
        if m.weight.shape[-1] % gs:
            return False
        b = q["bits"] if isinstance(q, dict) else bits
        return {"group_size": gs, "bits": b}

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=pred)


def emit(result: Dict[str, Any]) -> None:
    """Workers print one JSON line, prefixed so the orchestrator can find it."""
    print("RESULT " + json.dumps(result), flush=True)


def mlx_env() -> Dict[str, str]:
    """MLX workers: OpenBLAS preloaded where installed (float32 matmuls ~30x faster), with
    the core this CPU runs where OpenBLAS would fall back to its generic one."""
    env = dict(os.environ)
    if sys.platform == "linux" and os.path.exists(OPENBLAS):
        from mlx_dgemma.runtime import preload_env

        env.update(preload_env(OPENBLAS))
    return env


def torch_env() -> Dict[str, str]:
    """The PyTorch worker: no preload (it would replace torch's own BLAS and slow it)."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    return env
