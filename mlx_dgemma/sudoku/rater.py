"""A human-style solver that rates puzzles by the techniques they need.

- ``easy``: naked and hidden singles alone solve it (each step: a cell with one
  candidate left, or a digit with one place left in a row, column or box);
- ``medium``: singles plus locked candidates (pointing and claiming) and naked/hidden
  pairs and triples solve it;
- ``hard``: anything else (X-wings, chains, or guessing).

Techniques are tried from the simplest: a harder one runs only when every simpler one is
stuck, as a person would.
"""

from __future__ import annotations

from itertools import combinations
from typing import List, Optional, Tuple

from .grid import BOXES, COLS, PEERS, ROWS, UNITS
from .solver import ALL

_BITS = [1 << d for d in range(9)]
_POP = [bin(m).count("1") for m in range(512)]
_ONE = {1 << d: d for d in range(9)}
EASY, MEDIUM, HARD = "easy", "medium", "hard"
LEVELS = (EASY, MEDIUM, HARD)


class _State:
    def __init__(self, grid: str):
        self.digit = [int(ch) for ch in grid]  # 0 = blank
        self.cand = [ALL if d == 0 else 1 << (d - 1) for d in self.digit]
        for i, d in enumerate(self.digit):
            if d:
                self._eliminate_peers(i, 1 << (d - 1))
        self.broken = False

    def _eliminate_peers(self, i: int, b: int) -> None:
        for j in PEERS[i]:
            if not self.digit[j]:
                self.cand[j] &= ~b

    def place(self, i: int, b: int) -> None:
        self.digit[i] = _ONE[b] + 1
        self.cand[i] = b
        self._eliminate_peers(i, b)

    def solved(self) -> bool:
        return all(self.digit)

    # -- singles ---------------------------------------------------------------------
    def singles(self) -> bool:
        """Place every naked and hidden single, repeatedly; True if any was placed."""
        placed = False
        progress = True
        while progress and not self.broken:
            progress = False
            for i in range(81):
                if not self.digit[i]:
                    m = self.cand[i]
                    if m == 0:
                        self.broken = True
                        return placed
                    if _POP[m] == 1:
                        self.place(i, m)
                        progress = placed = True
            for cells in UNITS:
                for b in _BITS:
                    where = [i for i in cells if self.cand[i] & b]
                    if not where:
                        self.broken = True
                        return placed
                    if len(where) == 1 and not self.digit[where[0]]:
                        self.place(where[0], b)
                        progress = placed = True
        return placed

    # -- medium techniques (eliminations) ----------------------------------------------
    def _remove(self, cells, mask: int) -> bool:
        hit = False
        for i in cells:
            if not self.digit[i] and self.cand[i] & mask:
                self.cand[i] &= ~mask
                hit = True
        return hit

    def locked_candidates(self) -> bool:
        hit = False
        for box in BOXES:
            bs = set(box)
            for b in _BITS:
                where = [i for i in box if not self.digit[i] and self.cand[i] & b]
                if len(where) < 2:
                    continue
                for lines, key in ((ROWS, lambda i: i // 9), (COLS, lambda i: i % 9)):
                    ks = {key(i) for i in where}
                    if len(ks) == 1:  # pointing: the line outside this box loses b
                        hit |= self._remove([j for j in lines[ks.pop()] if j not in bs], b)
        for lines in (ROWS, COLS):
            for line in lines:
                ls = set(line)
                for b in _BITS:
                    where = [i for i in line if not self.digit[i] and self.cand[i] & b]
                    if len(where) < 2:
                        continue
                    boxes = {(i // 27) * 3 + (i % 9) // 3 for i in where}
                    if len(boxes) == 1:  # claiming: the rest of the box loses b
                        hit |= self._remove([j for j in BOXES[boxes.pop()] if j not in ls], b)
        return hit

    def subsets(self) -> bool:
        """Naked and hidden pairs and triples."""
        for size in (2, 3):
            for cells in UNITS:
                free = [i for i in cells if not self.digit[i]]
                if len(free) <= size:
                    continue
                for group in combinations(free, size):
                    m = 0
                    for i in group:
                        m |= self.cand[i]
                    if _POP[m] == size and self._remove([i for i in free if i not in group], m):
                        return True
                digits = [b for b in _BITS if any(self.cand[i] & b for i in free)]
                for ds in combinations(digits, size):
                    dm = sum(ds)
                    where = {i for i in free if self.cand[i] & dm}
                    if len(where) == size and all(any(self.cand[i] & b for i in where) for b in ds):
                        hit = False
                        for i in where:
                            if self.cand[i] & ~dm:
                                self.cand[i] &= dm
                                hit = True
                        if hit:
                            return True
        return False


def rate(puzzle: str) -> Tuple[str, Optional[str]]:
    """``(level, solution)``: the easiest level whose techniques solve ``puzzle`` (81
    characters, ``0`` blanks), with the solution they reach; ``(hard, None)`` when they
    get stuck."""
    s = _State(puzzle)
    level = EASY
    while True:
        s.singles()
        if s.broken:
            return HARD, None
        if s.solved():
            return level, "".join(str(d) for d in s.digit)
        if s.locked_candidates() or s.subsets():
            level = MEDIUM
            continue
        return HARD, None


def singles_solvable(puzzle: str) -> bool:
    """True when naked and hidden singles alone solve ``puzzle`` (the ``easy`` test)."""
    s = _State(puzzle)
    s.singles()
    return not s.broken and s.solved()
