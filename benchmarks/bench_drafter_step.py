"""The drafter step alone: sampling (fused kernel vs MLX path) and self-conditioning
(exact vs top-k), at the real vocabulary (262,144) and canvas length (256).

    python benchmarks/bench_drafter_step.py                      # timings
    python benchmarks/bench_drafter_step.py --sc-error           # top-k error on random models
    MLX_DGEMMA_SAMPLER=mlx python benchmarks/bench_drafter_step.py   # force the MLX path

On Linux CPUs preload OpenBLAS for the float32 matmul (see mlx_dgemma/kernels/README.md):
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python benchmarks/...

Timings are the median of ``--runs`` runs after ``--warmup`` runs, each ending in mx.eval.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_dgemma import Model, ModelArgs, backend, kernels, rng  # noqa: E402
from mlx_dgemma.models.diffusion_gemma import Embedding  # noqa: E402
from mlx_dgemma.sampling import probabilities, sample_step_mlx, temperature  # noqa: E402


def timeit(fn, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        mx.eval(fn())
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ms(t: float) -> str:
    return f"{t * 1e3:9.1f} ms"


class EmbeddingOnly(nn.Module):
    """Just the embedding table, with Model's soft_embeddings (for the SC matmul timing)."""

    soft_embeddings = Model.soft_embeddings

    def __init__(self, vocab: int, hidden: int, dtype: mx.Dtype, bits: int = 0):
        super().__init__()
        self.decoder = nn.Module()
        self.decoder.embed_tokens = Embedding(vocab, hidden)  # the model's table (with ``mix``)
        self.decoder.embed_tokens.weight = (mx.random.normal((vocab, hidden)) * hidden**-0.5).astype(dtype)
        if bits:
            nn.quantize(self, group_size=64, bits=bits)
        self.embed_scale = hidden**0.5


def bench_sampling(args) -> None:
    B, L, V = 1, args.length, args.vocab
    logits = mx.tanh(mx.random.normal((B, L, V)) * 0.3) * 30.0  # soft-capped range
    keys = rng.position_keys([0], rng.SAMPLE, 0, 48, L)
    mx.eval(logits, keys)
    t = 0.8
    print(f"\n## sampling step: logits [{B}, {L}, {V}] float32 ({logits.nbytes / 2**20:.0f} MiB)")
    floor = timeit(lambda: mx.max(logits, axis=-1), args.runs, args.warmup)
    mlx_t = timeit(lambda: sample_step_mlx(logits, t, keys), args.runs, args.warmup)
    print(f"one read of the logits (mx.max, a floor)  {ms(floor)}")
    print(f"MLX path (sample_step_mlx)                {ms(mlx_t)}")
    name = kernels.backend()
    if name == "mlx":
        print(f"fused kernel: none on this backend ({kernels.backend_reason()})")
    else:
        k_t = timeit(lambda: kernels.sample_step(logits, t, keys), args.runs, args.warmup)
        a, b = kernels.sample_step(logits, t, keys), sample_step_mlx(logits, t, keys)
        same = float(np.mean(np.array(a.sampled) == np.array(b.sampled)))
        print(f"fused {name} kernel                        {ms(k_t)}   ({mlx_t / k_t:.1f}x; "
              f"sampled tokens equal to the MLX path: {same:.4f})")


def bench_self_conditioning(args) -> None:
    L, V, H = args.length, args.vocab, args.hidden
    dtype = getattr(mx, args.sc_dtype)
    model = EmbeddingOnly(V, H, dtype, bits=args.sc_bits)
    logits = mx.tanh(mx.random.normal((1, L, V)) * 0.3) * 30.0
    t = 0.8
    lse = mx.logsumexp(logits / t, axis=-1)
    mx.eval(model.parameters(), logits, lse)
    table = f"{args.sc_bits}-bit quantized" if args.sc_bits else args.sc_dtype
    print(f"\n## self-conditioning: [1, {L}, {V}] probabilities @ [{V}, {H}] {table} table")
    plain = timeit(lambda: model.soft_embeddings(probabilities(logits, t, lse)), args.runs, args.warmup)
    exact = timeit(lambda: kernels.soft_embeddings(model, logits, t, lse), args.runs, args.warmup)
    print(f"exact, plain MLX (probabilities + matmul)    {ms(plain)}")
    print(f"exact, compiled probabilities + matmul       {ms(exact)}")
    ref = kernels.soft_embeddings(model, logits, t, lse)
    for k in args.top_k:
        for tail in ("mean", "drop"):
            tk = timeit(lambda: kernels.topk_soft_embeddings(model, logits, t, lse, k, tail),
                        args.runs, args.warmup)
            got = kernels.topk_soft_embeddings(model, logits, t, lse, k, tail)
            a, b = np.array(got.astype(mx.float32)), np.array(ref.astype(mx.float32))
            cos = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
            print(f"top-{k:<4d} tail={tail:4s}                       {ms(tk)}   ({exact / tk:.1f}x; "
                  f"cosine to exact: median {np.median(cos):.4f}, min {cos.min():.4f})")


# --------------------------------------------------------------------------------------
# error of top-k self-conditioning on the next step's logits (random-weight models)


def random_model(vocab: int, hidden: int, layers: int, canvas: int, sharpen: float, seed: int = 0) -> Model:
    args = ModelArgs(
        hidden_size=hidden, num_hidden_layers=layers, intermediate_size=2 * hidden,
        num_attention_heads=4, head_dim=hidden // 4, num_key_value_heads=2,
        full_head_dim=hidden // 2, full_kv_heads=1, vocab_size=vocab, sliding_window=64,
        num_experts=8, top_k_experts=2, moe_intermediate_size=hidden // 2, canvas_length=canvas,
    )
    mx.random.seed(seed)
    model = Model(args)
    # Untrained logits are flat; scaling the final norm spreads them (a trained model's
    # rows are far more peaked than either), so we report both.
    model.decoder.norm.weight = model.decoder.norm.weight * sharpen
    mx.eval(model.parameters())
    return backend.defaults(model)


def kl_rows(p_logits: mx.array, q_logits: mx.array, t: float) -> np.ndarray:
    lp = p_logits / t - mx.logsumexp(p_logits / t, axis=-1, keepdims=True)
    lq = q_logits / t - mx.logsumexp(q_logits / t, axis=-1, keepdims=True)
    return np.array((mx.exp(lp) * (lp - lq)).sum(-1)).ravel()


def sc_error(args) -> None:
    N = 48
    for label, vocab, hidden, sharpen in (("tiny", 160, 64, 1.0), ("mid", 16384, 256, 1.0),
                                          ("mid, sharpened x8", 16384, 256, 8.0)):
        L = 64
        model = random_model(vocab, hidden, 4, L, sharpen)
        cache = model.make_cache()
        prompt = rng.random_tokens(rng.position_keys([1], rng.CANVAS, 99, 0, 24), vocab)
        model.encode(prompt, cache)
        mx.eval([c.state for c in cache])
        canvas = rng.random_tokens(rng.position_keys([0], rng.CANVAS, 0, 0, L), vocab)
        print(f"\n## {label}: vocab {vocab}, hidden {hidden}, canvas {L}; next-step logits with "
              f"top-k SC vs exact SC")
        print("step  mean H   exact-vs-none KL | k     tail  KL mean   KL median  KL max    argmax agree")
        sc = None
        for step, n in enumerate(range(N, N - 9, -1), 1):
            t, t_next = temperature(n, N, 0.4, 0.8), temperature(n - 1, N, 0.4, 0.8)
            logits = model.denoise(canvas, cache, self_conditioning_embeddings=sc)
            s = sample_step_mlx(logits, t, rng.position_keys([0], rng.SAMPLE, 0, n, L))
            canvas_next = s.sampled
            exact = kernels.soft_embeddings(model, logits, t, s.lse)
            if step in (1, 4, 8):
                ref = model.denoise(canvas_next, cache, self_conditioning_embeddings=exact)
                none = model.denoise(canvas_next, cache)
                base = kl_rows(ref, none, t_next).mean()
                first = True
                for k in args.top_k:
                    if k >= vocab:
                        continue
                    for tail in ("mean", "drop"):
                        sc_k = kernels.topk_soft_embeddings(model, logits, t, s.lse, k, tail)
                        got = model.denoise(canvas_next, cache, self_conditioning_embeddings=sc_k)
                        kl = kl_rows(ref, got, t_next)
                        agree = float(np.mean(np.array(ref.argmax(-1)) == np.array(got.argmax(-1))))
                        head = (f"{step:<5d} {float(s.entropy.mean()):6.3f}   {base:.3e}        |"
                                if first else " " * 34 + "|")
                        first = False
                        print(f"{head} {k:<5d} {tail:5s} {kl.mean():.2e}  {np.median(kl):.2e}   "
                              f"{kl.max():.2e}  {agree:.4f}")
            canvas, sc = canvas_next, exact


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=262144)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--hidden", type=int, default=2816, help="embedding width for the SC matmul")
    p.add_argument("--sc-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--sc-bits", type=int, default=0, choices=[0, 4, 8], help="quantize the table")
    p.add_argument("--top-k", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32, 128])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--skip-sampling", action="store_true")
    p.add_argument("--skip-sc", action="store_true")
    p.add_argument("--sc-error", action="store_true", help="only the top-k error study")
    args = p.parse_args()

    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print(f"mlx {mx.__version__}, device {mx.default_device()}, backend {kernels.backend()} "
          f"({kernels.backend_reason()}), {platform.machine()} {platform.system()}, "
          f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}")
    mx.random.seed(0)
    if args.sc_error:
        sc_error(args)
        return
    if not args.skip_sampling:
        bench_sampling(args)
    if not args.skip_sc:
        bench_self_conditioning(args)


if __name__ == "__main__":
    main()
