"""Solve rate and blanks right of a run's last save against the uniform average of several
saves (the question behind train.yaml's weight_average_decay: do averaged weights solve more?).

    python benchmarks/sudoku/training/average_saves.py --run /work/fork-enc0 6607,6700,6800,6900,7000

Each argument is a comma-separated list of iterations whose numbered saves
(``RUN/adapters/NNNNNNN_adapters.safetensors``) are averaged; the last save of the first
list is scored alone too. Scored on the trainer's 64 validation puzzles and the first
``--easy`` held-out easy puzzles, at the default settings. Appends to
``average-saves.jsonl`` beside this file.
"""
import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
import mlx_dgemma  # noqa: E402,F401  (OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402
from mlx_dgemma import load  # noqa: E402
from mlx_dgemma.sudoku import score as score_pairs  # noqa: E402
from mlx_dgemma.sudoku.data import read_pairs  # noqa: E402
from mlx_dgemma.sudoku.train import validation_puzzles  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--run", type=Path, required=True)
ap.add_argument("--easy", type=int, default=128, help="held-out easy puzzles to score (of 300)")
ap.add_argument("--init", type=Path, default=None,
                help="the initial model the saves were trained from (default RUN/init; a run grown since "
                     "needs the smaller one: python -c 'from mlx_dgemma.sudoku.recipe import write_initial_model; "
                     "write_initial_model(\"/tmp/init6\")')")
ap.add_argument("saves", nargs="+", help="comma-separated iterations of numbered saves to average")
a = ap.parse_args()

model, tok = load(a.init or a.run / "init")
sets = {"validation 64": validation_puzzles(64),
        f"held-out easy {a.easy}": read_pairs(HERE.parent / "heldout_easy.txt")[: a.easy]}


def weights(it: int):
    return mx.load(str(a.run / "adapters" / f"{it:07d}_adapters.safetensors"))


def score(name: str, params) -> None:
    model.load_weights(list(params.items()), strict=False)
    row = {"arm": name, "run": str(a.run), "date": time.strftime("%Y-%m-%d %H:%M")}
    for label, puzzles in sets.items():
        got = score_pairs(puzzles, model=(model, tok))
        row[label] = {"solved": round(got.solved, 4), "blanks_right": round(got.blanks_right, 4)}
    print(json.dumps(row), flush=True)
    with open(HERE / "average-saves.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


first = [int(x) for x in a.saves[0].split(",")]
score(f"last save {first[-1]}", weights(first[-1]))
for arg in a.saves:
    its = [int(x) for x in arg.split(",")]
    ws = [weights(i) for i in its]
    score(f"average of {its}", {k: sum(w[k] for w in ws) / len(ws) for k in ws[0]})
