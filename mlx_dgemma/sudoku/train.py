"""Rebuild the shipped Sudoku model from scratch, with the project's trainer.

    flock /work/heavy.lock python -m mlx_dgemma.sudoku.train            # everything, ~hours on 2 cores
    python -m mlx_dgemma.sudoku.train --iters 200 --out /tmp/sudoku      # a short run elsewhere

One command: the training data (``data.write_training_data``), a freshly initialised
model folder (``recipe.write_initial_model``), full training with ``mlx_dgemma.tuner``
(the DiffusionGemma objective and loop; every weight but the router trains), then the
shipped folder ``mlx_dgemma/sudoku/model`` written through ``folder.write_model_folder``.
The settings come from ``train.yaml`` beside this file (``-c`` another); the loss curve,
a solve-rate curve on validation puzzles (made by the training generator, not the
held-out sets) and the wall time go to ``benchmarks/sudoku/training/`` as they come, so a
stopped run is not lost. Weights are saved every ``steps_per_save`` iterations (the
trainer's adapter folder ``OUT/adapters``: ``python -m mlx_dgemma.fuse --model OUT/init
--adapter-path OUT/adapters`` reads it, ``--export-hf`` for transformers);
``--resume`` continues from the last save: the one ``OUT/progress.json`` names, or, when
``--out`` holds none (a fresh clone, another machine), the checkpoint committed in the tree
(``benchmarks/sudoku/checkpoint``: the weights, the optimizer state and the curve, under 20
MB); ``--export-checkpoint`` writes that checkpoint from ``--out``'s last save. With the
optimizer state of that save the run continues exactly (Adam's moments and step, the
schedule); without it, with fresh moments warmed up again. Ctrl-C, or ``kill`` (SIGTERM or
SIGINT) of the command, stops the training after its current step with a save, in every
process (``tuner.stop``). ``--processes 2`` (or
``processes`` in the config) trains data-parallel in two processes on MLX's ring backend,
one BLAS thread each (MLX's CPU element-wise work is single-threaded, so one process leaves
a core idle for much of a step; measured slower so far: benchmarks/sudoku/README.md).
With ``weight_average_decay`` the run keeps a moving average of its weights
(``tuner.weight_average``, saved as ``OUT/adapters/average.safetensors`` with every save and
restored by ``--resume`` from that folder; the committed checkpoint has no room for it, so a
resume from the tree starts a new one); the solve-rate curve scores both, and the final
folder takes whichever solved more.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "train.yaml"
RECORD = HERE.parents[1] / "benchmarks" / "sudoku" / "training"
CHECKPOINT = HERE.parents[1] / "benchmarks" / "sudoku" / "checkpoint"
OPTIMIZER_FILE = "optimizer.safetensors"
CHECKPOINT_BYTES = 20_000_000  # the committed checkpoint's budget in the tree
AVERAGE_FILE = "average.safetensors"  # the weight average (weight_average_decay), beside the run's saves
AVERAGE = "average_"  # the prefix of the weight average's figures in the curve


def read_config(path: Path) -> Dict[str, Any]:
    import yaml

    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SystemExit(f"error: {path}: {e}".splitlines()[0]) from None
    if not isinstance(cfg, dict):
        raise SystemExit(f"error: {path}: expected a mapping of settings")
    return cfg


def schedule(cfg: Dict[str, Any], offset: int = 0):
    """Linear warm-up then cosine decay to ``min_lr_ratio`` of the peak, shifted by ``offset``
    iterations (a resumed run continues the curve, after a warm-up of its own).

    ``restarts`` (a list of ``{at: ITERATION, learning_rate: PEAK}``): warm restarts (SGDR,
    Loshchilov & Hutter 2017). Each cycle warms up and decays by cosine to ``min_lr_ratio``
    of its own peak where the next begins (the last at ``iters``), so a schedule that has
    ended can be lengthened without changing the rates it already gave."""
    import mlx.core as mx
    import mlx.optimizers as optim

    iters, warm, ratio = int(cfg["iters"]), int(cfg["warmup_steps"]), float(cfg["min_lr_ratio"])
    cycles = [(0, float(cfg["learning_rate"]))] + [(int(r["at"]), float(r["learning_rate"]))
                                                    for r in cfg.get("restarts") or []]
    ends = [at for at, _ in cycles[1:]] + [iters]
    parts, bounds = [], []
    for (start, lr), end in zip(cycles, ends):
        parts += [optim.linear_schedule(lr / 100, lr, warm),
                  optim.cosine_decay(lr, max(end - start - warm, 1), lr * ratio)]
        bounds += [start, start + warm]
    base = optim.join_schedules(parts, bounds[1:])
    if not offset:
        return lambda step: base(mx.array(step))
    # a resumed run starts with fresh Adam moments: at the curve's full rate their first
    # updates undo training (the loss jumped back ~200 iterations), so warm up again
    return lambda step: base(mx.array(step) + offset) * mx.minimum(1.0, (mx.array(step) + 1) / warm)


def check_restarts(cfg: Dict[str, Any], path: Path) -> None:
    """One line naming the config when its ``restarts`` cannot make a schedule."""
    last = int(cfg["warmup_steps"])
    for k, r in enumerate(cfg.get("restarts") or []):
        try:
            at, lr = int(r["at"]), float(r["learning_rate"])
        except (TypeError, KeyError, ValueError):
            raise SystemExit(f"error: {path}: restarts[{k}] must be {{at: ITERATION, learning_rate: RATE}}, "
                             f"got {r!r}") from None
        if not last < at < int(cfg["iters"]) or not lr > 0:
            raise SystemExit(f"error: {path}: restarts[{k}] at {at} must come after the last cycle's warm-up "
                             f"({last}) and before iters ({cfg['iters']}), with a positive learning_rate (got {lr})")
        last = at + int(cfg["warmup_steps"])


def validation_puzzles(n: int) -> List[tuple]:
    """Easy puzzles from the TRAINING generator's procedure (search grids, random removal),
    own seed: the in-training solve-rate curve never touches the held-out sets."""
    from . import generator

    return list(generator.puzzles(random.Random(31_337), n, "easy", givens_range=(25, 35)))


def write_shipped(model, config: Dict[str, Any], dst: Path, card: str, prompt: str = "cells") -> Path:
    """The trained model as a normal model folder (package data), via the one builder;
    ``prompt``: its prompt format (``recipe.chat_template``)."""
    from mlx.utils import tree_flatten

    from ..folder import hf_weights, write_model_folder
    from .recipe import GENERATION_CONFIG, chat_template, write_tokenizer

    params = dict(tree_flatten(model.parameters()))
    return write_model_folder(dst, config, hf_weights(params), tokenizer=write_tokenizer,
                              chat_template=chat_template(prompt), generation_config=dict(GENERATION_CONFIG),
                              readme=card)


def model_card(cfg: Dict[str, Any], record: Dict[str, Any]) -> str:
    """The shipped folder's README. ``record``: the run's record (iterations, train_seconds,
    machine), or ``heldout``: the held-out scores it was shipped on (training/heldout.py)."""
    its = record.get("iterations")  # None for weights scored without the run's progress
    trained = f"{its} iterations of {cfg['batch_size']} solved grids" if its else "train.yaml's recipe"
    if record.get("train_seconds"):
        trained += f", {record['train_seconds'] / 60:.0f} minutes on {record.get('machine', 'this machine')}"
    held, scores = record.get("heldout"), ""
    if held:
        scores = (f" Held-out puzzles at the default settings: {held['easy']['solved']:.1%} of"
                  f" {held['easy']['puzzles']} easy and {held['medium']['solved']:.1%} of"
                  f" {held['medium']['puzzles']} medium solved")
        one = held.get("single_sample")
        if one:  # the default draws a puzzle again while its grid breaks the rules
            scores += (f" (up to {held['attempts']} samples a puzzle; one sample: {one['easy']['solved']:.1%} easy,"
                       f" {one['medium']['solved']:.1%} medium)")
        scores += "."
    return f"""---
library_name: mlx
pipeline_tag: text-generation
tags:
- mlx
- diffusion-gemma
- block-diffusion
- sudoku
---
# DiffusionGemma Sudoku

A small DiffusionGemma (the released architecture at a small size: MoE beside a dense
MLP, sliding and full layers, self-conditioning, soft-capped logits) trained from scratch
by `python -m mlx_dgemma.sudoku.train` with mlx_dgemma's trainer (the DiffusionGemma
objective). It fills the 81 cells of a Sudoku by block diffusion; the givens are pinned
in the canvas.

```python
from mlx_dgemma.sudoku import solve
solve("53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79")
```

Architecture: {json.dumps(cfg["model"])}. Training: {trained}.{scores} Results:
benchmarks/sudoku/README.md in mlx_dgemma.
"""


def _before_growth(model: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The model settings a grown recipe (``grown_from``) was grown from, else None."""
    if not model.get("grown_from"):
        return None
    base = {k: v for k, v in model.items() if k != "grown_from"}
    return dict(base, num_hidden_layers=int(model["grown_from"]))


def _same_data(data: Dict[str, Any]) -> Dict[str, Any]:
    """What makes the data what it is: not ``workers`` (each chunk of puzzles has its own
    seed, so any count of processes makes the same lines), which a bigger machine raises."""
    return {k: v for k, v in data.items() if k != "workers"}


def _growth(saved, model: Dict[str, Any], path: Path):
    """``grow(flat, fresh)`` when the save at ``path`` holds the layers the config's model
    was grown from (``recipe.grow_layers``), None when it holds the config's; a one-line
    error for any other count."""
    from .recipe import grow_layers, layer_count

    have, want = layer_count(saved), int(model.get("num_hidden_layers", 6))
    if have == want:
        return None
    if have != int(model.get("grown_from") or 0):
        raise SystemExit(f"error: --resume: {path} holds {have} layers, the config's model has {want}"
                         + (f" (grown from {model['grown_from']})" if model.get("grown_from") else ""))
    return lambda flat, fresh: grow_layers(flat, have, want, fresh)


def _progress(folder: Path) -> Optional[int]:
    """The iteration ``folder/progress.json`` names (None: no such file)."""
    f = Path(folder) / "progress.json"
    if not f.is_file():
        return None
    try:
        return int(json.loads(f.read_text())["iteration"])
    except (ValueError, KeyError, TypeError):
        raise SystemExit(f"error: {f}: expected {{\"iteration\": N}}") from None


def _kept_rows(curve: Path, upto: int) -> List[str]:
    """The curve's rows up to iteration ``upto`` (rows past a resumed save describe training
    that was discarded; a row torn by a run killed mid-write is dropped)."""
    kept = []
    for r in curve.read_text().splitlines() if curve.is_file() else []:
        try:
            if json.loads(r).get("iteration", 0) <= upto:
                kept.append(r)
        except ValueError:
            pass
    return kept


def export_checkpoint(out: Path, record: Path, dst: Path, budget: int = CHECKPOINT_BYTES) -> Path:
    """The save ``out/progress.json`` names, as the checkpoint a fresh clone resumes from:
    ``weights.safetensors`` (float32), ``optimizer.safetensors`` (its moments in bfloat16,
    when the run saved the state of that very iteration and the whole stays within
    ``budget`` bytes: without it a resume warms fresh moments up again), ``progress.json``
    and the curve."""
    import mlx.core as mx

    from ..tuner.utils import atomic_write, numbered_adapter_file
    from .data import write_atomic

    it = _progress(out)
    if it is None:
        raise SystemExit(f"error: --export-checkpoint: {out / 'progress.json'} does not exist (no save yet)")
    adapters = out / "adapters"
    weights = numbered_adapter_file(adapters / "adapters.safetensors", it)
    if not weights.is_file():
        raise SystemExit(f"error: --export-checkpoint: {weights} does not exist")
    dst.mkdir(parents=True, exist_ok=True)
    atomic_write(dst / "weights.safetensors", lambda tmp: mx.save_safetensors(tmp, mx.load(str(weights))))
    rows = _kept_rows(record / "curve.jsonl", it)
    opt, kept = adapters / OPTIMIZER_FILE, False
    if opt.is_file():
        state, meta = mx.load(str(opt), return_metadata=True)
        if meta.get("iteration") == str(it):
            low = {k: v.astype(mx.bfloat16) if v.dtype == mx.float32 and v.ndim else v for k, v in state.items()}
            size = (dst / "weights.safetensors").stat().st_size + sum(v.nbytes for v in low.values()) + sum(
                len(r) + 1 for r in rows)
            kept = size <= budget
            if kept:
                atomic_write(dst / OPTIMIZER_FILE, lambda tmp: mx.save_safetensors(tmp, low, metadata=meta))
            else:
                print(f"the optimizer state left out: with it the checkpoint would take {size / 1e6:.1f} MB, "
                      f"over {budget / 1e6:.0f} MB (a resume warms fresh moments up)", flush=True)
    if not kept and (dst / OPTIMIZER_FILE).is_file():
        (dst / OPTIMIZER_FILE).unlink()  # an older state would not match these weights
    write_atomic(dst / "curve.jsonl", rows)
    for name in ("config.json",):
        if (out / name).is_file():
            (dst / name).write_text((out / name).read_text())
    (dst / "progress.json").write_text(json.dumps({"iteration": it}))  # last: names a complete checkpoint
    return dst


def _launch(argv: List[str], processes: int) -> int:
    """This command again in ``processes`` ring processes on this machine (mlx.launch's code,
    through ``mlx_dgemma.launch``: without its polling, which takes the ranks' cores), one
    BLAS thread each. The launcher and its ranks run in a process group of their own, to
    which a SIGINT, SIGTERM or SIGHUP of this process goes on as SIGINT: the ranks stop after
    the same step and save (``tuner.stop``), however the signal came (a terminal's Ctrl-C or
    its closing, a ``kill`` of this process or of its group); a second one stops them at once.
    A SIGHUP that ``nohup`` set ignored stays ignored."""
    import random
    import signal
    import subprocess

    from ..tuner.stop import handling

    root = str(HERE.parents[1])
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "mlx_dgemma.launch", "-n", str(processes), "--backend", "ring", "--starting-port",
           str(random.randint(20000, 40000)), "--env", "OPENBLAS_NUM_THREADS=1", "--env", f"PYTHONPATH={root}",
           "--python", sys.executable, "--", "-m", "mlx_dgemma.sudoku.train", *argv, "--worker"]
    ranks = subprocess.Popen(cmd, env=env, start_new_session=True)
    relayed = []

    def relay(signum, frame):
        relayed.append(signum)
        with contextlib.suppress(ProcessLookupError):  # they have just ended
            os.killpg(ranks.pid, signal.SIGINT)

    hangup = [signal.SIGHUP] if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN else []
    with handling((signal.SIGINT, signal.SIGTERM, *hangup), relay):
        code = ranks.wait()
    return 130 if relayed else code


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m mlx_dgemma.sudoku.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--config", type=Path, default=CONFIG)
    ap.add_argument("--out", type=Path, default=Path.home() / ".cache" / "mlx_dgemma" / "sudoku-train",
                    help="work folder: data, initial model, saved weights (default: %(default)s)")
    ap.add_argument("--ship", type=Path, default=HERE / "model", help="where the trained folder goes")
    ap.add_argument("--record", type=Path, default=RECORD, help="where the curves and the record go")
    ap.add_argument("--checkpoint", type=Path, default=CHECKPOINT,
                    help="the committed checkpoint --resume falls back to and --export-checkpoint writes")
    ap.add_argument("--iters", type=int, default=None, help="override the config's iterations")
    ap.add_argument("--processes", type=int, default=None, help="data-parallel processes (default: the config's)")
    ap.add_argument("--resume", action="store_true",
                    help="continue from the last save: --out's, or --checkpoint's when --out has none")
    ap.add_argument("--export-checkpoint", action="store_true",
                    help="copy --out's last save and the curve into --checkpoint, then stop")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one of --processes
    args = ap.parse_args(argv)

    if args.export_checkpoint:
        dst = export_checkpoint(args.out, args.record, args.checkpoint)
        size = sum(f.stat().st_size for f in dst.iterdir()) / 1e6
        print(f"wrote {dst} (iteration {_progress(dst)}, {size:.1f} MB)")
        return 0
    cfg = read_config(args.config)
    from .recipe import PROMPTS

    prompt = cfg.get("prompt", "cells")  # configs from before the option: the puzzle in the prompt
    if prompt not in PROMPTS:
        raise SystemExit(f"error: {args.config}: prompt must be one of {', '.join(PROMPTS)}, got {prompt!r}")
    if args.iters is not None:
        cfg["iters"] = args.iters
    check_restarts(cfg, args.config)
    processes = int(args.processes if args.processes is not None else cfg.get("processes", 1))
    if processes < 1:
        raise SystemExit(f"error: --processes must be at least 1, got {processes}")
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.tuner.callbacks import TrainingCallback

    from .. import backend, load
    from ..tuner import TrainingArgs, WeightAverage, setup_fine_tuning, train
    from ..tuner.draws import EPS
    from ..tuner.utils import load_optimizer_state, numbered_adapter_file, save_adapter_config
    from . import Score, score
    from .data import chat_line, load_examples, write_atomic, write_training_data
    from .recipe import layer_count, model_config, write_initial_model

    world = mx.distributed.init() if args.worker else None
    rank = world.rank() if world is not None else 0
    size = world.size() if world is not None else 1
    out, rec = args.out, args.record
    t_start = time.perf_counter()
    record: Dict[str, Any] = {"config": cfg, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "load_at_start": os.getloadavg()[0], "machine": f"{os.cpu_count()} CPU cores"}
    data_dir = out / "data"
    init = out / "init"
    adapters = out / "adapters"
    adapter_file = adapters / "adapters.safetensors"
    curve_path = rec / "curve.jsonl"
    if not args.worker:  # the workers find all of this ready
        out.mkdir(parents=True, exist_ok=True)
        rec.mkdir(parents=True, exist_ok=True)
        # the settings (but the workers) and one line in the current format: a change to either
        # remakes the data
        # (the lines' 'pinned' field counts only when corrupt_only_free reads it: a folder
        # without it serves the published objective and is not remade for it)
        line = chat_line("1" + "0" * 80, "1" * 81, pinned=bool(cfg.get("corrupt_only_free", False)))
        stamp = json.dumps(dict(_same_data(cfg["data"]), format=line), sort_keys=True)
        if not (data_dir / "train.jsonl").is_file() or (data_dir / "stamp").read_text() != stamp:
            print("making the training data ...", flush=True)
            record["data"] = write_training_data(data_dir, **cfg["data"])
            (data_dir / "stamp").write_text(stamp)
        write_initial_model(init, seed=int(cfg["seed"]), prompt=prompt, **cfg["model"])
        (out / "config.json").write_text(json.dumps(cfg, indent=1))
        if args.resume:
            mine, theirs = _progress(out), _progress(args.checkpoint)
            if mine is None and theirs is None:
                raise SystemExit(f"error: --resume: neither {out / 'progress.json'} nor "
                                 f"{args.checkpoint / 'progress.json'} exists")
            if mine is None:  # a fresh folder (a clone, another machine): start from the committed checkpoint
                ck = args.checkpoint
                theirs_cfg = json.loads((ck / "config.json").read_text()) if (ck / "config.json").is_file() else {}
                if "data" in theirs_cfg and _same_data(theirs_cfg["data"]) == _same_data(cfg["data"]):
                    theirs_cfg["data"] = cfg["data"]
                for key in ("model", "data"):  # other weights or other data: not a continuation
                    if key in theirs_cfg and theirs_cfg[key] not in (cfg[key], _before_growth(cfg[key])):
                        raise SystemExit(f"error: --resume: {ck / 'config.json'} was trained with {key} "
                                         f"{theirs_cfg[key]}, {args.config} has {cfg[key]}")
                if theirs_cfg and theirs_cfg.get("prompt", "cells") != prompt:
                    raise SystemExit(f"error: --resume: {ck / 'config.json'} was trained with prompt "
                                     f"{theirs_cfg.get('prompt', 'cells')!r}, {args.config} has {prompt!r}")
                adapters.mkdir(parents=True, exist_ok=True)
                weights = mx.load(str(ck / "weights.safetensors"))
                mx.save_safetensors(str(numbered_adapter_file(adapter_file, theirs)), weights)
                if (ck / OPTIMIZER_FILE).is_file():
                    state, meta = mx.load(str(ck / OPTIMIZER_FILE), return_metadata=True)
                    mx.save_safetensors(str(adapters / OPTIMIZER_FILE), state, metadata=meta)
                write_atomic(curve_path, _kept_rows(ck / "curve.jsonl", theirs))
                (out / "progress.json").write_text(json.dumps({"iteration": theirs}))
                print(f"starting from the checkpoint in {ck} (iteration {theirs})", flush=True)
        if processes > 1:
            record["processes"] = processes
            return _launch(argv, processes)
    record["data_seconds"] = round(time.perf_counter() - t_start, 1)
    if args.worker:
        record["processes"] = world.size()

    model, tok = load(init)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    setup_fine_tuning(model, "full")
    backend.configure(model, experts=cfg.get("expert_dispatch", "blocked"))
    # the trainer's adapter folder (full fine-tuning: every trained weight), so that
    # load(init, adapter_path=...) and python -m mlx_dgemma.fuse read it as any other
    if rank == 0:
        save_adapter_config({"fine_tune_type": "full", "num_layers": -1, "model": str(init)}, model,
                            adapters / "adapter_config.json")
    offset, grow = 0, None
    b1, b2 = cfg["betas"]

    def adamw(shift: int = 0):
        return optim.AdamW(learning_rate=schedule(cfg, shift), betas=[b1, b2], weight_decay=float(cfg["weight_decay"]))

    opt = adamw()
    if args.resume:
        offset = _progress(out)
        # The numbered save of that iteration: adapters.safetensors can be newer (Ctrl-C
        # saves it where the run stopped, past the last save progress.json names).
        numbered = numbered_adapter_file(adapter_file, offset)
        weights = numbered if numbered.is_file() else adapter_file
        if not weights.is_file():
            raise SystemExit(f"error: --resume: neither {numbered} nor {adapter_file} exists")
        saved = mx.load(str(weights))
        grow = _growth(saved, cfg["model"], weights)
        model.load_weights(list((grow(saved, "copy") if grow else saved).items()), strict=False)
        opt_file = adapters / OPTIMIZER_FILE
        # Adam's moments and step of that save, if the state file is of this iteration
        exact = opt_file.is_file() and load_optimizer_state(opt, opt_file) == offset
        # Adam's step counts from when its moments began (0 for fresh ones, which warm up
        # again): the schedule goes on shifted by the iterations before that, so a save of a
        # run that began from a checkpoint without them does not read the peak rate again
        counted = int(opt.state["step"].item()) if exact else 0
        if counted != offset:
            state, opt = opt.state, adamw(offset - counted)
            if exact:
                opt.state = state
        if exact and grow:  # the moments of the layers kept move with them; the added layers' start at zero
            opt.state = tree_unflatten(list(grow(dict(tree_flatten(opt.state)), "zeros").items()))
        if grow and rank == 0:
            print(f"grew the save of iteration {offset} from {layer_count(saved)} to "
                  f"{cfg['model']['num_hidden_layers']} layers (recipe.grow_layers)", flush=True)
        if rank == 0:
            print(f"resuming after iteration {offset} ({'with' if exact else 'without'} its optimizer state)",
                  flush=True)
            write_atomic(curve_path, _kept_rows(curve_path, offset))
    elif curve_path.exists() and rank == 0:
        curve_path.unlink()
    average, average_file = None, adapters / AVERAGE_FILE
    decay = float(cfg.get("weight_average_decay", 0.0))
    if decay > 0:
        if args.resume and WeightAverage.iteration_of(average_file) == offset and not grow:
            average = WeightAverage.load(average_file, model, decay)
        else:  # a new average (a fresh run, or a resume from a checkpoint without one): from these weights
            average = WeightAverage(model, decay)
        if rank == 0:
            print(f"weight average (decay {decay}) {'restored' if average.updates else 'started'} "
                  f"at iteration {offset}", flush=True)
    remaining = int(cfg["iters"]) - offset
    if remaining <= 0:
        raise SystemExit(f"error: nothing left to train ({offset} of {cfg['iters']} iterations done)")

    t_data = time.perf_counter()
    train_set = load_examples(data_dir / "train.jsonl", tok, init)  # tokenized once, then from a cache
    val_set = load_examples(data_dir / "valid.jsonl", tok, init)
    puzzles = validation_puzzles(int(cfg["eval_puzzles"]))
    if rank == 0:
        print(f"{n_params} parameters; {len(train_set)} training, {len(val_set)} validation examples "
              f"(loaded in {time.perf_counter() - t_data:.0f} s)", flush=True)

    curve = open(curve_path, "a") if rank == 0 else None
    t_train = time.perf_counter()
    last_eval: Dict[str, Any] = {}

    def log(entry: Dict[str, Any]) -> None:
        if curve is None:
            return
        entry = dict(entry, wall_seconds=round(time.perf_counter() - t_train, 1))
        curve.write(json.dumps(entry) + "\n")
        curve.flush()

    def saved(total: int) -> None:
        # called by the trainer after each save (process 0): progress.json names the last one
        if average is not None:
            average.save(average_file, total)
        (out / "progress.json").write_text(json.dumps({"iteration": total}))

    def solve_eval(it: int, prefix: str = "") -> Dict[str, Any]:
        # every process solves its share of the puzzles (a process alone left the other
        # core idle: two evaluations of 64 took 110-300 s every 200 iterations), with the
        # seeds the whole list would give them (puzzle i: seed i); the counts add up
        t = time.perf_counter()
        lo, hi = rank * len(puzzles) // size, (rank + 1) * len(puzzles) // size
        # one sample a puzzle: the model's own rate, the curve's measure before retries existed
        got = score(puzzles[lo:hi], seed=lo, model=(model, tok), attempts=1)
        if size > 1:
            got = Score.from_counts(mx.distributed.all_sum(mx.array(got.counts()), stream=mx.cpu).tolist())
        e = {f"{prefix}val_solve_rate": got.solved, f"{prefix}val_blank_accuracy": got.blanks_right,
             f"{prefix}val_passes": got.passes, f"{prefix}val_puzzles": got.puzzles,
             f"{prefix}eval_seconds": time.perf_counter() - t}
        if rank == 0:
            print(f"Iter {it}: {'weight average: ' if prefix else ''}solve rate {got.solved:.3f}, "
                  f"blanks right {got.blanks_right:.3f} on {got.puzzles} validation puzzles", flush=True)
        return e

    class Callback(TrainingCallback):
        def on_train_loss_report(self, info):
            it = info["iteration"] + offset
            log(dict(info, iteration=it, examples=it * int(cfg["batch_size"])))
            if it % int(cfg["steps_per_solve_eval"]) == 0 or info["iteration"] == remaining:  # every process
                model.eval()
                with backend.fastest_paths(model):  # the inference kernels; training's paths after
                    e = dict(iteration=it, **solve_eval(it))
                    if average is not None:
                        with average.applied(model):
                            e.update(solve_eval(it, AVERAGE))
                log(e)
                last_eval.update(e)
                model.train()

        def on_val_loss_report(self, info):
            log(dict(info, iteration=info["iteration"] + offset))

    targs = TrainingArgs(
        batch_size=int(cfg["batch_size"]), iters=remaining, val_batches=int(cfg["val_batches"]),
        steps_per_report=int(cfg["steps_per_report"]), steps_per_eval=int(cfg["steps_per_eval"]),
        steps_per_save=int(cfg["steps_per_save"]), adapter_file=str(adapter_file), pad_to=1,
        encoder_loss_weight=float(cfg["encoder_loss_weight"]), self_conditioning_p=float(cfg["self_conditioning_p"]),
        grad_clip=float(cfg["grad_clip"]), seed=int(cfg["seed"]) + offset, start_iteration=offset,
        val_seed=int(cfg["seed"]) + 1,  # new training draws after a resume, the same validation draws
        optimizer_file=str(adapters / OPTIMIZER_FILE),
        corrupt_only_free=bool(cfg.get("corrupt_only_free", False)),
        corrupted_loss_weight=float(cfg.get("corrupted_loss_weight", 1.0)),
        min_corruption_level=float(cfg.get("min_corruption_level", EPS)),
    )
    try:
        train(model, opt, train_set, val_set, targs, training_callback=Callback(), on_save=saved,
              weight_average=average)
    except KeyboardInterrupt:
        if rank == 0:
            print(f"interrupted: --resume continues from the save {out / 'progress.json'} names "
                  f"(iteration {_progress(out)})", file=sys.stderr)
        # a rank's error makes mlx.launch end the other ranks; the process that launched them says 130
        return 0 if args.worker else 130
    if rank != 0:
        return 0
    (out / "progress.json").write_text(json.dumps({"iteration": int(cfg["iters"])}))
    train_seconds = time.perf_counter() - t_train
    prev = json.loads((rec / "record.json").read_text()) if args.resume and (rec / "record.json").is_file() else {}
    record.update(iterations=int(cfg["iters"]), parameters=int(n_params),
                  train_seconds=round(train_seconds + prev.get("train_seconds", 0.0), 1),
                  total_seconds=round(time.perf_counter() - t_start + prev.get("total_seconds", 0.0), 1),
                  load_at_end=os.getloadavg()[0], finished=time.strftime("%Y-%m-%d %H:%M:%S"),
                  runs=prev.get("runs", 0) + 1)
    model.eval()
    # the package ships the model once it solves; a weaker one goes beside the run's weights
    bar = float(cfg.get("ship_solve_rate", 0.8))
    # the weights that solved more at the last evaluation: the average's, or the last step's
    use_average = average is not None and last_eval.get(AVERAGE + "val_solve_rate", -1.0) >= last_eval.get(
        "val_solve_rate", 0.0)
    prefix = AVERAGE if use_average else ""
    solved = last_eval.get(prefix + "val_solve_rate", 0.0)
    dst = args.ship if solved >= bar else out / "model"
    record.update(val_solve_rate=solved, val_blank_accuracy=last_eval.get(prefix + "val_blank_accuracy"),
                  shipped=dst == args.ship, weights="weight average" if use_average else "last step")
    with average.applied(model) if use_average else contextlib.nullcontext():
        write_shipped(model, model_config(**cfg["model"]), dst, model_card(cfg, record), prompt)
    (rec / "record.json").write_text(json.dumps(record, indent=2))
    plot_curve(curve_path, rec / "curve.png")
    print(f"wrote {dst} ({record['train_seconds'] / 60:.1f} min of training); curves in {rec}", flush=True)
    if dst != args.ship:
        print(f"not shipped: it solves {solved:.0%} of the validation puzzles, the bar is {bar:.0%} "
              f"(ship_solve_rate); --resume --iters N trains on", flush=True)
    return 0


def plot_curve(curve_path: Path, png: Path) -> None:
    """Train/validation losses and the validation solve rate against iterations."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in curve_path.read_text().splitlines() if line.strip()]
    tr = [r for r in rows if "train_loss" in r]
    va = [r for r in rows if "val_loss" in r]
    so = [r for r in rows if "val_solve_rate" in r]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("diffusion_loss", "train diffusion"), ("encoder_loss", "train encoder")):
        ax[0].plot([r["iteration"] for r in tr], [r[key] for r in tr], label=label)
    for key, label in (("val_diffusion_loss", "valid diffusion"), ("val_encoder_loss", "valid encoder")):
        ax[0].plot([r["iteration"] for r in va], [r[key] for r in va], "o-", label=label)
    ax[0].set_xlabel("iteration"), ax[0].set_ylabel("cross-entropy"), ax[0].set_yscale("log"), ax[0].legend()
    ax[1].plot([r["iteration"] for r in so], [r["val_solve_rate"] for r in so], "o-", label="puzzles solved")
    ba = [r for r in so if "val_blank_accuracy" in r]
    ax[1].plot([r["iteration"] for r in ba], [r["val_blank_accuracy"] for r in ba], "s-", label="blanks right")
    ax[1].set_xlabel("iteration"), ax[1].set_ylabel("validation puzzles (easy)"), ax[1].set_ylim(0, 1), ax[1].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
