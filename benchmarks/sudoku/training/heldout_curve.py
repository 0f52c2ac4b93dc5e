"""The held-out solve rate against examples seen, and where its trend reaches a target.

    python benchmarks/sudoku/training/heldout_curve.py [--target 0.8] [--since 11901]

Reads the ``results/heldout-ITERATION.json`` files that ``heldout.py`` writes (the run's
weight average at each scoring), turns iterations into examples (``batch_size`` of the
recipe), and fits the solved share against the logarithm of examples: the curve has been
close to a straight line there, so the slope reads as points per e-fold of examples. Two
fits, because they bracket the extrapolation: every scoring since ``--since`` (the switch
to the high corruption levels) and the last ``--last`` scorings. Writes
``results/heldout-curve.md`` and, with matplotlib, ``results/heldout-curve.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Tuple

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
sys.path.insert(0, str(HERE.parents[2]))
from mlx_dgemma.sudoku.train import CONFIG, read_config  # noqa: E402


def scorings(results: Path, batch_size: int) -> List[Dict[str, float]]:
    """Each held-out scoring of a training run, in order of examples seen."""
    rows = []
    for f in sorted(results.glob("heldout-*.json")):
        d = json.loads(f.read_text())
        if "iteration" not in d:  # a shipped-model scoring, not a point on the run
            continue
        one = d.get("single_sample", d)  # the model's own rate: one sample a puzzle (before retries, all were)
        rows.append({"iteration": d["iteration"], "examples": d["iteration"] * batch_size,
                     "easy": one["easy"]["solved"], "medium": one["medium"]["solved"]})
    return sorted(rows, key=lambda r: r["examples"])


def fit(rows: List[Dict[str, float]], key: str) -> Tuple[float, float]:
    """Least squares of ``key`` against ln(examples): (slope per e-fold, intercept)."""
    xs = [math.log(r["examples"]) for r in rows]
    ys = [r[key] for r in rows]
    mx_, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx_) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx_) ** 2 for x in xs)
    return slope, my - slope * mx_


def reaches(slope: float, intercept: float, target: float) -> float:
    """Examples where the fitted line reaches ``target`` (inf when it does not rise)."""
    return math.exp((target - intercept) / slope) if slope > 0 else math.inf


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--target", type=float, default=0.8, help="easy solved share to reach (default: %(default)s)")
    ap.add_argument("--since", type=int, default=11901, help="first iteration of the long fit")
    ap.add_argument("--last", type=int, default=3, help="scorings in the short fit")
    args = ap.parse_args(argv)
    batch_size = int(read_config(CONFIG)["batch_size"])
    rows = [r for r in scorings(args.results, batch_size) if r["iteration"] >= args.since]
    if len(rows) < max(2, args.last):
        raise SystemExit(f"error: {args.results}: {len(rows)} held-out scorings from iteration {args.since}, "
                         f"need at least {max(2, args.last)}")
    fits = {f"since {args.since:,}": rows, f"last {args.last}": rows[-args.last:]}
    lines = ["# Held-out solve rate against examples seen", "",
             f"`python benchmarks/sudoku/training/heldout_curve.py --target {args.target} --since {args.since} "
             f"--last {args.last}`; examples = iterations x {batch_size}.", "",
             "| iteration | examples | easy solved | medium solved |", "| ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['iteration']:,} | {r['examples']:,} | {r['easy']:.1%} | {r['medium']:.1%} |" for r in rows]
    lines += ["", f"| fit | easy: points per e-fold | easy reaches {args.target:.0%} at | medium: points per e-fold |",
              "| --- | ---: | ---: | ---: |"]
    lines_fit = {}  # name: (slope, intercept, first examples of the fit), for the figure
    for name, sub in fits.items():
        slope, icpt = fit(sub, "easy")
        at = reaches(slope, icpt, args.target)
        lines_fit[name] = (slope, icpt, sub[0]["examples"])
        lines.append(f"| {name} | {100 * slope:.1f} | {at:,.0f} examples ({at / batch_size:,.0f} iterations) | "
                     f"{100 * fit(sub, 'medium')[0]:.1f} |")
    md = args.results / "heldout-curve.md"
    md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, lines_fit, args.target, args.results / "heldout-curve.png")
    return 0


def plot(rows, fits, target: float, png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ex = [r["examples"] for r in rows]
    ax.plot(ex, [r["easy"] for r in rows], "o", label="held-out easy (300)")
    ax.plot(ex, [r["medium"] for r in rows], "s", label="held-out medium (200)")
    for name, (slope, icpt, start) in fits.items():
        end = reaches(slope, icpt, target)
        xs = [start, end if math.isfinite(end) and end > ex[-1] else ex[-1]]
        ax.plot(xs, [slope * math.log(x) + icpt for x in xs], "--", label=f"easy fit, {name}")
    ax.axhline(target, color="grey", lw=0.8)
    ax.set_xscale("log"), ax.set_xlabel("examples seen"), ax.set_ylabel("puzzles solved"), ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
