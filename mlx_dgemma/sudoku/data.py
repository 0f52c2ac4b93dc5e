"""Training data and the held-out evaluation sets.

    python -m mlx_dgemma.sudoku.data --out DIR [--train N] [--valid N] [--base N]
    python -m mlx_dgemma.sudoku.data --heldout DIR

Training (``train.jsonl`` / ``valid.jsonl`` in the trainer's chat format): the user turn
is a puzzle (81 characters, ``.`` blanks), the reply the 81 digits of its solution; each
line's ``pinned`` lists the reply positions inference pins in the canvas (the givens,
``<turn|>`` after the 81 cells and the fill to the canvas's end), for the trainer's
``corrupt_only_free`` (folders written before it have no ``pinned`` and still load). Base
puzzles come from ``generator.puzzle`` with ``source="search"`` (grids by randomized
search) and ``order="random"`` (single cells removed in random order), easy and medium;
every line is then a random symmetry of a base puzzle (``generator.transform``: relabelled
digits, moved rows, columns, bands and stacks, transposition), so lines almost never
repeat even from a small base set.

Held-out (``heldout_easy.txt`` / ``heldout_medium.txt``, one ``puzzle solution`` pair a
line): ``source="seeded"`` grids (random clues completed by the classical solver),
``order="symmetric"`` removal, other seeds: the training saw neither these grids' source
nor this removal order. Easy = singles alone, 25-35 givens; medium = rated medium by the
human-style solver.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from . import generator
from .rater import EASY, MEDIUM
from .recipe import prompt_messages

Pair = Tuple[str, str]

# (level, givens range); seeds: the held-out sets use their own namespace.
TRAIN_EASY = (EASY, (24, 36))
TRAIN_MEDIUM = (MEDIUM, (22, 32))
HELDOUT_EASY = (EASY, (25, 35))
HELDOUT_MEDIUM = (MEDIUM, (22, 35))
TRAIN_SEED, VALID_SEED, HELDOUT_SEED = 1_000, 2_000, 9_000


def _make(job) -> List[Pair]:
    level, givens_range, source, order, seed, n = job
    rnd = random.Random(seed)
    return list(generator.puzzles(rnd, n, level, givens_range=givens_range, source=source, order=order))


def make_puzzles(level_range, n: int, source: str, order: str, seed: int, workers: int = 1,
                 chunk: int = 50) -> List[Pair]:
    """``n`` puzzles in chunks of ``chunk`` (each chunk seeded ``seed + k``: the result does
    not depend on ``workers``)."""
    level, givens_range = level_range
    jobs = [(level, givens_range, source, order, seed + k, min(chunk, n - k * chunk))
            for k in range((n + chunk - 1) // chunk)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            parts = list(ex.map(_make, jobs))
    else:
        parts = [_make(j) for j in jobs]
    return [p for part in parts for p in part]


def pinned_positions(puzzle: str) -> List[int]:
    """The reply positions ``sudoku.constraints_for`` pins: the givens' cells, then
    ``<turn|>`` (81) and the fill up to the canvas's end."""
    from .recipe import CANVAS_LENGTH

    return [i for i, x in enumerate(puzzle) if x in "123456789"] + list(range(81, CANVAS_LENGTH))


def chat_line(puzzle: str, solution: str, pinned: bool = True) -> str:
    rec: Dict[str, object] = {"messages": prompt_messages(puzzle, solution)}
    if pinned:
        rec["pinned"] = pinned_positions(puzzle)
    return json.dumps(rec)


def augment(base: Sequence[Pair], n: int, seed: int) -> List[Pair]:
    """``n`` pairs, each a random symmetry of a base pair (cycling through the base set)."""
    rnd = random.Random(seed)
    order = list(range(len(base)))
    out = []
    while len(out) < n:
        rnd.shuffle(order)
        for i in order[: n - len(out)]:
            out.append(generator.transform(*base[i], rnd))
    return out


def write_atomic(path: Path, lines: Sequence[str]) -> None:
    """``lines`` into ``path``, never half-written (``tuner.utils.atomic_write``)."""
    from ..tuner.utils import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))


def _examples_key(path: Path, tokenizer_dir: Path) -> str:
    """What a cache of ``path``'s tokenized examples depends on: the file's size and
    modification time, and the tokenizer's files (vocabulary, chat template)."""
    import hashlib

    st = Path(path).stat()
    h = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode())
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        f = Path(tokenizer_dir) / name
        if f.is_file():
            h.update(name.encode() + f.read_bytes())
    return h.hexdigest()


def load_examples(path: Path, tok, tokenizer_dir: Path) -> list:
    """``tuner.datasets.load_split(path, tok)`` through a cache of the tokenized examples
    beside the file (``NAME.examples.npz``, never half-written): applying the chat template
    to 200,000 lines took 80-98 s at every start of the trainer, in each of its processes.
    A cache whose key (``_examples_key``) no longer matches, or that cannot be read, is
    ignored and rewritten."""
    import numpy as np

    from ..tuner.datasets import Example, load_split
    from ..tuner.utils import atomic_write

    path = Path(path)
    key = _examples_key(path, tokenizer_dir)
    cache = path.with_name(path.stem + ".examples.npz")
    try:
        with np.load(cache) as z:
            if str(z["key"]) == key:
                cut = {k: np.split(z[k], z[k + "_ends"][:-1]) for k in ("prompt", "response", "pinned")}
                return [Example(p.tolist(), r.tolist(), f"{path}:{n}", tuple(q.tolist()))
                        for p, r, q, n in zip(cut["prompt"], cut["response"], cut["pinned"], z["line"].tolist())]
    except (OSError, ValueError, KeyError):
        pass  # no cache, another file's, or unreadable: tokenize and write it again
    examples = load_split(path, tok)
    arrays = {"key": np.array(key), "line": np.array([int(e.source.rsplit(":", 1)[1]) for e in examples])}
    for k in ("prompt", "response", "pinned"):
        parts = [list(getattr(e, k)) for e in examples]
        flat = np.array([t for part in parts for t in part], dtype=np.int64)
        arrays[k] = flat.astype(np.int16 if flat.size == 0 or flat.max() < 2**15 else np.int32)  # half the disk
        arrays[k + "_ends"] = np.cumsum([len(part) for part in parts], dtype=np.int64)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    try:
        atomic_write(cache, write)
    except OSError:
        pass  # a read-only data folder: the next start tokenizes again
    return examples


def write_training_data(out: Path, train: int, valid: int, base_easy: int, base_medium: int,
                        medium_share: float = 0.25, workers: int = 1, log=print) -> Dict[str, object]:
    """train.jsonl / valid.jsonl under ``out``; returns what was made (for the record)."""
    t0 = time.perf_counter()
    easy = make_puzzles(TRAIN_EASY, base_easy, "search", "random", TRAIN_SEED, workers)
    log(f"  {len(easy)} easy base puzzles ({time.perf_counter() - t0:.0f} s)")
    t1 = time.perf_counter()
    medium = make_puzzles(TRAIN_MEDIUM, base_medium, "search", "random", TRAIN_SEED + 500_000, workers)
    log(f"  {len(medium)} medium base puzzles ({time.perf_counter() - t1:.0f} s)")
    n_med = int(round(train * medium_share)) if medium else 0
    pairs = augment(easy, train - n_med, TRAIN_SEED) + augment(medium, n_med, TRAIN_SEED + 1)
    random.Random(TRAIN_SEED + 2).shuffle(pairs)
    val = make_puzzles(TRAIN_EASY, valid, "search", "random", VALID_SEED, workers)
    write_atomic(out / "train.jsonl", [chat_line(*p) for p in pairs])
    write_atomic(out / "valid.jsonl", [chat_line(*p) for p in val])
    return dict(train=len(pairs), valid=len(val), base_easy=len(easy), base_medium=len(medium),
                medium_share=medium_share, seconds=round(time.perf_counter() - t0, 1))


def write_heldout(out: Path, easy: int = 300, medium: int = 200, workers: int = 1) -> None:
    for name, lr, n, seed in (("easy", HELDOUT_EASY, easy, HELDOUT_SEED), ("medium", HELDOUT_MEDIUM, medium,
                                                                            HELDOUT_SEED + 500_000)):
        pairs = make_puzzles(lr, n, "seeded", "symmetric", seed, workers)
        write_atomic(out / f"heldout_{name}.txt", [f"{p} {s}" for p, s in pairs])


def read_pairs(path: Path, limit: Optional[int] = None) -> List[Pair]:
    pairs = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            p, s = line.split()
            pairs.append((p, s))
    return pairs[:limit] if limit else pairs


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mlx_dgemma.sudoku.data", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write train.jsonl and valid.jsonl here")
    ap.add_argument("--heldout", type=Path, help="write heldout_easy.txt and heldout_medium.txt here")
    ap.add_argument("--train", type=int, default=100_000)
    ap.add_argument("--valid", type=int, default=256)
    ap.add_argument("--base-easy", type=int, default=2000, help="easy base puzzles (then augmented)")
    ap.add_argument("--base-medium", type=int, default=500, help="medium base puzzles (then augmented)")
    ap.add_argument("--medium-share", type=float, default=0.25, help="share of medium lines in train.jsonl")
    ap.add_argument("--workers", type=int, default=1, help="processes making puzzles")
    args = ap.parse_args(argv)
    if not args.out and not args.heldout:
        ap.error("give --out or --heldout")
    if args.out:
        info = write_training_data(args.out, args.train, args.valid, args.base_easy, args.base_medium,
                                   args.medium_share, args.workers)
        print(json.dumps(info))
    if args.heldout:
        write_heldout(args.heldout, workers=args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
