"""Benchmark mlx_dgemma against the PyTorch reference and mlx-vlm's port, side by side.

    python benchmarks/run.py                       # quick: tiny and mid, float32 and 4-bit, prompt 64
    python benchmarks/run.py --configs mid,real-layer --prompts 64,2048 --repeats 5 --rounds 2

Every (configuration, bits, prompt, backend) runs in its own process, one at a time
(``worker.py``): the reference without the OpenBLAS preload, the MLX backends with it.
All backends load the same random weights (built once per configuration with the
reference harness and kept under ``--work``). ``--rounds`` repeats the whole sweep,
interleaving the backends in time, and the reported figure is the median over all
samples of all rounds (the machine may be shared). Writes ``results.json``,
``results.md`` (table with ratios) and ``results.png`` (chart) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ALL_BACKENDS, BACKENDS, CONFIGS, MLX_BACKENDS, mlx_env, torch_env  # noqa: E402

HERE = Path(__file__).resolve().parent
WORKER = HERE / "worker.py"


def _run(cmd: List[str], env: Dict[str, str], timeout: float) -> Optional[dict]:
    t = time.time()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        print(f"  timed out after {timeout:.0f}s: {' '.join(cmd[2:])}", file=sys.stderr)
        return None
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if p.returncode or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        print(f"  failed ({p.returncode}): {' '.join(cmd[2:])}\n    " + "\n    ".join(tail), file=sys.stderr)
        return None
    out = json.loads(lines[-1][len("RESULT "):])
    out["wall_s"] = round(time.time() - t, 1)
    return out


def ensure_checkpoint(config: str, work: Path, timeout: float) -> Optional[Path]:
    path = work / config
    if (path / "BUILT").exists():
        return path
    print(f"building {config} weights in {path} ...", flush=True)
    r = _run([sys.executable, str(WORKER), "build", "--config", config, "--ckpt", str(path)], torch_env(), timeout)
    return path if r else None


def merge(samples: List[dict]) -> dict:
    """Several rounds of one cell -> one record: medians of the per-round medians."""
    out = dict(samples[0])
    for key in ("step_ms", "forward_ms", "drafter_ms", "block_ms", "prefill_ms"):
        vals = [s[key] for s in samples if s.get(key) is not None]
        out[key] = round(statistics.median(vals), 3) if vals else None
        out[key + "_rounds"] = vals
    e2e = [s["e2e"] for s in samples if s.get("e2e")]
    if e2e:
        out["e2e"] = dict(e2e[0], tok_s=round(statistics.median(e["tok_s"] for e in e2e), 3))
    for key in ("peak_rss_gb", "peak_mlx_gb"):
        vals = [s[key] for s in samples if s.get(key) is not None]
        out[key] = max(vals) if vals else None
    return out


def fmt(x, digits=1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and x >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def table(records: List[dict]) -> str:
    """Markdown: one row per (config, bits, prompt, backend); ratios on our rows."""
    rows = [
        "| config | bits | prompt | backend | step ms | forward ms | drafter ms | block ms | prefill ms | e2e tok/s | tok/fwd | peak GB | step ours/ref | step ours/vlm | block ours/ref | block ours/vlm | prefill ours/ref |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cells: Dict[tuple, Dict[str, dict]] = {}
    for r in records:
        cells.setdefault((r["config"], r["bits"], r["prompt"]), {})[r["backend"]] = r
    for (config, bits, prompt), by in cells.items():
        ours, ref, vlm = by.get("mlx_dgemma"), by.get("reference"), by.get("mlx-vlm")
        for name in ALL_BACKENDS:
            r = by.get(name)
            if not r:
                continue
            e2e = r.get("e2e") or {}
            peak = r.get("peak_mlx_gb") if r.get("peak_mlx_gb") else r.get("peak_rss_gb")
            extra = ["", "", "", "", ""]
            if name.startswith("mlx_dgemma"):
                extra = [
                    ratio(r["step_ms"], ref and ref["step_ms"]), ratio(r["step_ms"], vlm and vlm["step_ms"]),
                    ratio(r["block_ms"], ref and ref["block_ms"]), ratio(r["block_ms"], vlm and vlm["block_ms"]),
                    ratio(r.get("prefill_ms"), ref and ref.get("prefill_ms")),
                ]
            label = name + (f" ({r['variant']})" if r.get("variant") else "")
            rows.append(
                f"| {config} | {str(bits) + '-bit' if bits else 'f32'} | {prompt} | {label} | {fmt(r['step_ms'])} | "
                f"{fmt(r['forward_ms'])} | {fmt(r['drafter_ms'])} | {fmt(r['block_ms'])} | {fmt(r.get('prefill_ms'))} | "
                f"{fmt(e2e.get('tok_s'))} | {fmt(e2e.get('tokens_per_forward'), 2)} | {fmt(peak, 2)} | "
                + " | ".join(extra) + " |"
            )
    return "\n".join(rows)


def chart(records: List[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["config"], r["bits"], r["prompt"]) for r in records},
                    key=lambda g: (list(CONFIGS).index(g[0]), g[1], g[2]))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4.2))
    names = [b for b in ALL_BACKENDS if any(r["backend"] == b for r in records)]
    width = 0.8 / len(names)
    colors = {"reference": "#9e9e9e", "mlx_dgemma": "#1f77b4", "mlx-vlm": "#ff7f0e", "mlx_dgemma+np": "#2ca02c"}
    for i, name in enumerate(names):
        xs, ys = [], []
        for j, g in enumerate(groups):
            r = next((r for r in records if (r["config"], r["bits"], r["prompt"]) == g and r["backend"] == name), None)
            if r and r.get("step_ms"):
                xs.append(j + (i - (len(names) - 1) / 2) * width)
                ys.append(r["step_ms"])
        ax.bar(xs, ys, width, label=name, color=colors[name])
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{c}\n{'4-bit' if b else 'f32'}, prompt {p}" for c, b, p in groups], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("median denoising step (ms, log)")
    ax.set_title("One denoising step (decoder forward + drafter), lower is better")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def save(samples: Dict[tuple, List[dict]], out: Path) -> List[dict]:
    records = [merge(v) for v in samples.values()]
    meta = {"argv": sys.argv[1:], "time": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": os.uname().machine,
            "cpus": os.cpu_count(), "platform": sys.platform}
    (out / "results.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    return records


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Benchmark mlx_dgemma, the PyTorch reference and mlx-vlm.")
    p.add_argument("--configs", default="tiny,mid", help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--prompts", default="64", help="prompt lengths, e.g. 64,2048")
    p.add_argument("--bits", default="0,4", help="0 = float32; 4 = 4-bit (MLX backends, tiny and mid only)")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help=f"comma list of {', '.join(ALL_BACKENDS)} (the last is a what-if, see cpu_sampler.py)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per measurement")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="repeat the sweep, interleaving backends")
    p.add_argument("--e2e-steps", type=int, default=None, help="denoising steps per block end to end "
                   "(default per config: tiny 48, mid 16, real-layer 4; 0 skips)")
    p.add_argument("--e2e-quantized", action="store_true", help="also run end to end at 4 bits")
    p.add_argument("--sampler", choices=["mlx", "kernels"], default="kernels",
                   help="our sampling step: the package's default (kernels: the checked fused kernel, on "
                        "Linux CPUs the C extension) or the pure-MLX path")
    p.add_argument("--work", default=os.environ.get("MLX_DGEMMA_BENCH_WORK", "/tmp/mlx_dgemma_bench"),
                   help="where the random checkpoints are kept")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--table", nargs="+", metavar="RESULTS_JSON",
                   help="only print the table of these results.json files (no run)")
    args = p.parse_args(argv)
    if args.table:
        print(table([r for f in args.table for r in json.loads(Path(f).read_text())["records"]]))
        return

    configs = [c for c in args.configs.split(",") if c]
    for c in configs:
        if c not in CONFIGS:
            p.error(f"--configs: unknown configuration {c!r} (expected {', '.join(CONFIGS)})")
    backends = [b for b in args.backends.split(",") if b]
    for b in backends:
        if b not in ALL_BACKENDS:
            p.error(f"--backends: unknown backend {b!r} (expected {', '.join(ALL_BACKENDS)})")
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    samples: Dict[tuple, List[dict]] = {}
    for rnd in range(args.rounds):
        for config in configs:
            ckpt = ensure_checkpoint(config, work, args.timeout)
            if ckpt is None:
                continue
            e2e = CONFIGS[config]["e2e_steps"] if args.e2e_steps is None else args.e2e_steps
            for bits in [int(b) for b in args.bits.split(",")]:
                if bits and config == "real-layer":
                    continue  # quantized matmuls are slow on this CPU: real-layer stays float32
                for prompt in [int(x) for x in args.prompts.split(",")]:
                    for backend in backends:
                        if bits and backend not in MLX_BACKENDS:
                            continue
                        # quantized matmuls run at a few GFLOP/s on CPUs: no end-to-end there
                        # unless asked (--e2e-quantized)
                        e2e_cell = e2e if (not bits or args.e2e_quantized) else 0
                        cmd = [sys.executable, str(WORKER), "bench", "--backend", backend, "--config", config,
                               "--ckpt", str(ckpt), "--prompt", str(prompt), "--bits", str(bits),
                               "--group-size", "32" if config == "tiny" else "64",
                               "--repeats", str(args.repeats), "--warmup", str(args.warmup),
                               "--e2e-steps", str(e2e_cell), "--sampler", args.sampler]
                        # mlx_dgemma loads OpenBLAS itself (mlx_dgemma.runtime): it runs as a user
                        # runs it, with no preload (torch_env); mlx-vlm gets the preload
                        env = mlx_env() if backend == "mlx-vlm" else torch_env()
                        print(f"[round {rnd + 1}] {config} bits={bits or 'f32'} prompt={prompt} {backend} ...",
                              flush=True)
                        r = _run(cmd, env, args.timeout)
                        if r:
                            print(f"    step {r['step_ms']} ms, block {r['block_ms']} ms", flush=True)
                            samples.setdefault((config, bits, prompt, backend), []).append(r)
                            save(samples, out)  # a long sweep keeps what it has measured
    records = save(samples, out)
    md = table(records)
    (out / "results.md").write_text(md + "\n")
    print(md)
    try:
        chart(records, out / "results.png")
    except ImportError:
        print("matplotlib is not installed (pip install -e .[bench]): no chart", file=sys.stderr)


if __name__ == "__main__":
    main()
