"""MLX's CPU cache of freed buffers: a denoising step with MLX 0.32's 32 MB against a quarter
of MLX's memory limit (what a reverted change to ``mlx_dgemma/runtime.py`` set at import:
it made 4-bit steps slower).

    python benchmarks/bench_buffer_cache.py [--config mid] [--bits 0,4] [--rounds 2]

Each measurement is ``worker.py bench --backend mlx_dgemma`` in its own process, with the
cache limit set after the import (glibc's heap reuse stays on in both arms); the arms
alternate within each round. The checkpoint is built once (``worker.py build``) under
``--work``. Prints a table of medians (ms) and writes ``--out``/buffer_cache.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SMALL = 32 << 20  # MLX 0.32's default CPU cache limit

WRAPPER = """
import sys
sys.path.insert(0, {bench!r})
import mlx_dgemma  # noqa: F401  (the runtime's setup, OpenBLAS first)
import mlx.core as mx
limit = int(sys.argv[1])
mx.set_cache_limit(limit if limit > 0 else mx.get_memory_limit() // 4)
sys.argv = ["worker.py"] + sys.argv[2:]
import runpy
runpy.run_path({worker!r}, run_name="__main__")
"""
KEYS = ("step_ms", "forward_ms", "drafter_ms", "block_ms", "prefill_ms")


def measure(ckpt: Path, config: str, bits: int, limit: int, repeats: int) -> dict:
    code = WRAPPER.format(bench=str(HERE), worker=str(HERE / "worker.py"))
    p = subprocess.run([sys.executable, "-c", code, str(limit), "bench", "--config", config, "--ckpt", str(ckpt),
                        "--backend", "mlx_dgemma", "--bits", str(bits), "--repeats", str(repeats)],
                       capture_output=True, text=True, timeout=1800, cwd=HERE.parent)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"worker failed: {(p.stderr or p.stdout).strip().splitlines()[-1:]}")
    return json.loads(line[7:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="mid")
    ap.add_argument("--bits", default="0,4")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mlx-dgemma-bench-cache"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "buffer-cache")
    a = ap.parse_args(argv)
    ckpt = a.work / a.config
    if not (ckpt / "config.json").is_file():
        subprocess.run([sys.executable, str(HERE / "worker.py"), "build", "--config", a.config, "--ckpt", str(ckpt)],
                       check=True, cwd=HERE.parent, capture_output=True)
    arms = {"32 MB (MLX's default)": SMALL, "a quarter of the memory limit": 0}
    rows = {(b, arm): [] for b in map(int, a.bits.split(",")) for arm in arms}
    for _ in range(a.rounds):
        for (bits, arm) in rows:
            rows[(bits, arm)].append(measure(ckpt, a.config, bits, arms[arm], a.repeats))
            print(bits, arm, {k: rows[(bits, arm)][-1][k] for k in KEYS}, flush=True)
    table = ["| bits | MLX CPU buffer cache | " + " | ".join(KEYS) + " | peak RSS GB |",
             "| --- | --- | " + " | ".join("---" for _ in KEYS) + " | --- |"]
    result = []
    for (bits, arm), runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in KEYS}
        rss = max(r["peak_rss_gb"] for r in runs)
        result.append(dict(bits=bits, cache=arm, runs=runs, **med, peak_rss_gb=rss))
        cells = " | ".join(f"{med[k]:.0f}" for k in KEYS)
        table.append(f"| {bits or 'float32'} | {arm} | {cells} | {rss:.2f} |")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "buffer_cache.json").write_text(json.dumps(
        {"command": "python benchmarks/bench_buffer_cache.py " + " ".join(sys.argv[1:] if argv is None else argv),
         "date": time.strftime("%Y-%m-%d %H:%M"), "config": a.config, "rounds": a.rounds, "rows": result}, indent=1))
    (a.out / "buffer_cache.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
