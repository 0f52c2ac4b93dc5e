"""Sudoku benchmarks of the shipped model: results.json, results.md (tables), results.png.

    flock /work/heavy.lock python benchmarks/sudoku/run.py [--model sudoku] [--quick]

Sections (each on the held-out sets of this folder, puzzles the training never saw):

- ``difficulty``: solve rate (every cell right, givens kept, rules hold) on easy and
  medium at the model's default settings (up to ``DEFAULT_ATTEMPTS`` samples a puzzle: a
  grid that breaks the rules is drawn again), with one sample a puzzle, and with and
  without the givens pinned;
- ``steps``: solve rate, time per puzzle and tokens per forward against the step budget
  (4 to 48) and the entropy bound, one sample a puzzle (what a setting changes in the
  model's own sample; so are ``sampler`` and ``transformers``);
- ``sampler``: the reference's entropy-bound rule against the confidence threshold;
- ``quantized``: float32 against the 4-bit conversion (``mlx_dgemma.convert``, the mixed
  recipe and uniform 4-bit);
- ``transformers``: the exported Hugging Face folder in transformers' own ``generate``
  (``--hf PATH``; run in a separate process without the OpenBLAS preload);
- ``classical``: the bitmask solver's time per puzzle, for scale.

Time per puzzle is the median of single-puzzle solves (batch 1, what ``python -m
mlx_dgemma.sudoku`` does) over ``--latency-n`` puzzles; solve rates use batches of 64.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from mlx_dgemma.sudoku import DEFAULT_ATTEMPTS, load_model, solve_details, solver  # noqa: E402
from mlx_dgemma.sudoku.data import read_pairs  # noqa: E402


def rate(pairs, model, **kw) -> Dict[str, float]:
    t0 = time.perf_counter()
    res = solve_details([p for p, _ in pairs], model=model, **kw)
    dt = time.perf_counter() - t0
    n = len(res)
    return {
        "n": n,
        "solved": sum(r.solved for r in res),
        "solve_rate": sum(r.solved for r in res) / n,
        "passes": statistics.mean(r.passes for r in res),
        "samples": statistics.mean(r.attempts for r in res),
        "tokens_per_forward": statistics.mean(r.tokens_per_forward for r in res),
        "cells_per_forward": statistics.mean(r.cells_per_forward for r in res),
        "batched_s_per_puzzle": dt / n,
    }


def latency(pairs, model, n: int, **kw) -> float:
    """Median seconds to solve one puzzle alone (batch 1), after one warm-up."""
    return statistics.median(latencies(pairs, model, n, **kw))


def latencies(pairs, model, n: int, **kw) -> List[float]:
    """Seconds to solve each of the first ``n`` puzzles alone (batch 1), after one warm-up."""
    solve_details([pairs[0][0]], model=model, **kw)
    times = []
    for p, _ in pairs[:n]:
        t0 = time.perf_counter()
        solve_details([p], model=model, **kw)
        times.append(time.perf_counter() - t0)
    return times


def classical(pairs) -> float:
    times = []
    for p, s in pairs:
        t0 = time.perf_counter()
        assert solver.solve(p) == s
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def quantize(src: Path, dst: Path, recipe: str) -> Path:
    from mlx_dgemma.convert import convert

    convert(src, dst, quantize=True, q_bits=4, recipe=recipe, overwrite=True, progress=False, log=lambda m: None)
    return dst


def transformers_rate(hf_path: Path, pairs, steps: Optional[int]) -> Dict[str, float]:
    """transformers' own generate on the exported folder, in a clean process."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    code = HERE / "hf_generate.py"
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(f"{p} {s}" for p, s in pairs))
        name = f.name
    try:
        out = subprocess.run([sys.executable, str(code), str(hf_path), name] + ([str(steps)] if steps else []),
                             env=env, capture_output=True, text=True, timeout=3600)
    finally:
        os.unlink(name)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sudoku")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--quick", action="store_true", help="a quarter of the puzzles, fewer settings")
    ap.add_argument("--latency-n", type=int, default=20)
    ap.add_argument("--hf", type=Path, default=None, help="exported Hugging Face folder (fuse --export-hf)")
    ap.add_argument("--only", default=None, help="comma-separated sections")
    args = ap.parse_args(argv)

    easy = read_pairs(HERE / "heldout_easy.txt")
    medium = read_pairs(HERE / "heldout_medium.txt")
    if args.quick:
        easy, medium = easy[:75], medium[:50]
    sections = set(args.only.split(",")) if args.only else {"difficulty", "latency", "steps", "sampler", "quantized",
                                                            "transformers", "classical"}
    pair = load_model(args.model)
    model_dir = Path(pair[0].path)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    load = os.getloadavg()[0]
    results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "load_at_start": load,
                          "model": str(model_dir)}

    def save():
        path.write_text(json.dumps(results, indent=2))

    if "difficulty" in sections:
        results["attempts"] = DEFAULT_ATTEMPTS
        results["difficulty"] = {
            "easy": rate(easy, pair), "medium": rate(medium, pair),
            "easy_one_sample": rate(easy, pair, attempts=1), "medium_one_sample": rate(medium, pair, attempts=1),
            "easy_unpinned": rate(easy, pair, pin=False), "medium_unpinned": rate(medium, pair, pin=False),
        }
        save()
        print("difficulty", json.dumps(results["difficulty"]), flush=True)
    if "latency" in sections:
        # every easy puzzle alone: a puzzle the model cannot solve costs every attempt
        easy_times = latencies(easy, pair, len(easy))
        results["latency"] = {"easy_s": statistics.median(easy_times), "easy_mean_s": statistics.mean(easy_times),
                              "easy_max_s": max(easy_times), "easy_n": len(easy_times),
                              "medium_s": latency(medium, pair, args.latency_n),
                              "easy_one_sample_s": latency(easy, pair, args.latency_n, attempts=1)}
        save()
        print("latency", results["latency"], flush=True)
    if "steps" in sections:
        budgets = [4, 8, 16, 32, 48] if args.quick else [4, 6, 8, 12, 16, 24, 32, 48]
        bounds = [0.1, 1.0] if args.quick else [0.03, 0.1, 0.3, 1.0, 3.0]
        rows = []
        for eb in bounds:
            for n in budgets:
                r = rate(easy, pair, steps=n, entropy_bound=eb, attempts=1)
                r.update(steps=n, entropy_bound=eb,
                         latency_s=latency(easy, pair, max(5, args.latency_n // 2), steps=n, entropy_bound=eb,
                                           attempts=1))
                rows.append(r)
                print("steps", n, eb, r["solve_rate"], r["latency_s"], flush=True)
        results["steps"] = rows
        save()
    if "sampler" in sections:
        rows = [dict(sampler="entropy-bound", entropy_bound=0.1, **rate(easy, pair, attempts=1))]
        for th in ([0.7, 0.9] if args.quick else [0.5, 0.7, 0.8, 0.9, 0.95, 0.99]):
            r = rate(easy, pair, sampler="confidence", threshold=th, attempts=1)
            rows.append(dict(sampler="confidence", threshold=th, **r))
            print("confidence", th, r["solve_rate"], r["tokens_per_forward"], flush=True)
        results["sampler"] = rows
        save()
    if "quantized" in sections:
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for recipe in ("mixed", "uniform"):
                q = load_model(quantize(model_dir, Path(tmp) / recipe, recipe))
                size = sum(f.stat().st_size for f in (Path(tmp) / recipe).glob("*.safetensors"))
                rows.append({"recipe": recipe, "bits": 4, "bytes": size, "easy": rate(easy, q), "medium": rate(medium, q),
                             "easy_one_sample": rate(easy, q, attempts=1), "latency_s": latency(easy, q, args.latency_n)})
                print("quantized", recipe, rows[-1]["easy"]["solve_rate"], flush=True)
        fsize = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        results["quantized"] = {"float32_bytes": fsize, "rows": rows}
        save()
    if "classical" in sections:
        results["classical"] = {"easy_s": classical(easy), "medium_s": classical(medium)}
        save()
        print("classical", results["classical"], flush=True)
    if "transformers" in sections:
        if args.hf is None:
            results["transformers"] = {"error": "no --hf folder given (python -m mlx_dgemma.fuse --export-hf)"}
        else:
            sub = easy[:100] if not args.quick else easy[:25]
            results["transformers"] = {"easy": transformers_rate(args.hf, sub, None),
                                       "ours_unpinned_same_puzzles": rate(sub, pair, pin=False, attempts=1)}
        save()
        print("transformers", results["transformers"], flush=True)
    results["load_at_end"] = os.getloadavg()[0]
    save()
    from report import write_report  # noqa: E402  (beside this script)

    write_report(results, args.out)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
