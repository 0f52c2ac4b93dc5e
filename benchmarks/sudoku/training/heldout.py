"""A training run's weights on the held-out puzzles, at the default settings: the figure
the issue's 80% is judged on (the trainer's 64 validation puzzles are too few to see a
session's progress); and with one sample a puzzle (``attempts=1``), the model's own rate,
which ``heldout_curve.py`` follows.

    python benchmarks/sudoku/training/heldout.py --run /work/fork-enc0 --out results/heldout-session6.json

Scores the run's weight average (``RUN/adapters/average.safetensors``; ``--weights FILE``
for a numbered save or the tree's checkpoint) on the 300 held-out easy and 200 medium
puzzles, batched as ``sudoku.score`` batches them, and times the first 20 easy puzzles one by
one (the issue's bound is a second a puzzle). Run it with the training stopped: it takes
both cores for about four minutes.

``--ship`` writes the scored weights into the package (``mlx_dgemma/sudoku/model``, or the
folder given) when they solve at least the recipe's ``ship_solve_rate`` of the held-out easy
puzzles: the issue's bar. The trainer's own end-of-run decision reads its validation
puzzles, which come from the training generator and are harder (at 45,400 the average
solved 65.6% of them and 79.3% of these), so a model can pass this bar and not that one.
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
import mlx_dgemma  # noqa: E402,F401  (OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402
from mlx_dgemma import load  # noqa: E402
from mlx_dgemma.builtin import SUDOKU_MODEL_DIR  # noqa: E402
from mlx_dgemma.sudoku import DEFAULT_ATTEMPTS, score  # noqa: E402
from mlx_dgemma.sudoku.data import read_pairs  # noqa: E402
from mlx_dgemma.sudoku.recipe import reads_prompt  # noqa: E402
from mlx_dgemma.sudoku.train import CONFIG, model_card, read_config, write_shipped  # noqa: E402
from mlx_dgemma.tuner.weight_average import WeightAverage  # noqa: E402

sys.path.insert(0, str(HERE.parent))
from run import latencies  # noqa: E402  (benchmarks/sudoku/run.py: the same batch-1 timing)


def scored_iteration(run: Path, weights: Path) -> Optional[int]:
    """The iteration ``weights`` belong to: a weight average's own (its metadata says it, so a
    copy kept aside, e.g. ``--weights average-54200.safetensors``, keeps it), else the run's
    progress for its own ``adapters/average.safetensors``; None for anything else."""
    own = WeightAverage.iteration_of(weights)  # -1: no iteration in the file's metadata
    if own is not None and own >= 0:
        return own
    progress = run / "progress.json"
    if weights.resolve() == (run / "adapters" / "average.safetensors").resolve() and progress.exists():
        return json.loads(progress.read_text()).get("iteration")
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="the trainer's --out folder (its init/ and adapters/)")
    ap.add_argument("--weights", type=Path, default=None, help="default: RUN/adapters/average.safetensors")
    ap.add_argument("--out", type=Path, required=True, help="the JSON record to write")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N puzzles of each set")
    ap.add_argument("--ship", type=Path, nargs="?", const=SUDOKU_MODEL_DIR, default=None,
                    help="write the weights into this model folder (default: the package's) if they pass --bar")
    ap.add_argument("--bar", type=float, default=None,
                    help="easy share solved to ship (default: train.yaml's ship_solve_rate)")
    a = ap.parse_args(argv)
    if a.limit is not None and a.ship is not None and a.ship.resolve() == SUDOKU_MODEL_DIR.resolve():
        ap.error(f"--ship into the package ({SUDOKU_MODEL_DIR}) scores the whole held-out sets: drop --limit")
    recipe = read_config(CONFIG)
    bar = a.bar if a.bar is not None else float(recipe.get("ship_solve_rate", 0.8))
    weights = a.weights or a.run / "adapters" / "average.safetensors"
    for need in (a.run / "init" / "config.json", weights):
        if not need.exists():
            ap.error(f"{need} does not exist")
    model, tok = load(a.run / "init")
    model.load_weights(list(mx.load(str(weights)).items()), strict=False)
    record = {"run": str(a.run), "weights": str(weights), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    iteration = scored_iteration(a.run, weights)
    if iteration is not None:
        record["iteration"] = iteration
    sets = {name: read_pairs(HERE.parent / f"heldout_{name}.txt", a.limit) for name in ("easy", "medium")}
    record["attempts"] = DEFAULT_ATTEMPTS
    record["single_sample"] = {}
    for attempts, into in ((DEFAULT_ATTEMPTS, record), (1, record["single_sample"])):
        for name, pairs in sets.items():
            tic = time.perf_counter()
            s = score(pairs, model=(model, tok), attempts=attempts)
            into[name] = {"puzzles": s.puzzles, "solved": round(s.solved, 4), "blanks_right": round(s.blanks_right, 4),
                          "passes": round(s.passes, 2), "seconds": round(time.perf_counter() - tic, 1)}
            print(f"{name}, attempts={attempts}", into[name], flush=True)
    times = latencies(sets["easy"], (model, tok), 20)
    record["seconds_per_easy_puzzle_batch1"] = round(sorted(times)[len(times) // 2], 3)
    record["slowest_easy_puzzle_batch1"] = round(max(times), 3)
    if a.ship is not None:
        passed = record["easy"]["solved"] >= bar
        if passed:
            config = json.loads((a.run / "init" / "config.json").read_text())
            card = model_card(recipe, {"iterations": record.get("iteration"), "heldout": record})
            write_shipped(model, config, a.ship, card, "cells" if reads_prompt(tok) else "pins")  # the run's format
        print(f"{'shipped: ' + str(a.ship) if passed else 'not shipped'}: easy {record['easy']['solved']:.1%} "
              f"{'>=' if passed else '<'} {bar:.0%} (--bar)", flush=True)
        record["shipped"] = str(a.ship) if passed else False
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
