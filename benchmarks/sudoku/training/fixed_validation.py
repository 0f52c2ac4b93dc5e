"""Validation losses of saved Sudoku weights on ONE fixed set of draws (seed 1, all 256
validation examples), so that saves of different resumed segments and arms compare.

    python benchmarks/sudoku/training/fixed_validation.py --run /work/sudoku-run3 \
        arm-a=/path/0004000_adapters.safetensors arm-b=/path/0004000_adapters.safetensors

``--run``: a folder of ``python -m mlx_dgemma.sudoku.train`` (its ``init`` model and
``data/valid.jsonl``). Until 21f92d1 the trainer's own validation drew its noise from the
seed plus the resume offset, so its validation losses compared only within one resumed
segment (``fixed-validation.jsonl`` holds this session's figures).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import mlx_dgemma  # noqa: E402,F401  (OpenBLAS before mlx.core)
from mlx_dgemma import backend, load  # noqa: E402
from mlx_dgemma.tuner import setup_fine_tuning  # noqa: E402
from mlx_dgemma.tuner.datasets import load_split  # noqa: E402
from mlx_dgemma.tuner.trainer import TrainingArgs, evaluate  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--run", type=Path, required=True)
ap.add_argument("weights", nargs="+", help="NAME=PATH of a saved adapters file")
a = ap.parse_args()
model, tok = load(a.run / "init")
setup_fine_tuning(model, "full")
backend.configure(model, experts="blocked")
val = load_split(a.run / "data" / "valid.jsonl", tok)
args = TrainingArgs(batch_size=16, corrupt_only_free=True, seed=0, val_batches=-1)
for arm, path in (w.split("=", 1) for w in a.weights):
    model.load_weights(path, strict=False)
    p = evaluate(model, val, 16, -1, args)
    print(json.dumps({"arm": arm, "weights": path, "val_diffusion": round(p["diffusion"], 5),
                      "val_encoder": round(p["encoder"], 5)}), flush=True)
