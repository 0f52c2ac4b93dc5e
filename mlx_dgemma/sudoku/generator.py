"""Puzzle generation: solved grids from two sources, cells removed in two orders.

Training and evaluation puzzles come from different procedures, so the held-out set
measures solving, not recall of a generator's habits:

- ``source="search"`` (training): a grid filled cell by cell in random order by
  randomized depth-first search; ``order="random"``: cells removed one at a time in a
  random order, a removal kept only while the puzzle stays solvable by the wanted
  technique level.
- ``source="seeded"`` (evaluation): a few random clues placed without conflict, then
  completed by the classical solver (another distribution over grids);
  ``order="symmetric"``: cells removed in 180-degree-symmetric pairs, as published
  puzzles are.

Every puzzle is rated by the human-style solver (``rater.rate``), and has exactly one
solution (singles-solvable puzzles always do; others are checked by search).
:func:`transform` maps a puzzle and its solution through a random symmetry of Sudoku
(digit relabelling, row and column moves within bands and stacks, band and stack moves,
transposition): same difficulty, new grid.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator, List, Optional, Tuple

from .grid import DIGITS, PEERS, givens
from .rater import EASY, HARD, MEDIUM, rate, singles_solvable
from .solver import count_solutions, solve

SOURCES = ("search", "seeded")
ORDERS = ("random", "symmetric")


def search_grid(rnd: random.Random) -> str:
    """A solved grid by randomized depth-first search (random digit order per cell)."""
    grid = [0] * 81
    order = list(range(81))
    rnd.shuffle(order)

    def fill(k: int) -> bool:
        if k == 81:
            return True
        # most constrained empty cell next (keeps the search short); ties in random order
        best, best_opts = -1, None
        for i in order:
            if grid[i]:
                continue
            used = {grid[j] for j in PEERS[i]}
            opts = [d for d in range(1, 10) if d not in used]
            if best_opts is None or len(opts) < len(best_opts):
                best, best_opts = i, opts
                if len(opts) <= 1:
                    break
        rnd.shuffle(best_opts)
        for d in best_opts:
            grid[best] = d
            if fill(k + 1):
                return True
        grid[best] = 0
        return False

    fill(0)
    return "".join(map(str, grid))


def seeded_grid(rnd: random.Random, clues: int = 11) -> str:
    """A solved grid: ``clues`` random conflict-free digits, completed by the solver."""
    while True:
        cells = ["0"] * 81
        for i in rnd.sample(range(81), clues):
            used = {cells[j] for j in PEERS[i]}
            opts = [d for d in DIGITS if d not in used]
            if opts:
                cells[i] = rnd.choice(opts)
        sol = solve("".join(cells))
        if sol is not None:
            return sol


def _keep_for(level: str) -> Callable[[str], bool]:
    if level == EASY:
        return singles_solvable
    return lambda p: count_solutions(p, 2) == 1


def carve(solution: str, rnd: random.Random, target: int, level: str = EASY, order: str = "random") -> str:
    """Remove cells from ``solution`` down to ``target`` givens (or as far as it goes),
    keeping each removal only while the puzzle stays singles-solvable (``level="easy"``)
    or uniquely solvable (otherwise)."""
    keep = _keep_for(level)
    cells = list(solution)
    if order == "symmetric":
        pairs = [(i, 80 - i) for i in range(41)]
        rnd.shuffle(pairs)
        moves = [tuple(sorted(set(p))) for p in pairs]
    elif order == "random":
        moves = [(i,) for i in rnd.sample(range(81), 81)]
    else:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    count = 81
    for move in moves:
        if count - len(move) < target:
            continue
        saved = [cells[i] for i in move]
        for i in move:
            cells[i] = "0"
        if keep("".join(cells)):
            count -= len(move)
            if count <= target:
                break
        else:
            for i, ch in zip(move, saved):
                cells[i] = ch
    return "".join(cells)


def puzzle(
    rnd: random.Random,
    level: str = EASY,
    givens_range: Tuple[int, int] = (25, 35),
    source: str = "search",
    order: str = "random",
    tries: int = 50,
) -> Optional[Tuple[str, str]]:
    """``(puzzle, solution)`` rated exactly ``level`` with givens in ``givens_range``
    (inclusive), or None after ``tries`` grids."""
    lo, hi = givens_range
    for _ in range(tries):
        sol = search_grid(rnd) if source == "search" else seeded_grid(rnd)
        target = rnd.randint(lo, hi)
        p = carve(sol, rnd, target, EASY if level == EASY else MEDIUM, order)
        n = givens(p)
        if not lo <= n <= hi:
            continue
        got, _ = rate(p)
        if got == level:
            return p, sol
    return None


def puzzles(rnd: random.Random, n: int, level: str = EASY, **kw) -> Iterator[Tuple[str, str]]:
    made = 0
    while made < n:
        pz = puzzle(rnd, level, **kw)
        if pz is not None:
            made += 1
            yield pz


def transform(puzzle: str, solution: str, rnd: random.Random) -> Tuple[str, str]:
    """The same random symmetry applied to a puzzle and its solution."""
    digits = list(DIGITS)
    rnd.shuffle(digits)
    relabel = {d: digits[k] for k, d in enumerate(DIGITS)}
    relabel["0"] = "0"

    def lines() -> List[int]:
        bands = [0, 1, 2]
        rnd.shuffle(bands)
        out = []
        for b in bands:
            inner = [0, 1, 2]
            rnd.shuffle(inner)
            out += [b * 3 + r for r in inner]
        return out

    rows, cols, flip = lines(), lines(), rnd.random() < 0.5

    def apply(g: str) -> str:
        out = []
        for r in range(9):
            for c in range(9):
                rr, cc = rows[r], cols[c]
                if flip:
                    rr, cc = cc, rr
                out.append(relabel[g[rr * 9 + cc]])
        return "".join(out)

    return apply(puzzle), apply(solution)


__all__ = ["EASY", "HARD", "MEDIUM", "ORDERS", "SOURCES", "carve", "puzzle", "puzzles", "search_grid",
           "seeded_grid", "transform"]
