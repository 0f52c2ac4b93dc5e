# Why retry="repair" lost (session 14): in the first samples of the shipped model (48,000) that break the rules, how many
# of the cells outside the broken units (what repair pinned) are wrong? Run: python settled_check.py (writes one JSON line)
import sys
from pathlib import Path
ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT))
import mlx_dgemma, json
from mlx_dgemma.sudoku import solve_details
from mlx_dgemma.sudoku.grid import UNITS, CELL_UNITS, DIGITS
from mlx_dgemma.sudoku.data import read_pairs
pairs = read_pairs(ROOT / "benchmarks" / "sudoku" / "heldout_easy.txt")
res = solve_details([p for p, _ in pairs], attempts=1)
failed = wrong_kept = kept = 0; any_wrong_kept = 0
for (p, s), r in zip(pairs, res):
    if r.solved: continue
    failed += 1
    g = r.grid
    ok = [all(g[i] in DIGITS for i in c) and len({g[i] for i in c}) == 9 for c in UNITS]
    k = [i for i in range(81) if p[i] == "0" and all(ok[u] for u in CELL_UNITS[i])]
    w = [i for i in k if g[i] != s[i]]
    kept += len(k); wrong_kept += len(w); any_wrong_kept += bool(w)
print(json.dumps(dict(failed=failed, kept_cells=kept, wrong_kept_cells=wrong_kept, samples_with_a_wrong_kept_cell=any_wrong_kept)))
