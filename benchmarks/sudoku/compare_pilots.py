"""Pilot arms side by side: blanks right and puzzles solved at the same iterations.

    python benchmarks/sudoku/compare_pilots.py 4x4-base 4x4-free 4x4-weight4 4x4-free-weight4

Reads each arm's curve under benchmarks/sudoku/pilots/ (``curve.jsonl``, or the
``curve.partial.jsonl`` of a run stopped early), or in any folder given by its path (a 9x9
run's ``--record``: its validation puzzles, one sample each), and prints a markdown table of the
evaluations every arm reached, then each arm's mean over its last ``--tail`` evaluations
of those (the curves are noisy: 128 puzzles, one puzzle = 0.8 points).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List

PILOTS = Path(__file__).resolve().parent / "pilots"


def evaluations(arm: str) -> Dict[int, dict]:
    folder = Path(arm) if Path(arm).is_dir() else PILOTS / arm
    for name in ("curve.jsonl", "curve.partial.jsonl"):
        path = folder / name
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            for r in rows:  # the 9x9 trainer's curve (sudoku.train --record): its validation puzzles
                if "val_blank_accuracy" in r:
                    r.update(blanks_right=r["val_blank_accuracy"], solved=r["val_solve_rate"])
            return {r["iteration"]: r for r in rows if "blanks_right" in r}
    raise SystemExit(f"error: {folder}: no curve.jsonl or curve.partial.jsonl")


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("arms", nargs="+", help="folders under benchmarks/sudoku/pilots/, or any folder holding a "
                    "curve.jsonl (e.g. a 9x9 run's --record)")
    ap.add_argument("--every", type=int, default=100, help="show every this many iterations")
    ap.add_argument("--tail", type=int, default=3, help="evaluations in the closing mean")
    a = ap.parse_args(argv)
    curves = {arm: evaluations(arm) for arm in a.arms}
    common = sorted(set.intersection(*(set(c) for c in curves.values())))
    shown = [i for i in common if i % a.every == 0]
    print("| iteration | " + " | ".join(f"{arm}: blanks / solved" for arm in a.arms) + " |")
    print("|---:|" + "---:|" * len(a.arms))
    for i in shown:
        print(f"| {i} | " + " | ".join(f"{c[i]['blanks_right']:.1%} / {c[i]['solved']:.1%}" for c in curves.values())
              + " |")
    last = common[-a.tail:]
    print(f"| mean of {', '.join(map(str, last))} | " + " | ".join(
        f"{sum(c[i]['blanks_right'] for i in last) / len(last):.1%} / "
        f"{sum(c[i]['solved'] for i in last) / len(last):.1%}" for c in curves.values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
