"""The 9x9 grid: units and peers, parsing with one-line errors, checks and drawing.

A grid is an 81-character string, row by row, ``1``-``9`` for digits and ``0`` for a
blank (input may also use ``.`` for blanks and may contain whitespace).
"""

from __future__ import annotations

from typing import List, Optional, Tuple
from ..errors import SudokuInputError  # noqa: F401  (raised here; defined with the others)

DIGITS = "123456789"
BLANKS = "0."

ROWS: List[List[int]] = [[r * 9 + c for c in range(9)] for r in range(9)]
COLS: List[List[int]] = [[r * 9 + c for r in range(9)] for c in range(9)]
BOXES: List[List[int]] = [
    [(br * 3 + r) * 9 + bc * 3 + c for r in range(3) for c in range(3)] for br in range(3) for bc in range(3)
]
UNITS: List[List[int]] = ROWS + COLS + BOXES
UNIT_NAMES = ["row"] * 9 + ["column"] * 9 + ["box"] * 9
CELL_UNITS: List[Tuple[int, int, int]] = [(i // 9, 9 + i % 9, 18 + (i // 27) * 3 + (i % 9) // 3) for i in range(81)]
PEERS: List[Tuple[int, ...]] = [
    tuple(sorted({j for u in CELL_UNITS[i] for j in UNITS[u]} - {i})) for i in range(81)
]


def cell_name(i: int) -> str:
    return f"row {i // 9 + 1}, column {i % 9 + 1}"


def conflict(grid: str) -> Optional[str]:
    """A sentence naming the first repeated digit in a unit, or None when the rules hold."""
    for u, cells in enumerate(UNITS):
        seen = {}
        for i in cells:
            d = grid[i]
            if d in DIGITS:
                if d in seen:
                    return (f"{d} appears twice in {UNIT_NAMES[u]} {u % 9 + 1} "
                            f"(at {cell_name(seen[d])} and {cell_name(i)})")
                seen[d] = i
    return None


def parse(puzzle: str, what: str = "puzzle") -> str:
    """The puzzle as 81 characters with ``0`` for blanks; one-line SudokuInputError for a
    wrong length, a character other than 1-9 / 0 / ``.``, or givens that break the rules."""
    if not isinstance(puzzle, str):
        raise SudokuInputError(f"{what} must be a string of 81 characters, got {type(puzzle).__name__}")
    cells = "".join(puzzle.split())
    for k, ch in enumerate(cells):
        if ch not in DIGITS and ch not in BLANKS:
            raise SudokuInputError(f"{what}: bad character {ch!r} at cell {k + 1}: expected 1-9, or 0 or . for a blank")
    if len(cells) != 81:
        raise SudokuInputError(f"{what} has {len(cells)} cells, expected 81 (9 rows of 9; 0 or . for blanks)")
    grid = cells.replace(".", "0")
    bad = conflict(grid)
    if bad:
        raise SudokuInputError(f"{what}: the givens break the rules: {bad}")
    return grid


def givens(grid: str) -> int:
    return sum(ch in DIGITS for ch in grid)


def is_solution(puzzle: str, solution: str) -> bool:
    """Every cell a digit, the givens kept, and each row, column and box holds 1-9 once."""
    if not isinstance(solution, str) or len(solution) != 81 or any(ch not in DIGITS for ch in solution):
        return False
    if any(p in DIGITS and p != s for p, s in zip(puzzle, solution)):
        return False
    return all(len({solution[i] for i in cells}) == 9 for cells in UNITS)


def blanks_right(puzzle: str, grid: str, solution: str) -> List[bool]:
    """For each blank of ``puzzle`` (``0``), whether ``grid`` holds the solution's digit
    there: a measure that moves long before the solve rate does."""
    return [c == want for g, c, want in zip(puzzle, grid, solution) if g == "0"]


def draw(grid: str, puzzle: Optional[str] = None, color: bool = False, blank: str = ".") -> str:
    """A 9x9 drawing with box lines. With ``puzzle`` and ``color``, givens are bold and the
    filled-in digits cyan."""
    bold, cyan, reset = ("\x1b[1m", "\x1b[36m", "\x1b[0m") if color else ("", "", "")
    lines = []
    for r in range(9):
        if r and r % 3 == 0:
            lines.append("------+-------+------")
        row = []
        for c in range(9):
            if c and c % 3 == 0:
                row.append("|")
            i = r * 9 + c
            ch = grid[i] if grid[i] in DIGITS else blank
            if color and puzzle is not None and ch in DIGITS:
                ch = (bold if puzzle[i] in DIGITS else cyan) + ch + reset
            row.append(ch)
        lines.append(" ".join(row))
    return "\n".join(lines)
