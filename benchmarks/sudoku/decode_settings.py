"""Does easier-first decoding rescue a partly trained Sudoku model? Blanks right and
puzzles solved on the 64 validation puzzles (the trainer's own curve set) or a held-out set
(``--heldout``) of one training save, against the step budget, the entropy bound and greedy
acceptance.

    python benchmarks/sudoku/decode_settings.py --run /work/sudoku-run3 --weights 0001223_adapters.safetensors
    python benchmarks/sudoku/decode_settings.py --run /work/fork-enc0 --weights average.safetensors \
        --heldout easy --settings '[{}, {"greedy": true}]' --name decode_settings-15300
    python benchmarks/sudoku/decode_settings.py --model mlx_dgemma/sudoku/model --heldout easy \
        --settings '[{}, {"attempts": 1}]' --name attempts-easy

``--run`` is a training folder of ``python -m mlx_dgemma.sudoku.train`` (its ``init`` model
and ``adapters/``); ``--model`` a model folder instead (the shipped one:
``mlx_dgemma/sudoku/model``). A setting is any set of ``solve_details`` keywords. A
smaller entropy bound and more steps commit fewer, surer cells a step (the entropy-bound
sampler accepts the lowest-entropy positions first); greedy takes each accepted cell's
most likely digit. Writes NAME.json and NAME.md under --out (``--name``, default decode_settings).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from mlx_dgemma import load  # noqa: E402
from mlx_dgemma.generate import make_settings  # noqa: E402
from mlx_dgemma.sudoku import blanks_right, solve_details  # noqa: E402
from mlx_dgemma.sudoku.data import read_pairs  # noqa: E402
from mlx_dgemma.sudoku.train import validation_puzzles  # noqa: E402

SETTINGS = [{}, {"steps": 48}, {"steps": 96}, {"steps": 96, "entropy_bound": 0.01}, {"steps": 96, "greedy": True},
            {"steps": 96, "entropy_bound": 0.01, "greedy": True}]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", type=Path, help="a training folder: its init/ model with --weights")
    which.add_argument("--model", type=Path, help="a model folder, as it is")
    ap.add_argument("--weights", default="adapters.safetensors", help="a file in RUN/adapters")
    ap.add_argument("--puzzles", type=int, default=64)
    ap.add_argument("--heldout", choices=("easy", "medium"), default=None,
                    help="score a held-out set (heldout_SET.txt) instead of the validation puzzles")
    ap.add_argument("--settings", type=json.loads, default=SETTINGS,
                    help="a JSON list of solve() keyword sets (default: the six above)")
    ap.add_argument("--name", default="decode_settings", help="the records' file name, without suffix")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args()
    if a.model is not None:
        model, tok = load(a.model)
    else:
        model, tok = load(a.run / "init")
        model.load_weights(str(a.run / "adapters" / a.weights), strict=False)
    model.eval()
    puzzles = read_pairs(HERE / f"heldout_{a.heldout}.txt") if a.heldout else validation_puzzles(a.puzzles)
    rows = []
    for kw in a.settings:
        t = time.perf_counter()
        res = solve_details([p for p, _ in puzzles], model=(model, tok), **kw)
        right = [b for (p, s), r in zip(puzzles, res) for b in blanks_right(p, r.grid, s)]
        rows.append(dict(settings=kw, solved=sum(r.solved for r in res), puzzles=len(res),
                         blanks_right=sum(right) / len(right), passes=sum(r.passes for r in res) / len(res),
                         seconds=time.perf_counter() - t))
        print(json.dumps(rows[-1]), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/sudoku/decode_settings.py " + shlex.join(sys.argv[1:])
    weights = str(a.model) if a.model is not None else a.weights
    (a.out / f"{a.name}.json").write_text(json.dumps({"command": cmd, "weights": weights, "rows": rows}, indent=1))
    lines = [f"`{cmd}`", "", "| settings | blanks right | solved | passes (mean) |", "| --- | --- | --- | --- |"]
    base = make_settings(model)  # the model's generation_config: what {} decodes with
    defaults = f"defaults ({base.max_denoising_steps} steps, bound {base.entropy_bound})"
    for r in rows:
        s = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or defaults
        lines.append(f"| {s} | {r['blanks_right']:.1%} | {r['solved']}/{r['puzzles']} | {r['passes']:.1f} |")
    (a.out / f"{a.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
