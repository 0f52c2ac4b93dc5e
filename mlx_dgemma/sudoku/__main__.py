"""``python -m mlx_dgemma.sudoku PUZZLE``: solve a Sudoku with the shipped DiffusionGemma.

Prints the puzzle and the model's grid (givens bold, filled digits cyan on a terminal),
whether the grid is a solution, and the time. ``--show-drafts`` redraws the grid at every
denoising step while the canvas fills in.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

EXAMPLE = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_dgemma.sudoku",
        description="Solve a Sudoku with the small DiffusionGemma shipped in mlx_dgemma "
        "(block diffusion: the 81 cells are denoised together, givens pinned in the canvas).",
        epilog=f"example:\n  python -m mlx_dgemma.sudoku {EXAMPLE} --show-drafts",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("puzzle", nargs="?", default=EXAMPLE,
                   help="81 characters, row by row: 1-9 for givens, 0 or . for blanks (default: an example)")
    p.add_argument("--show-drafts", action="store_true", help="redraw the grid at every denoising step (terminals)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps at most (default: the model's, 24)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--attempts", type=int, default=None,
                   help="samples at most: while the grid breaks the rules, draw again with a new seed (default: 4)")
    p.add_argument("--model", default="sudoku", help="the model: 'sudoku' (shipped) or a folder")
    p.add_argument("--sampler", choices=("entropy-bound", "confidence"), default=None,
                   help="acceptance rule (default: the reference's entropy bound)")
    p.add_argument("--threshold", type=float, default=None, help="--sampler confidence threshold")
    p.add_argument("--entropy-bound", type=float, default=None, help="entropy bound (default: the model's)")
    return p


def _fail(msg: str) -> int:
    print(f"error: {msg}".splitlines()[0], file=sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    from ..errors import ConfigError, GenerateInputError, WeightsError
    from . import DEFAULT_ATTEMPTS, draw, load_model, parse, solve_details
    from .grid import SudokuInputError

    args = build_parser().parse_args(argv)
    if args.steps is not None and args.steps < 1:
        return _fail(f"--steps must be >= 1, got {args.steps}")
    if args.attempts is not None and args.attempts < 1:
        return _fail(f"--attempts must be >= 1, got {args.attempts}")
    try:
        puzzle = parse(args.puzzle)
    except SudokuInputError as e:
        return _fail(str(e))
    out = sys.stdout
    tty = out.isatty()
    if args.show_drafts and not tty:
        print("--show-drafts: stdout is not a terminal, showing the result only", file=sys.stderr)
    try:
        pair = load_model(args.model)
    except (ConfigError, WeightsError, OSError) as e:
        return _fail(str(e))
    out.write(draw(puzzle) + "\n\n")
    out.flush()
    height = 11  # lines of a drawn grid
    shown = [False]

    def on_draft(grids, d) -> None:
        if shown[0]:
            out.write(f"\x1b[{height + 1}A\r\x1b[J")
        out.write(f"step {d.step}: {int(d.accepted[0])} cells accepted\n" + draw(grids[0], puzzle, color=True) + "\n")
        out.flush()
        shown[0] = True
        time.sleep(0.05)  # a step takes milliseconds: slow the redraw down enough to watch

    settings = dict(sampler=args.sampler, threshold=args.threshold, entropy_bound=args.entropy_bound)
    t0 = time.perf_counter()
    try:
        (res,) = solve_details([puzzle], args.steps, args.seed, model=pair,
                               on_draft=on_draft if args.show_drafts and tty else None,
                               attempts=args.attempts or DEFAULT_ATTEMPTS, **settings)
    except (GenerateInputError, SudokuInputError, ValueError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        out.write("\n")
        return 130
    dt = time.perf_counter() - t0
    if shown[0]:
        out.write(f"\x1b[{height + 1}A\r\x1b[J")
    out.write(draw(res.grid, puzzle, color=tty) + "\n")
    note = " (drafts slowed down for display)" if shown[0] else ""
    samples = "" if res.attempts == 1 else f", {res.attempts} samples ({'the earlier' if res.solved else 'every'} one broke the rules)"
    print(f"{'solved' if res.solved else 'NOT solved'}: {81 - puzzle.count('0')} givens, "
          f"{puzzle.count('0')} cells filled in {dt:.2f} s{samples}{note}", file=sys.stderr)
    return 0 if res.solved else 1


if __name__ == "__main__":
    sys.exit(main())
