"""Two source trees, the same benchmark, interleaved: is a change within a margin of
another tree's speed on a busy machine?

    python benchmarks/ab_trees.py --before /work/wt-before --after . --config mid \\
        --prompts 64,2048 --bits 0,4 --rounds 3 --out benchmarks/results/issue21

Each measurement is one ``worker.py bench --backend mlx_dgemma`` process run from each
tree in turn (the order alternates every round), on one checkpoint built once. Writes
``ab.json`` (every sample) and ``ab.md`` (medians over the rounds and after/before
ratios per figure) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.run import ensure_checkpoint  # noqa: E402
from benchmarks.common import mlx_env  # noqa: E402

FIGURES = ("step_ms", "forward_ms", "drafter_ms", "block_ms", "prefill_ms")


def run(tree: Path, ckpt: Path, config: str, prompt: int, bits: int, repeats: int) -> Dict:
    cmd = [sys.executable, str(tree / "benchmarks" / "worker.py"), "bench", "--backend", "mlx_dgemma",
           "--config", config, "--ckpt", str(ckpt), "--prompt", str(prompt), "--bits", str(bits),
           "--repeats", str(repeats)]
    p = subprocess.run(cmd, cwd=tree, env=mlx_env(), capture_output=True, text=True, timeout=1800)
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    if p.returncode or not lines:
        raise SystemExit(f"{tree}: {' '.join(cmd[2:])} failed:\n{(p.stderr or p.stdout)[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", default=str(HERE.parent))
    ap.add_argument("--config", default="mid")
    ap.add_argument("--prompts", default="64")
    ap.add_argument("--bits", default="0")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="/tmp/mlx_dgemma_bench")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    trees = {"before": Path(args.before).resolve(), "after": Path(args.after).resolve()}
    ckpt = ensure_checkpoint(args.config, Path(args.work), 1800)
    if ckpt is None:
        raise SystemExit("could not build the checkpoint")
    samples: List[Dict] = []
    cases = [(int(p), int(b)) for p in args.prompts.split(",") for b in args.bits.split(",")]
    for r in range(args.rounds):
        for prompt, bits in cases:
            order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
            for name in order:
                t = time.time()
                res = run(trees[name], ckpt, args.config, prompt, bits, args.repeats)
                res.update(tree=name, round=r, started=t)
                samples.append(res)
                print(json.dumps({k: res.get(k) for k in ("tree", "round", "prompt", "bits", *FIGURES)}), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ab.json").write_text(json.dumps({"command": " ".join(sys.argv), "trees": {k: str(v) for k, v in trees.items()},
                                             "samples": samples}, indent=1))
    # paired: each round's after / before (the trees ran back to back), whose median is
    # robust to a whole round running slow on a shared machine
    rows = ["| prompt | bits | figure | before (median) | after (median) | after / before | paired ratios "
            "(median; range) |", "|---|---|---|---|---|---|---|"]
    for prompt, bits in cases:
        for fig in FIGURES:
            med, by_round = {}, {}
            for name in trees:
                cell = [s for s in samples if s["tree"] == name and s["prompt"] == prompt and s["bits"] == bits
                        and s.get(fig) is not None]
                med[name] = statistics.median(s[fig] for s in cell) if cell else None
                by_round[name] = {s["round"]: s[fig] for s in cell}
            ratios = [by_round["after"][r] / by_round["before"][r] for r in by_round["after"]
                      if by_round["before"].get(r)]
            if med["before"] and med["after"]:
                paired = (f"{statistics.median(ratios):.3f}; {min(ratios):.2f}-{max(ratios):.2f}" if ratios else "-")
                rows.append(f"| {prompt} | {bits or 'f32'} | {fig} | {med['before']:.1f} | {med['after']:.1f} | "
                            f"{med['after'] / med['before']:.3f} | {paired} |")
    (out / "ab.md").write_text(f"`{' '.join(sys.argv)}`\n\n" + "\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
