"""Sudoku pilots on small grids: a small DiffusionGemma trained from scratch on 4x4 (2x2
boxes) or 6x6 (2-row x 3-column boxes) Sudoku, with its curve of blanks right and puzzles
solved on fixed held-out puzzles against iterations and examples seen.

    python benchmarks/sudoku/pilot.py --size 4 --iters 600
    python benchmarks/sudoku/pilot.py --size 6 --iters 1500 --name base

A recipe knob shows within minutes on a small grid what it does (issue 19, item 2); the
9x9 runs take hours a point. Everything is the 9x9 recipe at size n (``mlx_dgemma.sudoku.recipe``):
one token per cell and content (``A1.``, ``A13``: rows A.., columns 1..n), the same
specials and chat template, the reply = the n*n digits then ``<turn|>``, a canvas of
n*n + 1 rounded up to a multiple of 8, the cell embeddings built from their digit's and
their row's, column's and box's; the model through the one builder
(``small_model.write_small_model``); training through the project's trainer exactly as
``mlx_dgemma.sudoku.train`` does (full fine-tuning, dense experts, AdamW with warm-up and
cosine: ``train.schedule``); evaluation with the givens, ``<turn|>`` and the fill pinned in
the canvas, as ``sudoku.solve_details`` does. Writes curve.jsonl, results.md and
record.json (the command, the settings, the wall time, the load) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from mlx_dgemma.sudoku import recipe  # noqa: E402
from mlx_dgemma.tuner.draws import EPS  # noqa: E402

BOXES = {4: (2, 2), 6: (2, 3)}  # grid size -> (box rows, box columns)
GIVENS = {4: (4, 8), 6: (8, 16)}  # the givens range of the puzzles, per size
ROWS = "ABCDEF"
TRAIN_SEED, HELDOUT_SEED = 1_000, 9_000
Pair = Tuple[str, str]  # (puzzle with "0" blanks, solution), n*n characters each


# ---------------------------------------------------------------- grids and puzzles

def units(n: int) -> List[List[int]]:
    """The cell indices of every row, column and box."""
    br, bc = BOXES[n]
    rows = [[r * n + c for c in range(n)] for r in range(n)]
    cols = [[r * n + c for r in range(n)] for c in range(n)]
    boxes = [[(r0 + r) * n + c0 + c for r in range(br) for c in range(bc)]
             for r0 in range(0, n, br) for c0 in range(0, n, bc)]
    return rows + cols + boxes


def _peers(n: int) -> List[List[int]]:
    peers = [set() for _ in range(n * n)]
    for u in units(n):
        for i in u:
            peers[i].update(j for j in u if j != i)
    return [sorted(p) for p in peers]


def _search(cells: List[int], n: int, peers, rnd: Optional[random.Random], limit: int, found: List[List[int]]) -> None:
    """Backtracking on the most constrained blank (digits in random order when ``rnd``);
    appends solutions to ``found`` until it holds ``limit``."""
    best, options = -1, None
    for i, v in enumerate(cells):
        if v == 0:
            opts = set(range(1, n + 1)) - {cells[j] for j in peers[i]}
            if options is None or len(opts) < len(options):
                best, options = i, opts
                if not opts:
                    return
    if best < 0:
        found.append(list(cells))
        return
    order = sorted(options)
    if rnd is not None:
        rnd.shuffle(order)
    for d in order:
        cells[best] = d
        _search(cells, n, peers, rnd, limit, found)
        if len(found) >= limit:
            break
    cells[best] = 0


def random_grid(n: int, rnd: random.Random) -> str:
    """A full n x n grid by randomized backtracking."""
    found: List[List[int]] = []
    _search([0] * (n * n), n, _peers(n), rnd, 1, found)
    return "".join(map(str, found[0]))


def count_solutions(puzzle: str, n: int, limit: int = 2) -> int:
    """Solutions of ``puzzle`` ("0" blanks), counted up to ``limit``."""
    found: List[List[int]] = []
    _search([int(c) for c in puzzle], n, _peers(n), None, limit, found)
    return len(found)


def is_solution(puzzle: str, grid: str, n: int) -> bool:
    """``grid`` keeps the givens and holds 1..n once in every unit."""
    if len(grid) != n * n or any(p != "0" and p != g for p, g in zip(puzzle, grid)):
        return False
    digits = set("123456789"[:n])
    return all({grid[i] for i in u} == digits for u in units(n))


def make_puzzle(solution: str, n: int, rnd: random.Random, givens_range: Tuple[int, int]) -> Optional[str]:
    """Cells removed in random order while the solution stays unique, down to a number of
    givens drawn from ``givens_range``; None when the removal gets stuck above its top."""
    lo, hi = givens_range
    target = rnd.randint(lo, hi)
    cells = list(solution)
    order = list(range(n * n))
    rnd.shuffle(order)
    givens = n * n
    for i in order:
        if givens == target:
            break
        keep, cells[i] = cells[i], "0"
        if count_solutions("".join(cells), n) == 1:
            givens -= 1
        else:
            cells[i] = keep
    return "".join(cells) if givens <= hi else None


def make_puzzles(n: int, count: int, seed: int, exclude: Sequence[str] = ()) -> List[Pair]:
    """``count`` distinct unique-solution puzzles of size n (none of ``exclude``)."""
    rnd = random.Random(seed)
    seen, out = set(exclude), []
    while len(out) < count:
        sol = random_grid(n, rnd)
        p = make_puzzle(sol, n, rnd, GIVENS[n])
        if p is not None and p not in seen:
            seen.add(p)
            out.append((p, sol))
    return out


# ---------------------------------------------------------------- tokenizer and model

def cells(n: int) -> List[str]:
    return [f"{r}{c}{x}" for r in ROWS[:n] for c in range(1, n + 1) for x in recipe.BLANK + "123456789"[:n]]


def vocab_size(n: int) -> int:
    """Room for the names, at least 256 and a multiple of 128: as in the 9x9 recipe, a
    uniform noise token is rarely a digit (4/256, 6/384; 9x9: 9/896)."""
    names = len(recipe.SPECIAL) + len(recipe.WORDS) + len(recipe.CHARS) + len(cells(n))
    return max(256, -(-names // 128) * 128)


def vocabulary(n: int) -> Dict[str, int]:
    names = recipe.SPECIAL + recipe.WORDS + recipe.CHARS + cells(n)
    names += [f"<unused{i}>" for i in range(vocab_size(n) - len(names))]
    return {t: i for i, t in enumerate(names)}


def canvas_length(n: int) -> int:
    return -(-(n * n + 1) // 8) * 8


def build_tokenizer(n: int):
    """recipe.build_tokenizer at size n."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = vocabulary(n)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words = "|".join(recipe.WORDS)
    cell = rf"[A-{ROWS[n - 1]}][1-{n}][.1-{n}]"
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(rf"{cell}|{words}|[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in vocab if t.startswith("<")])
    return tok


def write_tokenizer_for(n: int):
    def write(dst: Path) -> None:
        build_tokenizer(n).save(str(Path(dst) / "tokenizer.json"))
        (Path(dst) / "tokenizer_config.json").write_text(json.dumps(dict(
            tokenizer_class="PreTrainedTokenizerFast", bos_token="<bos>", eos_token="<turn|>", pad_token="<pad>",
            unk_token="<unk>", additional_special_tokens=["<eos>", "<|turn>"], model_max_length=512,
            clean_up_tokenization_spaces=False), indent=2))
    return write


def prompt_messages(puzzle: str, n: int, solution: Optional[str] = None) -> List[Dict[str, str]]:
    """recipe.prompt_messages at size n: the user turn is the n*n cell tokens."""
    text = "".join(f"{ROWS[i // n]}{i % n + 1}{recipe.BLANK if x == '0' else x}" for i, x in enumerate(puzzle))
    msgs = [{"role": "user", "content": text}]
    if solution is not None:
        msgs.append({"role": "assistant", "content": solution})
    return msgs


def structured_cell_embeddings(embed, n: int):
    """recipe.structured_cell_embeddings at size n: (2 content + row + column + box) / sqrt(7)."""
    import mlx.core as mx
    import numpy as np

    br, bc = BOXES[n]
    vocab = vocabulary(n)
    E = np.array(embed)
    rng = np.random.default_rng(0)
    unit = rng.normal(0.0, float(E.std()), (3 * n, E.shape[1])).astype(E.dtype)
    for name in cells(n):
        r, c, x = ROWS.index(name[0]), int(name[1]) - 1, name[2]
        box = r // br * (n // bc) + c // bc
        E[vocab[name]] = (2 * E[vocab[x]] + unit[r] + unit[n + c] + unit[2 * n + box]) / 7**0.5
    return mx.array(E)


def write_initial_model(path: Path, n: int, seed: int, size: Dict[str, int], prompt: str = "cells") -> Path:
    """A fresh model folder through the one builder (as recipe.write_initial_model; ``prompt``:
    its chat template's format, recipe.chat_template)."""
    from mlx_dgemma.config import small_model_config
    from mlx_dgemma.small_model import write_small_model

    ids = dict(eos_token_id=[recipe.TURN_CLOSE, recipe.EOS], pad_token_id=recipe.PAD, bos_token_id=recipe.BOS)
    config = small_model_config(vocab_size=vocab_size(n), canvas_length=canvas_length(n), sliding_window=256,
                                max_position_embeddings=512, **size, **ids)
    key = "model.decoder.embed_tokens.weight"
    gen = dict(recipe.GENERATION_CONFIG, max_new_tokens=canvas_length(n))
    return write_small_model(
        path, dict(config, **ids), seed=seed, init=lambda args, p: {**p, key: structured_cell_embeddings(p[key], n)},
        tokenizer=write_tokenizer_for(n), chat_template=recipe.chat_template(prompt), generation_config=gen,
        readme=f"# DiffusionGemma {n}x{n} Sudoku pilot (initial)\n")


# ---------------------------------------------------------------- evaluation

def constraints_for(puzzle: str, n: int, vocab: Dict[str, int]) -> Dict[int, int]:
    """The givens, then <turn|> after the last cell, then the fill (sudoku.constraints_for at size n)."""
    pins = {i: vocab[ch] for i, ch in enumerate(puzzle) if ch != "0"}
    pins[n * n] = recipe.TURN_CLOSE
    pins.update({i: recipe.FILL for i in range(n * n + 1, canvas_length(n))})
    return pins


def evaluate(model, tok, puzzles: Sequence[Pair], n: int, seed: int = 0, batch_size: int = 64) -> Dict[str, float]:
    """Blanks right and puzzles solved, the givens pinned in the canvas (as solve_details)."""
    import numpy as np

    from mlx_dgemma.chat import encode_prompt
    from mlx_dgemma.generate import generate_blocks, generation_defaults, make_settings, resolve_ids

    vocab = vocabulary(n)
    names = {v: k for k, v in vocab.items()}
    digits = set("123456789"[:n])
    settings = make_settings(model, None)
    eos, pad = resolve_ids(model, generation_defaults(model))
    right = blanks = solved = passes = 0
    for start in range(0, len(puzzles), batch_size):
        chunk = puzzles[start:start + batch_size]
        last: List[Any] = []
        block = next(iter(generate_blocks(
            model, [encode_prompt(tok, prompt_messages(p, n)) for p, _ in chunk], settings=settings,
            max_tokens=canvas_length(n), seeds=[seed + start + k for k in range(len(chunk))], eos_token_ids=eos,
            pad_token_id=pad, constraints=[constraints_for(p, n, vocab) for p, _ in chunk],
            on_draft=lambda d: last.__setitem__(slice(None), [np.array(d.tokens)]))))
        # the last draft, not the finalised block: an EOS written in a cell would pad the rest
        for (p, sol), row, ps in zip(chunk, last[0], block.passes):
            grid = "".join(c if c in digits else "0" for c in (names.get(int(t), "") for t in row[:n * n]))
            blank = [i for i, x in enumerate(p) if x == "0"]
            right += sum(grid[i] == sol[i] for i in blank)
            blanks += len(blank)
            solved += is_solution(p, grid, n)
            passes += int(ps)
    return {"blanks_right": right / max(blanks, 1), "solved": solved / len(puzzles), "passes": passes / len(puzzles)}


# ---------------------------------------------------------------- training

def model_size(a: argparse.Namespace) -> Dict[str, int]:
    return dict(hidden_size=a.hidden_size, num_hidden_layers=a.layers, intermediate_size=a.intermediate_size,
                num_attention_heads=a.heads, head_dim=a.head_dim, num_experts=a.experts, top_k_experts=a.top_k,
                moe_intermediate_size=a.moe_intermediate_size)


def run(a: argparse.Namespace, work: Path, log_row) -> Dict[str, Any]:
    """Train and evaluate; ``log_row(dict)`` receives every curve row. Returns the record."""
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.callbacks import TrainingCallback

    from mlx_dgemma import backend, load
    from mlx_dgemma.sudoku.train import schedule
    from mlx_dgemma.tuner import TrainingArgs, setup_fine_tuning, train
    from mlx_dgemma.tuner.datasets import chat_example

    n = a.size
    t0 = time.perf_counter()
    heldout = make_puzzles(n, a.eval_puzzles, HELDOUT_SEED + a.seed)
    train_pairs = make_puzzles(n, a.train_puzzles, TRAIN_SEED + a.seed, exclude=[p for p, _ in heldout])
    assert not {p for p, _ in heldout} & {p for p, _ in train_pairs}
    data_seconds = time.perf_counter() - t0

    model, tok = load(write_initial_model(work / "init", n, a.seed, model_size(a), a.prompt))
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    setup_fine_tuning(model, "full")
    backend.configure(model, experts="blocked")
    examples = [chat_example(tok, prompt_messages(p, n, s), source=f"train:{k}") for k, (p, s) in enumerate(train_pairs)]
    vocab = vocabulary(n)
    for ex, (p, _) in zip(examples, train_pairs):  # what evaluation pins: the givens, <turn|>, the fill
        ex.pinned = tuple(sorted(constraints_for(p, n, vocab)))
    cfg = dict(learning_rate=a.learning_rate, iters=a.iters, warmup_steps=a.warmup, min_lr_ratio=0.05)
    opt = optim.AdamW(learning_rate=schedule(cfg), betas=[0.9, 0.99], weight_decay=1e-4)
    t_train = time.perf_counter()
    evals: List[Dict[str, Any]] = []

    def eval_row(it: int) -> None:
        model.eval()
        t = time.perf_counter()
        e = evaluate(model, tok, heldout, n, seed=a.seed)
        row = {"iteration": it, "examples": it * a.batch_size, **e, "eval_seconds": round(time.perf_counter() - t, 1),
               "wall_seconds": round(time.perf_counter() - t_train, 1)}
        print(f"iter {it}: blanks right {e['blanks_right']:.3f}, solved {e['solved']:.3f} "
              f"of {len(heldout)} held-out puzzles", flush=True)
        log_row(row)
        evals.append(row)
        model.train()

    class Callback(TrainingCallback):
        def on_train_loss_report(self, info):
            it = info["iteration"]
            log_row(dict(info, examples=it * a.batch_size, wall_seconds=round(time.perf_counter() - t_train, 1)))
            if it % a.eval_every == 0 or it == a.iters:
                eval_row(it)

    eval_row(0)
    targs = TrainingArgs(
        batch_size=a.batch_size, iters=a.iters, steps_per_report=math.gcd(10, a.eval_every), steps_per_eval=10**9,
        steps_per_save=10**9, adapter_file=str(work / "adapters" / "adapters.safetensors"), pad_to=1,
        encoder_loss_weight=a.encoder_loss_weight, self_conditioning_p=0.5, grad_clip=1.0, seed=a.seed,
        corrupt_only_free=a.corrupt_only_free, corrupted_loss_weight=a.corrupted_loss_weight,
        min_corruption_level=a.min_corruption_level)
    (work / "adapters").mkdir(parents=True, exist_ok=True)
    train(model, opt, examples, None, targs, training_callback=Callback(), log=lambda *x, **k: None)
    return {"parameters": int(n_params), "train_puzzles": len(train_pairs), "heldout_puzzles": len(heldout),
            "data_seconds": round(data_seconds, 1), "train_seconds": round(time.perf_counter() - t_train, 1),
            "final": evals[-1], "best_solved": max(e["solved"] for e in evals)}


def table(record: Dict[str, Any], rows: List[Dict[str, Any]]) -> str:
    evals = [r for r in rows if "blanks_right" in r]
    loss = {r["iteration"]: r["train_loss"] for r in rows if "train_loss" in r}
    lines = [f"# {record['size']}x{record['size']} Sudoku pilot `{record['name']}`", "",
             f"Command: `{record['command']}`", "",
             f"Model: {json.dumps(record['model'])} ({record['parameters']:,} parameters); batch "
             f"{record['batch_size']}, peak learning rate {record['learning_rate']}, {record['train_puzzles']:,} "
             f"training puzzles, {record['heldout_puzzles']} held-out puzzles ({GIVENS[record['size']][0]}-"
             f"{GIVENS[record['size']][1]} givens). Training {record['train_seconds'] / 60:.1f} min wall "
             f"(evaluations included) at nice {record.get('nice', 'unknown')}, load average "
             f"{record['load_at_start']:.1f} at the start and "
             f"{record['load_at_end']:.1f} at the end. {record['note']}", "",
             "| iteration | examples seen | train loss | blanks right | puzzles solved | passes | wall s |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in evals:
        tl = loss.get(r["iteration"])
        lines.append(f"| {r['iteration']} | {r['examples']:,} | {'' if tl is None else f'{tl:.3f}'} | "
                     f"{r['blanks_right']:.1%} | {r['solved']:.1%} | {r['passes']:.1f} | {r['wall_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, choices=sorted(BOXES), default=4)
    ap.add_argument("--iters", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--learning-rate", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50, help="warm-up iterations before the cosine decay")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-puzzles", type=int, default=128)
    ap.add_argument("--train-puzzles", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corrupt-only-free", action="store_true",
                    help="never corrupt the givens, <turn|> and the fill (TrainingArgs.corrupt_only_free)")
    ap.add_argument("--corrupted-loss-weight", type=float, default=1.0,
                    help="weight of corrupted positions in the diffusion loss (TrainingArgs.corrupted_loss_weight)")
    ap.add_argument("--min-corruption-level", type=float, default=EPS,
                    help="corruption levels uniform over [this, 1) (TrainingArgs.min_corruption_level)")
    ap.add_argument("--encoder-loss-weight", type=float, default=1.0,
                    help="weight of the encoder's next-token loss (TrainingArgs.encoder_loss_weight; 0: not computed)")
    ap.add_argument("--prompt", choices=("cells", "pins"), default="cells",
                    help="the prompt format (recipe.chat_template): the puzzle's cell tokens in the user turn, "
                    "or pins: the user turn empty, the puzzle only in the canvas's pins")
    ap.add_argument("--name", default="base", help="the run's name in the default --out")
    ap.add_argument("--note", default="", help="what else ran on the machine (goes into results.md)")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/sudoku/pilots/<n>x<n>-<name>/")
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--intermediate-size", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--moe-intermediate-size", type=int, default=32)
    a = ap.parse_args(argv)
    for flag in ("iters", "batch_size", "eval_every", "eval_puzzles", "train_puzzles", "hidden_size", "layers",
                 "intermediate_size", "heads", "head_dim", "experts", "top_k", "moe_intermediate_size"):
        if getattr(a, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(a, flag)}")
    if a.top_k > a.experts:
        ap.error(f"--top-k {a.top_k} is more than --experts {a.experts}")
    if not a.corrupted_loss_weight > 0:
        ap.error(f"--corrupted-loss-weight must be positive, got {a.corrupted_loss_weight}")
    if not 0 < a.min_corruption_level < 1:
        ap.error(f"--min-corruption-level must be in (0, 1), got {a.min_corruption_level}")
    if not a.learning_rate > 0 or a.warmup < 0:
        ap.error("--learning-rate must be positive and --warmup at least 0")
    if a.out is None:
        a.out = HERE / "pilots" / f"{a.size}x{a.size}-{a.name}"
    return a


def main(argv: Optional[List[str]] = None) -> int:
    a = parse_args(argv)
    given = list(sys.argv[1:] if argv is None else argv)
    # the command that reproduces the numbers: --note only describes the machine
    kept = [x for k, x in enumerate(given) if not x.startswith("--note") and (k == 0 or given[k - 1] != "--note")]
    command = "python benchmarks/sudoku/pilot.py " + " ".join(map(shlex.quote, kept))
    a.out.mkdir(parents=True, exist_ok=True)
    rows: List[Dict[str, Any]] = []
    part = a.out / "curve.jsonl.part"  # the curve as it comes; renamed when the run completes
    load_start = os.getloadavg()[0]
    with open(part, "w") as f, tempfile.TemporaryDirectory(prefix="sudoku-pilot-") as work:
        def log_row(r):
            rows.append(r)
            f.write(json.dumps(r) + "\n")
            f.flush()

        result = run(a, Path(work), log_row)
    part.replace(a.out / "curve.jsonl")
    record = dict(size=a.size, name=a.name, command=command, model=model_size(a), batch_size=a.batch_size,
                  learning_rate=a.learning_rate, warmup=a.warmup, iters=a.iters, seed=a.seed,
                  corrupt_only_free=a.corrupt_only_free, corrupted_loss_weight=a.corrupted_loss_weight,
                  min_corruption_level=a.min_corruption_level,
                  encoder_loss_weight=a.encoder_loss_weight, prompt=a.prompt, **result,
                  load_at_start=load_start, load_at_end=os.getloadavg()[0], machine=f"{os.cpu_count()} CPU cores",
                  nice=os.nice(0),  # this process's niceness, for the results table
                  note=a.note,
                  finished=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    (a.out / "record.json").write_text(json.dumps(record, indent=1) + "\n")
    (a.out / "results.md").write_text(table(record, rows))
    print(f"wrote {a.out}: solved {result['final']['solved']:.1%}, blanks right {result['final']['blanks_right']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
