"""Pilot arms side by side: blanks right and puzzles solved at the same iterations.

    python benchmarks/sudoku/compare_pilots.py 4x4-base 4x4-free 4x4-weight4 4x4-free-weight4

Reads each arm's curve under benchmarks/sudoku/pilots/ (``curve.jsonl``, or the
``curve.partial.jsonl`` of a run stopped early), or in any folder given by its path (a 9x9
run's ``--record``: its validation puzzles, one sample each), and prints a markdown table of the
evaluations every arm reached, then each arm's mean over its last ``--tail`` evaluations
of those (the curves are noisy: 128 puzzles, one puzzle = 0.8 points).

``--plot FILE`` draws the arms' blanks right against examples seen; ``--rate ARM=X`` (an
arm's examples a second, measured in one sitting) adds a panel against training minutes
at those rates, which is where a faster step that learns less per example shows whether
it still comes out ahead:

    cd benchmarks/sudoku && python compare_pilots.py --every 200 results/ab-session14/today-seed0 \
        results/ab-session13/cells results/ab-session13/enc0 --plot results/ab-session14/curves.png \
        --rate today-seed0=6.95 --rate cells=26.1 --rate enc0=42.6

(``results/ab-session14/table.md`` has the command with both seeds.)
"""

from __future__ import annotations

import argparse
import json
import re
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
            # examples an iteration: the batch size, from a training report (pilots: 16)
            per_it = next((r["examples"] / r["iteration"] for r in rows if r.get("examples")), 16)
            for r in rows:
                r.setdefault("examples_seen", r["iteration"] * per_it)
            return {r["iteration"]: r for r in rows if "blanks_right" in r}
    raise SystemExit(f"error: {folder}: no curve.jsonl or curve.partial.jsonl")


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("arms", nargs="+", help="folders under benchmarks/sudoku/pilots/, or any folder holding a "
                    "curve.jsonl (e.g. a 9x9 run's --record)")
    ap.add_argument("--every", type=int, default=100, help="show every this many iterations")
    ap.add_argument("--tail", type=int, default=3, help="evaluations in the closing mean")
    ap.add_argument("--plot", type=Path, default=None, help="a PNG of blanks right against examples seen")
    ap.add_argument("--rate", action="append", default=[], metavar="ARM=X",
                    help="an arm's examples a second (its folder's name): adds a panel against minutes")
    a = ap.parse_args(argv)
    if a.rate and not a.plot:
        ap.error("--rate adds a panel to --plot's figure: give --plot FILE too")
    curves = {arm: evaluations(arm) for arm in a.arms}
    per_second = rates(a.rate, curves)  # checked before the table is printed
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
    if a.plot:
        plot(curves, per_second, a.plot)
    return 0


def rates(pairs: List[str], curves: Dict[str, dict]) -> Dict[str, float]:
    """``--rate`` values by arm path; an arm is named by its folder's name."""
    names = {Path(arm).name: arm for arm in curves}
    out = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in names:
            raise SystemExit(f"error: --rate {pair}: no arm named {name!r} (arms: {', '.join(names)})")
        try:
            out[names[name]] = float(value)
        except ValueError:
            raise SystemExit(f"error: --rate {pair}: expected ARM=EXAMPLES_PER_SECOND, e.g. {name}=26")
    return out


def plot(curves: Dict[str, dict], per_second: Dict[str, float], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if per_second else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    colors: Dict[str, str] = {}  # one colour a recipe: its seeds ("ARM-seedN") differ in their line
    for arm, c in curves.items():
        its = sorted(c)
        ys = [c[i]["blanks_right"] for i in its]
        name = Path(arm).name
        recipe = re.sub(r"-seed\d+$", "", name)
        style = dict(ms=3, ls="-" if recipe == name or name.endswith("-seed0") else "--")
        if recipe in colors:
            style["color"] = colors[recipe]
        line, = axes[0][0].plot([c[i]["examples_seen"] for i in its], ys, "o", label=name, **style)
        colors[recipe] = style["color"] = line.get_color()
        if arm in per_second:
            axes[0][1].plot([c[i]["examples_seen"] / per_second[arm] / 60 for i in its], ys, "o",
                            label=f"{name} ({per_second[arm]:g} examples/s)", **style)
    axes[0][0].set_xlabel("examples seen")
    if panels == 2:
        axes[0][1].set_xlabel("minutes of training at the measured examples/s")
    for ax in axes[0]:
        ax.set_ylabel("blanks right (validation puzzles)"), ax.legend(fontsize=8), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
