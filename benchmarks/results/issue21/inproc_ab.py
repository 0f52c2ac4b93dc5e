"""Two trees' models in ONE process, their calls interleaved (A B, B A, ...): the same
allocator, the same machine state, so the +-10-15% scatter between whole processes on a
shared machine drops out of the comparison.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
      python benchmarks/results/issue21/inproc_ab.py --before /path/to/old/tree --prompt 2048 --bits 4

The before tree's package is copied under another name (``mlx_dgemma_before``: its imports
are relative), the after tree is the installed ``mlx_dgemma``. Both load the ``mid``
checkpoint that ``benchmarks/ab_trees.py`` builds; the after model gets the backend's
defaults (``backend.defaults``), the before model configured itself in its constructor.
Times the decoder forward (a denoising step's model call, self-conditioned) and the
encoder pass over a committed 256-token canvas, and prints the paired after/before ratios.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--before", required=True)
ap.add_argument("--prompt", type=int, default=2048)
ap.add_argument("--bits", type=int, default=4)
ap.add_argument("--rounds", type=int, default=40)
ap.add_argument("--checkpoint", default="/tmp/mlx_dgemma_bench/mid")
ap.add_argument("--after-first", action="store_true", help="build the after model first")
args = ap.parse_args()

HERE = Path(__file__).resolve().parent
tmp = Path(tempfile.mkdtemp())
shutil.copytree(Path(args.before) / "mlx_dgemma", tmp / "mlx_dgemma_before")
sys.path[:0] = [str(tmp), str(HERE.parents[1]), str(HERE)]

import mlx_dgemma as A  # noqa: E402  (first: it loads OpenBLAS where present)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import mlx_dgemma_before as B  # noqa: E402

from _setup import build, prime  # noqa: E402

models = {}
for name, pkg in ((("after", A), ("before", B)) if args.after_first else (("before", B), ("after", A))):
    models[name] = build(pkg, args.bits, args.checkpoint)
state = {}
for name, m in models.items():
    canvas, cache, logits, sc = prime(m, args.prompt)
    for _ in range(3):
        mx.eval(m.denoise(canvas, cache, self_conditioning_embeddings=sc))
    state[name] = (cache, sc, np.array(logits))
V = models["after"].args.vocab_size
print("max |after - before| logits:", float(np.abs(state["after"][2] - state["before"][2]).max()))


def interleaved(rounds, call):
    times = {"before": [], "after": []}
    for i in range(rounds):
        for name in ("before", "after") if i % 2 == 0 else ("after", "before"):
            times[name].append(call(name))
    return times


def report(what, times):
    ratios = [a / b for a, b in zip(times["after"], times["before"])]
    med = {k: 1000 * statistics.median(v) for k, v in times.items()}
    q = statistics.quantiles(ratios, n=4)
    print(f"{what}: before {med['before']:.1f} ms, after {med['after']:.1f} ms (medians of {len(ratios)}); "
          f"paired after/before {statistics.median(ratios):.3f} (quartiles {q[0]:.3f}-{q[2]:.3f})", flush=True)


def forward(name):
    m, (cache, sc, _) = models[name], state[name]
    t = time.perf_counter()
    mx.eval(m.denoise(canvas, cache, self_conditioning_embeddings=sc))
    return time.perf_counter() - t


block = mx.array(np.random.RandomState(2).randint(3, V, (1, 256)))


def block_pass(name):
    m, cache = models[name], state[name][0].copy()
    t = time.perf_counter()
    m.encode(block, cache)
    mx.eval([x.state for x in cache])
    return time.perf_counter() - t


report("forward", interleaved(args.rounds, forward))
report("block", interleaved(args.rounds // 2, block_pass))
