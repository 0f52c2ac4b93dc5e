"""A classical solver: constraint propagation plus depth-first search, on bitmasks.

``solve`` returns the (first) solution, ``count_solutions`` stops at ``limit`` (2 tells
unique from not). It is the yardstick for the model's time per puzzle and the generator's
uniqueness check.
"""

from __future__ import annotations

from typing import List, Optional

from .grid import PEERS, UNITS

ALL = 0x1FF  # digits 1-9 as bits 0-8
_BIT = {str(d): 1 << (d - 1) for d in range(1, 10)}
_DIGIT = {1 << (d - 1): str(d) for d in range(1, 10)}
_POP = [bin(m).count("1") for m in range(512)]


def _candidates(grid: str) -> Optional[List[int]]:
    """Per cell: its bit if given, else the digits no peer holds; None on a conflict."""
    cand = [ALL] * 81
    for i, ch in enumerate(grid):
        if ch in _BIT:
            b = _BIT[ch]
            if not cand[i] & b:
                return None
            cand[i] = b
            for j in PEERS[i]:
                cand[j] &= ~b
    for i, ch in enumerate(grid):
        if ch in _BIT and cand[i] != _BIT[ch]:
            return None
    return cand


def _propagate(cand: List[int], filled: List[bool]) -> bool:
    """Naked and hidden singles until nothing changes; False on a contradiction."""
    changed = True
    while changed:
        changed = False
        for i in range(81):
            if filled[i]:
                continue
            m = cand[i]
            if m == 0:
                return False
            if _POP[m] == 1:
                filled[i] = True
                for j in PEERS[i]:
                    if cand[j] & m:
                        cand[j] &= ~m
                        if cand[j] == 0:
                            return False
                changed = True
        for cells in UNITS:
            for b in _DIGIT:
                where = [i for i in cells if cand[i] & b]
                if not where:
                    return False
                if len(where) == 1 and cand[where[0]] != b:
                    cand[where[0]] = b
                    changed = True
    return True


def _search(cand: List[int], filled: List[bool], out: List[str], limit: int) -> int:
    if not _propagate(cand, filled):
        return 0
    best, best_n = -1, 10
    for i in range(81):
        if not filled[i]:
            n = _POP[cand[i]]
            if n < best_n:
                best, best_n = i, n
                if n == 2:
                    break
    if best < 0:
        if not out:
            out.append("".join(_DIGIT[m] for m in cand))
        return 1
    total = 0
    m = cand[best]
    while m and total < limit:
        b = m & -m
        m ^= b
        c2, f2 = list(cand), list(filled)
        c2[best] = b
        total += _search(c2, f2, out, limit - total)
    return total


def count_solutions(puzzle: str, limit: int = 2) -> int:
    """Number of solutions, counted up to ``limit``."""
    cand = _candidates(puzzle)
    if cand is None:
        return 0
    return _search(cand, [False] * 81, [], limit)


def solve(puzzle: str) -> Optional[str]:
    """The first solution found (the only one for a proper puzzle), or None."""
    cand = _candidates(puzzle)
    if cand is None:
        return None
    out: List[str] = []
    _search(cand, [False] * 81, out, 1)
    return out[0] if out else None

