"""A small DiffusionGemma trained here to solve Sudoku, and the tools around it.

    from mlx_dgemma.sudoku import solve
    solve("53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79")

The model sees the puzzle in its prompt and fills one 88-token canvas (81 cells, the
end-of-turn token, fill) by block diffusion, with the givens pinned in the canvas (canvas
constraints), so it only ever chooses the blanks. ``python -m mlx_dgemma.sudoku PUZZLE``
draws the grid (``--show-drafts``: redrawn at every denoising step).

Modules: ``grid`` (parsing, checks, drawing), ``solver`` (a classical solver), ``rater``
(human-style difficulty), ``generator`` (puzzles), ``recipe`` (tokenizer, template,
architecture), ``data`` (training and held-out sets), ``train`` (the one rebuild command).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

from ..builtin import SUDOKU_MODEL_DIR, builtin_model_path
from .grid import SudokuInputError, blanks_right, draw, givens, is_solution, parse
from .rater import rate

MODEL_DIR = SUDOKU_MODEL_DIR
_LOADED: Dict[str, tuple] = {}


def model_path() -> Path:
    """The shipped model folder (package data)."""
    return builtin_model_path("sudoku")


def load_model(model: Union[str, Path, tuple] = "sudoku"):
    """``(model, tokenizer)``: a loaded pair as is, else loaded once per path and kept."""
    if isinstance(model, tuple):
        return model
    from ..loader import load

    key = str(model)
    if key not in _LOADED:
        _LOADED[key] = load(model)
    return _LOADED[key]


def constraints_for(puzzle: str, tokenizer) -> Dict[int, int]:
    """Canvas constraints of a puzzle: its givens, then ``<turn|>`` after the 81st cell, then
    the fill the training data puts after it."""
    from .recipe import CANVAS_LENGTH, TURN_CLOSE, FILL

    vocab = tokenizer.get_vocab()
    pins = {i: vocab[ch] for i, ch in enumerate(puzzle) if ch in "123456789"}
    pins[81] = TURN_CLOSE
    for i in range(82, CANVAS_LENGTH):
        pins[i] = FILL
    return pins


def _grid_of(tokens: Sequence[int], tokenizer) -> str:
    """The first 81 canvas tokens as a grid; anything but a digit becomes ``0``."""
    names = {v: k for k, v in tokenizer.get_vocab().items()}
    cells = (names.get(int(t), "") for t in tokens[:81])
    return "".join(c if len(c) == 1 and c in "123456789" else "0" for c in cells)


# A grid that keeps the givens and obeys the rules is the puzzle's solution (the held-out
# puzzles have one), and checking it costs nothing next to a canvas: when a sample breaks
# the rules, draw another. Samples differ by their seeds; at iteration 48,000 single
# samples solved 228-244 of the 300 held-out easy puzzles over six seeds, and the first
# four seeds together 268 (benchmarks/sudoku/README.md). Four keep an easy puzzle under a
# second on average here (the shipped model alone: median 0.12 s, mean 0.42 s; a puzzle
# that takes all four draws, up to ~3 s).
DEFAULT_ATTEMPTS = 4
# Attempt ``a`` of puzzle ``i`` uses seed ``seed + i + a * ATTEMPT_SEED_STRIDE``: no list is
# that long, so no attempt repeats another puzzle's seed of the same call.
ATTEMPT_SEED_STRIDE = 1 << 24


class Solved(NamedTuple):
    """One puzzle's outcome (``solve_details``)."""

    grid: str  # the model's 81 cells ("0" where it wrote no digit), of its last attempt
    solved: bool  # every cell right: givens kept, each unit 1-9 once
    passes: int  # decoder passes (denoising steps) the canvas took, all attempts together
    tokens_per_forward: float  # the reference's formula: non-pad canvas tokens / passes (last attempt)
    cells_per_forward: float  # blanks filled / passes (all attempts)
    attempts: int = 1  # canvases drawn: 1, plus one for each sample that broke the rules


def solve_details(
    puzzles: Sequence[str],
    steps: Optional[int] = None,
    seed: int = 0,
    *,
    model: Union[str, Path, tuple] = "sudoku",
    batch_size: int = 64,
    on_draft=None,
    pin: bool = True,
    attempts: int = DEFAULT_ATTEMPTS,
    **sampler,
) -> List[Solved]:
    """:func:`solve` with the counts: one :class:`Solved` per puzzle. ``pin=False`` leaves
    the canvas unconstrained (the puzzle only in the prompt: the reference's own loop).
    ``attempts``: canvases at most per puzzle; a puzzle is drawn again (a new seed) while
    its grid breaks the rules, and 1 gives the model's single sample."""
    grids = [parse(p, what=f"puzzle {k + 1}") for k, p in enumerate(puzzles)]
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        raise SudokuInputError(f"attempts must be an integer >= 1, got {attempts!r}")
    if not grids:
        return []
    from ..chat import encode_prompt
    from ..generate import GenerateInputError, generate_blocks, generation_defaults, make_settings, resolve_ids
    from .recipe import prompt_messages, reads_prompt

    mdl, tok = load_model(model)
    if not pin and not reads_prompt(tok):
        raise SudokuInputError("pin=False: this model reads the puzzle only from the canvas's pins (its chat "
                               "template leaves the user turn empty); solve it with pin=True")
    try:
        settings = make_settings(mdl, None, max_denoising_steps=steps, **sampler)
    except TypeError as e:  # an unknown keyword
        raise GenerateInputError(str(e)) from None
    eos, pad = resolve_ids(mdl, generation_defaults(mdl))
    # encoded once: a retry reuses its puzzle's prompt and pins
    prompt_of = [encode_prompt(tok, prompt_messages(g)) for g in grids]
    pins_of = [constraints_for(g, tok) for g in grids] if pin else None

    def denoise(rows: List[int], attempt: int, shown: List[str], first: int) -> list:
        """One canvas for each puzzle of ``rows`` (indices into ``grids``). ``shown`` holds
        the grids of the batch's puzzles (``grids[first:]``): ``on_draft`` sees all of them,
        a retry's rows redrawn and the others as they ended."""
        prompts = [prompt_of[i] for i in rows]
        pins = [pins_of[i] for i in rows] if pin else None
        seeds = [seed + i + attempt * ATTEMPT_SEED_STRIDE for i in rows]
        last = []  # the final draft: the canvas before the block is finalised

        def show(d):
            import numpy as np

            last[:] = [np.array(d.tokens)]
            if on_draft is not None:
                for i, row in zip(rows, last[0]):
                    shown[i - first] = _grid_of(row, tok)
                on_draft(list(shown), d)

        block = next(iter(generate_blocks(
            mdl, prompts, settings=settings, max_tokens=mdl.args.canvas_length, seeds=seeds, eos_token_ids=eos,
            pad_token_id=pad, constraints=pins, on_draft=show)))
        # Finalising pads everything after the first EOS; with the reply's end pinned, an
        # EOS the model wrote in a cell is just a wrong cell, and the cells after it (givens
        # included) are still what the model wrote: read them from the canvas itself.
        canvases = last[0] if pin else block.tokens
        return [(_grid_of(row, tok), int(passes), float(tpf))
                for row, passes, tpf in zip(canvases, block.passes, block.tokens_per_forward)]

    out: List[Solved] = []
    for first in range(0, len(grids), batch_size):
        rows = list(range(first, min(first + batch_size, len(grids))))
        shown = [grids[i] for i in rows]
        passes = {i: 0 for i in rows}
        done: Dict[int, Solved] = {}
        for attempt in range(attempts):
            rows = [i for i in rows if i not in done]
            if not rows:
                break
            for i, (cells, n, tpf) in zip(rows, denoise(rows, attempt, shown, first)):
                passes[i] += n
                shown[i - first] = cells
                ok = is_solution(grids[i], cells)
                if ok or attempt == attempts - 1:
                    done[i] = Solved(cells, ok, passes[i], tpf, grids[i].count("0") / max(passes[i], 1), attempt + 1)
        out.extend(done[i] for i in sorted(done))
    return out


class Score(NamedTuple):
    """How a model did on (puzzle, solution) pairs (``score``)."""

    solved: float  # the share of puzzles solved
    blanks_right: float  # the share of all their blanks holding the solution's digit
    passes: float  # decoder passes a puzzle, on average
    puzzles: int = 0  # how many puzzles
    blanks: int = 0  # how many blanks they had

    def counts(self) -> List[float]:
        """[solved, blanks right, blanks, passes, puzzles] as sums (what ``from_counts``
        reads back): scores of several shards add up as these."""
        return [self.solved * self.puzzles, self.blanks_right * self.blanks, self.blanks, self.passes * self.puzzles,
                self.puzzles]

    @classmethod
    def from_counts(cls, counts: Sequence[float]) -> "Score":
        solved, right, blanks, passes, puzzles = (round(c) for c in counts)
        return cls(solved / max(puzzles, 1), right / max(blanks, 1), passes / max(puzzles, 1), puzzles, blanks)


def score(pairs: Sequence[tuple], **solve_kwargs) -> Score:
    """:func:`solve_details` over the puzzles of ``pairs`` (``(puzzle, solution)``), scored
    against the solutions; ``solve_kwargs`` go to ``solve_details`` (``model``, ``steps``, ...)."""
    if not pairs:
        return Score(0.0, 0.0, 0.0)
    res = solve_details([p for p, _ in pairs], **solve_kwargs)
    right = [b for (p, s), r in zip(pairs, res) for b in blanks_right(p, r.grid, s)]
    return Score(sum(r.solved for r in res) / len(res), sum(right) / max(len(right), 1),
                 sum(r.passes for r in res) / len(res), len(res), len(right))


def solve(
    puzzles: Union[str, Sequence[str]],
    steps: Optional[int] = None,
    seed: int = 0,
    *,
    model: Union[str, Path, tuple] = "sudoku",
    batch_size: int = 64,
    on_draft=None,
    attempts: int = DEFAULT_ATTEMPTS,
    **sampler,
) -> Union[str, List[str]]:
    """Solve puzzles with the Sudoku model.

    ``puzzles``: one 81-character string (``0`` or ``.`` for blanks; whitespace ignored) or a
    list of them; returns the model's 81-digit grid(s) in the same shape (a cell the model
    left without a digit comes back as ``0``; ``is_solution(puzzle, grid)`` checks a grid).
    ``steps``: denoising steps at most (default: the model's generation_config). ``seed``:
    puzzle ``i`` of the call uses seed ``seed + i``. ``model``: ``"sudoku"`` (the shipped
    model), a folder, or a loaded ``(model, tokenizer)`` pair. ``attempts``: canvases at most
    per puzzle: while a grid breaks the rules the puzzle is drawn again with a new seed
    (default 4; 1 returns the model's first sample). ``sampler``: further
    overrides (``entropy_bound``, ``t_min``, ``t_max``, ``sampler``, ``threshold`` ...).
    ``on_draft(row_grids, draft)`` is called after every denoising step. Puzzles are
    denoised ``batch_size`` at a time.

    Bad input raises :class:`SudokuInputError` with a one-line message (wrong length, a
    character other than 1-9 / 0 / ``.``, givens that break the rules).
    """
    single = isinstance(puzzles, str)
    if single:
        parse(puzzles)  # errors name "puzzle", not "puzzle 1"
    items = [puzzles] if single else list(puzzles)
    res = solve_details(items, steps, seed, model=model, batch_size=batch_size, on_draft=on_draft,
                       attempts=attempts, **sampler)
    grids = [r.grid for r in res]
    return grids[0] if single else grids


__all__ = ["DEFAULT_ATTEMPTS", "MODEL_DIR", "Score", "Solved", "SudokuInputError", "blanks_right", "draw", "givens", "is_solution", "load_model", "model_path",
           "parse", "rate", "score", "solve", "solve_details"]
