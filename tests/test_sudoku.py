"""The Sudoku package: parsing and checks, the classical solver, the human-style rater,
the generators, the data format, the tokenizer and chat template, the command line, and
the shipped model (solve rate on a fixed set of held-out easy puzzles, pinned givens,
load by name)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_dgemma.sudoku import SudokuInputError, generator, grid, rater, recipe, solver
from mlx_dgemma.sudoku.data import chat_line, read_pairs

ROOT = Path(__file__).resolve().parents[1]
HELDOUT_EASY = ROOT / "benchmarks" / "sudoku" / "heldout_easy.txt"
EXAMPLE = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
EXAMPLE_SOLUTION = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"
# Arto Inkala's "world's hardest" puzzle: needs search
HARD = "800000000003600000070090200050007000000045700000100030001000068008500010090000400"


# --- grid ----------------------------------------------------------------------------------


def test_parse_normalises_blanks_and_whitespace():
    g = grid.parse(EXAMPLE)
    assert len(g) == 81 and "." not in g and g.count("0") == EXAMPLE.count(".")
    spaced = "\n".join(EXAMPLE[i:i + 9] for i in range(0, 81, 9))
    assert grid.parse(spaced) == g


@pytest.mark.parametrize("bad, words", [
    ("123", ["3 cells", "expected 81"]),
    (EXAMPLE + "1", ["82 cells"]),
    ("x" + EXAMPLE[1:], ["bad character 'x'", "cell 1"]),
    (EXAMPLE[:40] + "a" + EXAMPLE[41:], ["bad character 'a'", "cell 41"]),
    ("55" + "0" * 79, ["break the rules", "5 appears twice in row 1"]),
    ("5" + "0" * 8 + "5" + "0" * 71, ["column 1"]),
    ("5" + "0" * 9 + "5" + "0" * 70, ["box 1"]),
    (None, ["must be a string"]),
])
def test_parse_errors_are_one_line(bad, words):
    with pytest.raises(SudokuInputError) as e:
        grid.parse(bad)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_is_solution():
    p = grid.parse(EXAMPLE)
    assert grid.is_solution(p, EXAMPLE_SOLUTION)
    swapped = EXAMPLE_SOLUTION[1] + EXAMPLE_SOLUTION[0] + EXAMPLE_SOLUTION[2:]
    assert not grid.is_solution(p, swapped)  # a given changed
    assert not grid.is_solution("0" * 81, EXAMPLE_SOLUTION[:80] + "0")
    bad_col = "123456789" * 9  # rows fine, columns not
    assert not grid.is_solution("0" * 81, bad_col)
    # blanks_right: one entry per blank, givens not counted
    assert grid.blanks_right(p, EXAMPLE_SOLUTION, EXAMPLE_SOLUTION) == [True] * p.count("0")
    two_wrong = EXAMPLE_SOLUTION[:2] + EXAMPLE_SOLUTION[3] + EXAMPLE_SOLUTION[2] + EXAMPLE_SOLUTION[4:]
    assert sum(grid.blanks_right(p, two_wrong, EXAMPLE_SOLUTION)) == p.count("0") - 2  # cells 2, 3 are blanks


# --- solver and rater ----------------------------------------------------------------------------


def test_solver_and_counting():
    assert solver.solve(grid.parse(EXAMPLE)) == EXAMPLE_SOLUTION
    sol = solver.solve(HARD)
    assert grid.is_solution(HARD, sol) and solver.count_solutions(HARD) == 1
    assert solver.count_solutions("0" * 81, limit=5) == 5
    blank_row = "0" * 9 + EXAMPLE_SOLUTION[9:]  # one row missing: still one solution
    assert solver.count_solutions(blank_row) == 1 and solver.solve(blank_row) == EXAMPLE_SOLUTION
    assert solver.solve("11" + "0" * 79) is None


def test_rater_levels():
    assert rater.rate(grid.parse(EXAMPLE)) == ("easy", EXAMPLE_SOLUTION)
    assert rater.rate(HARD) == ("hard", None)
    assert rater.singles_solvable(grid.parse(EXAMPLE)) and not rater.singles_solvable(HARD)


def test_rater_medium_needs_more_than_singles():
    rnd = random.Random(5)
    p, s = generator.puzzle(rnd, "medium", givens_range=(22, 32))
    level, sol = rater.rate(p)
    assert level == "medium" and sol == s and not rater.singles_solvable(p)


# --- generators ------------------------------------------------------------------------------


@pytest.mark.parametrize("source, order", [("search", "random"), ("seeded", "symmetric")])
def test_generated_easy_puzzles(source, order):
    rnd = random.Random(1)
    for p, s in generator.puzzles(rnd, 4, "easy", givens_range=(25, 35), source=source, order=order):
        assert 25 <= grid.givens(p) <= 35
        assert grid.is_solution(p, s) and solver.count_solutions(p) == 1
        assert rater.rate(p) == ("easy", s)
        if order == "symmetric":
            assert all((p[i] == "0") == (p[80 - i] == "0") for i in range(81))


def test_transform_keeps_difficulty_and_validity():
    rnd = random.Random(2)
    p, s = generator.puzzle(rnd, "easy")
    seen = set()
    for _ in range(5):
        p2, s2 = generator.transform(p, s, rnd)
        assert grid.is_solution(p2, s2) and rater.rate(p2) == ("easy", s2) and grid.givens(p2) == grid.givens(p)
        seen.add(p2)
    assert len(seen) == 5


def test_heldout_sets_are_rated_and_unseen_by_training_procedure():
    pairs = read_pairs(HELDOUT_EASY)
    assert len(pairs) >= 100
    for p, s in pairs[:40]:
        assert 25 <= grid.givens(p) <= 35 and rater.rate(p) == ("easy", s)
        assert all((p[i] == "0") == (p[80 - i] == "0") for i in range(81))  # the held-out removal order


# --- data format, tokenizer, template --------------------------------------------------------------


def test_chat_line_tokenizes_to_prompt_and_reply(tmp_path):
    from mlx_lm.tokenizer_utils import load as load_tok

    recipe.write_tokenizer(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(recipe.CHAT_TEMPLATE)
    tok = load_tok(tmp_path)
    msgs = json.loads(chat_line(grid.parse(EXAMPLE), EXAMPLE_SOLUTION))["messages"]
    prompt = tok.apply_chat_template(msgs[:1], add_generation_prompt=True)
    full = tok.apply_chat_template(msgs)
    assert full[: len(prompt)] == prompt and len(prompt) == 89
    assert tok.decode(prompt) == f"<bos><|turn>user\n{recipe.cell_text(EXAMPLE)}<turn|><|turn>model\n"
    assert tok.convert_ids_to_tokens(prompt[4:6]) == ["A15", "A23"]  # one token per cell and its content
    reply = full[len(prompt):]
    assert len(reply) == 82 and reply[-1] == recipe.TURN_CLOSE == tok.eos_token_id
    assert tok.decode(reply[:81]) == EXAMPLE_SOLUTION
    assert recipe.CANVAS_LENGTH >= len(reply) and recipe.CANVAS_LENGTH % 8 == 0
    v = recipe.vocabulary()
    assert len(v) == recipe.VOCAB_SIZE and len(set(v.values())) == recipe.VOCAB_SIZE


def test_training_puzzles_do_not_depend_on_the_worker_count():
    """Each chunk of puzzles has its own seed: a machine with more cores makes the same data
    (what lets a resume on it use a config with more ``data.workers``)."""
    from mlx_dgemma.sudoku.data import TRAIN_EASY, make_puzzles

    one = make_puzzles(TRAIN_EASY, 6, "search", "random", seed=5, workers=1, chunk=2)
    assert len(one) == 6 and one == make_puzzles(TRAIN_EASY, 6, "search", "random", seed=5, workers=3, chunk=2)


def test_tokenized_examples_come_back_from_their_cache(tmp_path):
    """data.load_examples: the first load tokenizes and leaves NAME.examples.npz beside the
    file; the next one reads it back to the same examples (tokens, pins, sources); a changed
    file, or a cache that cannot be read, is tokenized again."""
    import os

    from mlx_lm.tokenizer_utils import load as load_tok

    from mlx_dgemma.sudoku.data import load_examples
    from mlx_dgemma.tuner.datasets import load_split

    recipe.write_tokenizer(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(recipe.CHAT_TEMPLATE)
    tok = load_tok(tmp_path)
    path = tmp_path / "train.jsonl"
    pairs = read_pairs(HELDOUT_EASY, 3)
    path.write_text("".join(chat_line(p, s, pinned=i != 1) + "\n" for i, (p, s) in enumerate(pairs)))
    want = [(e.prompt, e.response, e.pinned, e.source) for e in load_split(path, tok)]
    cache = tmp_path / "train.examples.npz"

    def got():
        return [(e.prompt, e.response, e.pinned, e.source) for e in load_examples(path, tok, tmp_path)]

    assert got() == want and cache.is_file()
    stamp = cache.stat().st_mtime_ns
    assert got() == want and cache.stat().st_mtime_ns == stamp  # read back, not written again
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[::-1]) + "\n")  # another file of the same size: only its time tells
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))
    changed = [(e.prompt, e.response, e.pinned, e.source) for e in load_split(path, tok)]
    assert changed != want and got() == changed
    cache.write_bytes(b"not an npz")
    assert got() == changed


def test_cell_embeddings_start_as_their_digit_and_units():
    """The initial cell-token embeddings read as their digit and share a component within a
    row, column or box (recipe.structured_cell_embeddings)."""
    import mlx.core as mx

    E = mx.random.normal((recipe.VOCAB_SIZE, 1024), key=mx.random.key(0)) / 32
    F = np.array(recipe.structured_cell_embeddings(E))
    v = recipe.vocabulary()

    def cos(a, b):
        a, b = F[v[a]], F[v[b]]
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    assert cos("A15", "5") > 0.65 and abs(cos("A15", "6")) < 0.15
    assert cos("A1.", "B2.") > cos("A1.", "E5.") + 0.08  # one box (and blank) against blank only
    assert np.allclose(F[v["5"]], np.array(E)[v["5"]])  # other tokens untouched
    assert abs(np.linalg.norm(F[v["A15"]]) / np.linalg.norm(F[v["5"]]) - 1) < 0.15


# --- the shipped model ------------------------------------------------------------------------
# A fixed set: the first 64 held-out easy puzzles (another grid source and removal order than
# the training data). SOLVE_FLOOR is set well under the measured rate (benchmarks/sudoku) and
# far above what a broken drafter or loss gives (an untrained model solves none).

FIXED = 64
SOLVE_FLOOR = 0.75


@pytest.fixture(scope="module")
def shipped():
    from mlx_dgemma.sudoku import MODEL_DIR, load_model

    if not (MODEL_DIR / "config.json").is_file():
        # a skip, not a pass: the model is rebuilt by `python -m mlx_dgemma.sudoku.train`
        # (hours on a 2-core CPU); it ships once it meets SOLVE_FLOOR (issue 10)
        pytest.skip(f"{MODEL_DIR}: the trained Sudoku model is not in this checkout yet")
    return load_model("sudoku")


@pytest.fixture(scope="module")
def initial_dir(tmp_path_factory):
    """The recipe's untrained model folder: what pinning and the export must handle whatever
    the weights are."""
    return recipe.write_initial_model(tmp_path_factory.mktemp("sudoku-init"), seed=0)


@pytest.fixture(scope="module")
def initial(initial_dir):
    from mlx_dgemma.sudoku import load_model

    return load_model(initial_dir)


def test_an_end_of_turn_written_in_a_cell_keeps_the_cells_after_it(initial, monkeypatch):
    """The model writing <turn|> (an EOS id) into a blank cell must not blank the rest of the
    grid: the givens after it come back, and the puzzle is simply not solved."""
    from mlx_dgemma import Model
    from mlx_dgemma.sudoku import solve_details

    puzzle = read_pairs(HELDOUT_EASY, 1)[0][0]
    cell = puzzle.index("0")  # the first blank
    assert any(ch != "0" for ch in puzzle[cell + 1 :])
    denoise = Model.denoise

    def eos_in_cell(self, *a, **kw):
        logits = denoise(self, *a, **kw)
        bump = mx.zeros(logits.shape[1:]).at[cell, recipe.TURN_CLOSE].add(1e4)
        return logits + bump

    monkeypatch.setattr(Model, "denoise", eos_in_cell)
    (res,) = solve_details([puzzle], steps=4, model=initial)
    assert res.grid[cell] == "0" and not res.solved
    assert all(p == "0" or p == g for p, g in zip(puzzle, res.grid))  # every given, before and after


def test_solve_rate_on_fixed_easy_heldout_set(shipped):
    from mlx_dgemma.sudoku import solve_details

    pairs = read_pairs(HELDOUT_EASY, FIXED)
    res = solve_details([p for p, _ in pairs], model=shipped)
    rate = sum(r.solved for r in res) / len(res)
    assert rate >= SOLVE_FLOOR, f"solved {rate:.1%} of {len(res)} held-out easy puzzles"
    for (p, s), r in zip(pairs, res):
        if r.solved:
            assert r.grid == s  # a unique solution: solved means equal
    # One by one, the puzzles are solved as in the batch. Not "the same grids": BLAS rounds
    # a batch of one differently, which may flip a near tie (tests/test_server.py's
    # order_free_arithmetic says more); per-row seeds are checked exactly in test_generate.
    from mlx_dgemma.sudoku import is_solution, solve

    few = [p for p, _ in pairs[:8]]
    alone = solve(few, batch_size=1, model=shipped)
    assert sum(is_solution(p, g) for p, g in zip(few, alone)) >= sum(r.solved for r in res[:8]) - 1


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 24, 48])
def test_givens_hold_under_every_step_budget(initial, steps):
    """Every canvas the drafter shows (each denoising step) keeps every given, whatever the
    weights (here untrained ones, whose drafts are far from a solution)."""
    from mlx_dgemma.sudoku import solve_details

    pairs = read_pairs(HELDOUT_EASY, 8)
    puzzles = [p for p, _ in pairs]
    for sampler in ({}, {"sampler": "confidence", "threshold": 0.9}):
        drafts = []
        # two attempts: an untrained model's grids break the rules, so each puzzle is drawn
        # twice, and the retry's drafts still come one grid per puzzle of the batch
        res = solve_details(puzzles, steps=steps, model=initial, on_draft=lambda grids, d: drafts.append(grids),
                            attempts=2, **sampler)
        assert 2 <= len(drafts) <= 2 * steps
        for grids in drafts:
            assert len(grids) == len(puzzles)
            for p, g in zip(puzzles, grids):
                assert all(a == "0" or a == b for a, b in zip(p, g)), (steps, sampler)
        assert all(r.attempts == 2 and 2 <= r.passes <= 2 * steps for r in res)


def test_a_grid_that_breaks_the_rules_is_drawn_again_with_the_next_seed(initial, monkeypatch):
    """``attempts``: a puzzle whose grid breaks the rules is drawn again, with seed ``seed + i +
    a * ATTEMPT_SEED_STRIDE`` on attempt ``a``; a solved one is not; passes add up over the
    attempts; the last attempt's grid is the one returned. (Here "solved" is puzzle 0 alone,
    by a stand-in rule check, since the untrained model solves nothing.)"""
    import mlx_dgemma.sudoku as sudoku
    from mlx_dgemma.sudoku import ATTEMPT_SEED_STRIDE, SudokuInputError, solve_details

    puzzles = [p for p, _ in read_pairs(HELDOUT_EASY, 3)]
    first = solve_details(puzzles, steps=3, model=initial, batch_size=1, attempts=1)
    monkeypatch.setattr(sudoku, "is_solution", lambda puzzle, grid: puzzle == puzzles[0])
    res = solve_details(puzzles, steps=3, model=initial, batch_size=1, attempts=3)
    assert [r.attempts for r in res] == [1, 3, 3] and [r.solved for r in res] == [True, False, False]
    assert res[0].grid == first[0].grid and res[0].passes == first[0].passes
    third = solve_details([puzzles[2]], steps=3, seed=2 + 2 * ATTEMPT_SEED_STRIDE, model=initial, attempts=1)[0]
    assert res[2].grid == third.grid  # the last attempt, with its own seed
    assert res[2].passes > third.passes and res[2].cells_per_forward == puzzles[2].count("0") / res[2].passes
    for bad in (0, 1.5, True):
        with pytest.raises(SudokuInputError, match="attempts must be an integer >= 1"):
            solve_details(puzzles, model=initial, attempts=bad)


def test_scores_of_shards_add_up_to_the_whole(tmp_path, initial):
    """``score`` counts what it averages: the shards of a list, each solved with the seeds the
    whole list gives its puzzles (puzzle i: seed i), merge through ``Score.counts`` into the
    whole list's score (the trainer's evaluation, split over its processes). One puzzle a
    batch, so that no shard changes another's arithmetic; the run's checkpoint in the tree
    as the model, since an untrained one gets no blank right."""
    import json

    import mlx.core as mx

    from mlx_dgemma import load
    from mlx_dgemma.sudoku import Score, score
    from mlx_dgemma.sudoku.train import CHECKPOINT

    cfg = json.loads((CHECKPOINT / "config.json").read_text())
    model, tok = load(recipe.write_initial_model(tmp_path / "m", **cfg["model"]))
    model.load_weights(list(mx.load(str(CHECKPOINT / "weights.safetensors")).items()), strict=False)
    pairs = read_pairs(HELDOUT_EASY, 5)
    one = dict(steps=6, model=(model, tok), batch_size=1, attempts=1)  # one sample a puzzle, as the trainer scores
    whole = score(pairs, **one)
    parts = [score(pairs[:2], seed=0, **one), score(pairs[2:], seed=2, **one)]
    merged = Score.from_counts([sum(c) for c in zip(*(p.counts() for p in parts))])
    assert (merged.puzzles, merged.blanks) == (whole.puzzles, whole.blanks) == (5, sum(p.count("0") for p, _ in pairs))
    assert merged == pytest.approx(whole)
    assert 0 < whole.blanks_right < 1  # some blanks right, not all
    assert score([], model=initial) == Score(0.0, 0.0, 0.0, 0, 0)


def test_unpinned_model_reads_the_prompt(shipped):
    """Without pins the puzzle reaches the model only through the prompt: it must still
    solve most easy puzzles (transformers' generate sees the same)."""
    from mlx_dgemma.sudoku import solve_details

    pairs = read_pairs(HELDOUT_EASY, 16)
    res = solve_details([p for p, _ in pairs], model=shipped, pin=False)
    assert sum(r.solved for r in res) >= 8


def test_load_and_generate_by_name(shipped):
    import mlx_dgemma
    from mlx_dgemma.generate import generate

    model, tok = mlx_dgemma.load("sudoku")
    assert model.args.canvas_length == recipe.CANVAS_LENGTH and model.args.vocab_size == recipe.VOCAB_SIZE
    # the plain text path: the puzzle in the model's prompt format (a token per cell), no pins
    text = generate(model, tok, recipe.cell_text(EXAMPLE), max_tokens=88)
    assert len(text) == 81 and set(text) <= set("123456789")
    assert all(p in ".0" or p == t for p, t in zip(EXAMPLE, text))  # the givens, read from the prompt


def run_cli(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "mlx_dgemma.sudoku", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_solves_and_draws(shipped):
    """The README's first command: no puzzle given, the default one (EXAMPLE) is solved."""
    from mlx_dgemma.sudoku.__main__ import EXAMPLE as DEFAULT

    assert DEFAULT == EXAMPLE
    r = run_cli()
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("------+-------+------") == 4  # the puzzle and the solution
    assert "solved" in r.stderr and "NOT" not in r.stderr
    last = r.stdout.strip().splitlines()[-11:]
    digits = "".join(ch for line in last for ch in line if ch.isdigit())
    assert digits == EXAMPLE_SOLUTION


def test_cli_draws_again_while_the_grid_breaks_the_rules(initial_dir):
    r = run_cli(EXAMPLE, "--model", str(initial_dir), "--attempts", "2", "--steps", "2")
    assert r.returncode == 1 and "NOT solved" in r.stderr and "2 samples (every one broke the rules)" in r.stderr
    r = run_cli(EXAMPLE, "--attempts", "0")
    assert r.returncode == 2 and r.stderr == "error: --attempts must be >= 1, got 0\n"


@pytest.mark.parametrize("arg, word", [("123", "expected 81"), ("x" * 81, "bad character"),
                                       ("55" + "0" * 79, "break the rules")])
def test_cli_bad_input_one_line(arg, word):
    r = run_cli(arg)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and word in r.stderr and r.stderr.startswith("error:")


def test_exported_model_loads_in_transformers(initial_dir, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaForBlockDiffusion

    from mlx_dgemma.fuse import fuse

    out = fuse(initial_dir, None, tmp_path / "hf", export_hf=True, hf_dtype="float32", log=lambda m: None)
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.canvas_length == recipe.CANVAS_LENGTH
    assert sum(p.numel() for p in hf.parameters()) > 1e6


# --- the rebuild command ----------------------------------------------------------------------


def _tiny_recipe():
    from mlx_dgemma.sudoku.train import CONFIG, read_config

    cfg = read_config(CONFIG)
    cfg.pop("restarts", None)  # run 3's second cycle, at an iteration a tiny run never reaches
    cfg.update(iters=4, batch_size=2, warmup_steps=2, steps_per_report=1, steps_per_eval=2, val_batches=1,
               steps_per_save=2, steps_per_solve_eval=2, eval_puzzles=2, processes=1,
               model=dict(hidden_size=32, num_hidden_layers=2, intermediate_size=32, num_attention_heads=2,
                          head_dim=16, num_experts=2, top_k_experts=1, moe_intermediate_size=16),
               data=dict(train=16, valid=2, base_easy=4, base_medium=1, medium_share=0.25, workers=1))
    return cfg


TINY_RECIPE = _tiny_recipe()


def test_train_command_runs_resumes_and_ships(tmp_path):
    """`python -m mlx_dgemma.sudoku.train` end to end on a tiny recipe: data, training with
    the solve-rate evaluations, a stop, --resume (the curve keeps only the training that
    was kept, the rate warms up again), the shipped folder loads and solves by name."""
    import json

    import yaml

    from mlx_dgemma import load
    from mlx_dgemma.sudoku import solve_details
    from mlx_dgemma.sudoku.train import CONFIG, main, read_config, schedule
    from mlx_dgemma.tuner import WeightAverage, setup_fine_tuning

    cfg = dict(TINY_RECIPE)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    args = ["-c", str(tmp_path / "train.yaml"), "--out", str(tmp_path / "work"), "--ship", str(tmp_path / "ship"),
            "--record", str(tmp_path / "record"), "--checkpoint", str(tmp_path / "no-checkpoint")]
    assert main(args) == 0
    curve = [json.loads(r) for r in (tmp_path / "record" / "curve.jsonl").read_text().splitlines()]
    evals = [r for r in curve if "val_solve_rate" in r]
    assert [r["iteration"] for r in evals] == [2, 4] and all(0 <= r["val_blank_accuracy"] <= 1 for r in evals)
    # the weight average (train.yaml's weight_average_decay) is scored beside the weights and saved with them
    assert TINY_RECIPE["weight_average_decay"] > 0 and all(0 <= r["average_val_blank_accuracy"] <= 1 for r in evals)
    average = tmp_path / "work" / "adapters" / "average.safetensors"
    model = setup_fine_tuning(load(tmp_path / "work" / "init")[0], "full")  # what trains: all but the router
    assert WeightAverage.iteration_of(average) == 4 and WeightAverage.load(average, model).updates == 4
    # an untrained model is under the bar: written beside the run's weights, not shipped
    assert not (tmp_path / "ship").exists() and (tmp_path / "work" / "model" / "config.json").is_file()
    assert json.loads((tmp_path / "record" / "record.json").read_text())["shipped"] is False
    cfg["ship_solve_rate"] = 0.0  # now ship whatever it does
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    # a stop after iteration 2's save: resume, to 6 iterations. The weights are iteration
    # 2's numbered save, not adapters.safetensors (newer after a Ctrl-C; here torn).
    (tmp_path / "work" / "progress.json").write_text(json.dumps({"iteration": 2}))
    adapters = tmp_path / "work" / "adapters"
    (adapters / "adapters.safetensors").write_bytes(b"torn")
    with open(tmp_path / "record" / "curve.jsonl", "a") as f:
        f.write('{"iteration": 5, "train_lo')  # a run killed mid-write
    assert main(args + ["--resume", "--iters", "6"]) == 0
    its = [r["iteration"] for r in map(json.loads, (tmp_path / "record" / "curve.jsonl").read_text().splitlines())
           if "train_loss" in r]
    assert its == [1, 2, 3, 4, 5, 6]  # the discarded 3 and 4 of the first run are gone
    # numbered saves are named by the total: the resumed run's 4 and 6, not its own 2 and 4
    assert sorted(f.name[:7] for f in adapters.glob("0*_adapters.safetensors")) == ["0000002", "0000004", "0000006"]
    record = json.loads((tmp_path / "record" / "record.json").read_text())
    assert record["iterations"] == 6 and record["runs"] == 2 and record["shipped"] is True
    assert record["weights"] in ("weight average", "last step")
    # the average saved at 4 did not belong to the save resumed from (2): a new one, of 4 updates;
    # a resume from its own save (6) restores it and goes on
    assert WeightAverage.load(average, model).updates == 4
    assert main(args + ["--resume", "--iters", "7"]) == 0
    assert WeightAverage.iteration_of(average) == 7 and WeightAverage.load(average, model).updates == 5
    # that resume kept Adam's state of 6, whose step counts from the resume at 2 (4 updates):
    # the rate of 7 is still the uninterrupted curve's, not the one of its 5th step
    rate = {r["iteration"]: r["learning_rate"] for r in map(json.loads, (tmp_path / "record" / "curve.jsonl")
                                                           .read_text().splitlines()) if "train_loss" in r}
    whole = schedule(dict(cfg, iters=7), 0)
    assert rate[7] == pytest.approx(whole(6).item(), rel=1e-6) and whole(6).item() != pytest.approx(whole(4).item())
    res = solve_details([EXAMPLE], model=str(tmp_path / "ship"))
    assert len(res[0].grid) == 81 and set(res[0].grid) <= set("0123456789") and res[0].passes >= 1
    # the resumed rate starts low again and rejoins the curve
    cfg["iters"] = 6
    resumed, fresh = schedule(cfg, 2), schedule(cfg, 0)
    assert resumed(0).item() == pytest.approx(fresh(2).item() / cfg["warmup_steps"], rel=1e-6)
    assert resumed(2).item() == pytest.approx(fresh(4).item(), rel=1e-6)


def test_a_warm_restart_lengthens_the_schedule_without_changing_its_past(tmp_path):
    """train.yaml's ``restarts``: the rates before a restart are the ended schedule's, then
    the rate warms up again to the restart's peak and decays by cosine to ``min_lr_ratio`` of
    it at ``iters``; a resume inside the new cycle rejoins it; bad restarts stop the command
    in one line naming the config."""
    import yaml

    from mlx_dgemma.sudoku.train import main, schedule

    ended = dict(TINY_RECIPE, iters=100, warmup_steps=10, learning_rate=1e-3, min_lr_ratio=0.05)
    longer = dict(ended, iters=160, restarts=[{"at": 100, "learning_rate": 2e-4}])
    old, new = schedule(ended), schedule(longer)
    for step in (0, 5, 10, 50, 99):
        assert new(step).item() == old(step).item()
    assert new(100).item() == pytest.approx(2e-6) and new(110).item() == pytest.approx(2e-4)
    assert new(160).item() == pytest.approx(1e-5, rel=1e-4)  # 5% of the restart's peak at iters
    assert max(new(s).item() for s in range(110, 160)) == pytest.approx(2e-4)
    resumed = schedule(longer, 130)  # fresh moments warm up again, then the same cycle
    assert resumed(20).item() == pytest.approx(new(150).item(), rel=1e-6)
    cfg_path = tmp_path / "train.yaml"
    args = ["-c", str(cfg_path), "--out", str(tmp_path / "work")]
    for bad, words in (([{"at": 300, "learning_rate": 1e-4}], "before iters"),
                       ([{"at": 2, "learning_rate": 1e-4}], "after the last cycle's warm-up"),
                       ([{"at": 4, "learning_rate": 0}], "positive learning_rate"),
                       ([{"when": 4}], "must be {at: ITERATION, learning_rate: RATE}")):
        cfg_path.write_text(yaml.safe_dump(dict(TINY_RECIPE, iters=8, restarts=bad)))
        with pytest.raises(SystemExit, match="train.yaml: restarts\\[0\\]") as e:
            main(args)
        assert words in str(e.value) and "\n" not in str(e.value)


def test_checkpoint_in_the_tree_resumes_a_fresh_folder_in_two_processes(tmp_path, monkeypatch):
    """--export-checkpoint writes the last save (weights, optimizer state, curve) where a
    fresh clone's --resume finds it; that resume (an empty --out, here in two ring
    processes) continues the run exactly: its learning rate is the uninterrupted run's,
    not a new warm-up, its validation draws are too, and the curve carries on."""
    import json

    import yaml

    from mlx_dgemma.sudoku.train import CHECKPOINT, main

    assert CHECKPOINT.parent == ROOT / "benchmarks" / "sudoku"  # inside the tree: a clone has it
    cfg_path = tmp_path / "train.yaml"
    import mlx_dgemma.tuner as tuner

    seen, real = [], tuner.train
    monkeypatch.setattr(tuner, "train", lambda *a, **k: (seen.append(a[4]), real(*a, **k))[1])
    cfg = dict(TINY_RECIPE, iters=6, seed=0)
    cfg_path.write_text(yaml.safe_dump(cfg))
    common = ["-c", str(cfg_path), "--ship", str(tmp_path / "ship")]
    ck = tmp_path / "clone" / "checkpoint"
    first = common + ["--out", str(tmp_path / "a"), "--record", str(tmp_path / "ra"), "--checkpoint", str(ck)]
    assert main(first + ["--iters", "4"]) == 0
    assert main(first + ["--export-checkpoint"]) == 0
    assert sorted(f.name for f in ck.iterdir()) == ["config.json", "curve.jsonl", "optimizer.safetensors",
                                                     "progress.json", "weights.safetensors"]
    assert json.loads((ck / "progress.json").read_text()) == {"iteration": 4}
    assert sum(f.stat().st_size for f in ck.iterdir()) < 20e6
    # over the budget, the optimizer state stays out (a resume then warms fresh moments up)
    from mlx_dgemma.sudoku.train import export_checkpoint

    lean = export_checkpoint(tmp_path / "a", tmp_path / "ra", tmp_path / "lean", budget=1)
    assert sorted(f.name for f in lean.iterdir()) == ["config.json", "curve.jsonl", "progress.json",
                                                      "weights.safetensors"]
    # a checkpoint of another model is refused, in one line
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(dict(cfg, model=dict(cfg["model"], hidden_size=64))))
    with pytest.raises(SystemExit, match=r"^error: --resume: .*config.json was trained with model"):
        main(["-c", str(other), "--out", str(tmp_path / "x"), "--record", str(tmp_path / "rx"), "--checkpoint", str(ck),
              "--resume"])
    # a fresh folder: everything comes from the checkpoint (the data made by more workers is
    # the same data: a config that changes only that resumes)
    cfg_path.write_text(yaml.safe_dump(dict(cfg, data=dict(cfg["data"], workers=3))))
    fresh = common + ["--out", str(tmp_path / "b"), "--record", str(tmp_path / "rb"), "--checkpoint", str(ck)]
    assert main(fresh + ["--resume", "--processes", "2"]) == 0
    cfg_path.write_text(yaml.safe_dump(cfg))
    rows = [json.loads(r) for r in (tmp_path / "rb" / "curve.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "train_loss" in r] == [1, 2, 3, 4, 5, 6]
    # the two processes solved a puzzle each, and the curve counts both
    assert [r["val_puzzles"] for r in rows if r.get("iteration", 0) > 4 and "val_puzzles" in r] == [2]
    assert json.loads((tmp_path / "b" / "progress.json").read_text()) == {"iteration": 6}
    # the uninterrupted run's rates at 5 and 6
    whole = common + ["--out", str(tmp_path / "c"), "--record", str(tmp_path / "rc"), "--checkpoint", str(ck)]
    assert main(whole) == 0
    ref = {r["iteration"]: r["learning_rate"] for r in map(json.loads, (tmp_path / "rc" / "curve.jsonl")
                                                           .read_text().splitlines()) if "train_loss" in r}
    got = {r["iteration"]: r["learning_rate"] for r in rows if "train_loss" in r}
    assert got[5] == pytest.approx(ref[5], rel=1e-6) and got[6] == pytest.approx(ref[6], rel=1e-6)
    # a resume reseeds its training draws, not its validation draws (see
    # test_tuner_train.py::test_validation_draws_follow_val_seed; one process, so that the
    # spy sees its arguments)
    assert main(common + ["--out", str(tmp_path / "d"), "--record", str(tmp_path / "rd"), "--checkpoint", str(ck),
                          "--resume", "--processes", "1"]) == 0
    assert [(a.seed, a.val_seed) for a in seen] == [(0, 1), (0, 1), (4, 1)]


def _processes_naming(path: Path) -> list:
    """The processes whose command line names ``path`` (Linux's /proc)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if str(path).encode() in (d / "cmdline").read_bytes():
                    found.append(int(d.name))
            except OSError:  # ended meanwhile
                pass
    return found


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_a_signal_to_the_command_stops_its_two_processes_after_one_step_with_a_save(tmp_path, sig):
    """A SIGTERM (or the SIGHUP of a closed terminal) to `python -m mlx_dgemma.sudoku.train`
    training in two ring processes, started as a background job is (SIGINT ignored): the
    command relays it, both ranks stop after the same step, rank 0 saves that step and
    progress.json names it, every process of the run ends and the command exits with 130."""
    import signal

    import yaml

    if not Path("/proc/self/cmdline").exists():
        pytest.skip("finds the run's processes in /proc (Linux)")
    cfg = dict(TINY_RECIPE, iters=1_000_000, steps_per_eval=1_000_000, steps_per_solve_eval=1_000_000,
               steps_per_report=1, processes=2)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "work"
    cmd = [sys.executable, "-m", "mlx_dgemma.sudoku.train", "-c", str(tmp_path / "train.yaml"), "--out", str(out),
           "--ship", str(tmp_path / "ship"), "--record", str(tmp_path / "record"),
           "--checkpoint", str(tmp_path / "no-checkpoint")]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    def as_a_background_job():  # SIGINT ignored; SIGHUP as a terminal leaves it (not as nohup, or CI, may)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=as_a_background_job)
    try:
        deadline = time.monotonic() + 300
        while not (out / "progress.json").is_file():  # the first save (iteration 2): the ranks train
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or never saved"
            time.sleep(0.2)
        proc.send_signal(getattr(signal, sig))
        text, _ = proc.communicate(timeout=180)
    finally:
        left = _processes_naming(out)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        proc.kill()
    assert left == [], "processes of the run outlived it"
    assert proc.returncode == 130, text
    stopped = json.loads((out / "progress.json").read_text())["iteration"]
    assert stopped >= 2 and f"Stopped after iteration {stopped} (SIGINT)" in text, text
    assert (out / "adapters" / f"{stopped:07d}_adapters.safetensors").is_file()
    trained = [int(line.split(":")[0][5:]) for line in text.splitlines() if line.startswith("Iter ")
               and "Train loss" in line]
    assert max(trained) <= stopped and "Traceback" not in text, text


def test_train_yaml_knobs_reach_the_trainer(tmp_path, monkeypatch):
    """train.yaml's corrupt_only_free (on: the 4x4 pilots' pick), corrupted_loss_weight (1) and
    min_corruption_level (0.8: the 6x6 pilots' pick; absent: the published 1e-3) reach
    TrainingArgs, and switching corrupt_only_free on remakes a data folder whose lines
    carry the pins (a folder made with it off serves the published objective as it is)."""
    import json

    import yaml

    import mlx_dgemma.tuner as tuner
    from mlx_dgemma.sudoku.train import CONFIG, main, read_config

    recipe = read_config(CONFIG)
    knobs = ("corrupt_only_free", "corrupted_loss_weight", "min_corruption_level")
    assert tuple(recipe[k] for k in knobs) == (True, 1.0, 0.8)
    seen = []
    real = tuner.train
    def spy(model, opt, tr, va, args, **kw):
        seen.append((args, tr))
        return real(model, opt, tr, va, args, **kw)

    monkeypatch.setattr(tuner, "train", spy)
    cfg_path = tmp_path / "train.yaml"
    args = ["-c", str(cfg_path), "--out", str(tmp_path / "work"), "--ship", str(tmp_path / "ship"),
            "--record", str(tmp_path / "record"), "--checkpoint", str(tmp_path / "no-checkpoint")]
    stamp = tmp_path / "work" / "data" / "stamp"
    for on in (False, True):
        cfg = dict(TINY_RECIPE, iters=2, steps_per_solve_eval=2, corrupt_only_free=on,
                   corrupted_loss_weight=4.0 if on else 1.0, min_corruption_level=0.5)
        if not on:
            del cfg["min_corruption_level"]  # absent: the published levels
        cfg_path.write_text(yaml.safe_dump(cfg))
        assert main(args) == 0
        targs, train_set = seen[-1]
        assert (targs.corrupt_only_free, targs.corrupted_loss_weight, targs.min_corruption_level) == (
            (True, 4.0, 0.5) if on else (False, 1.0, 1e-3))
        assert ('pinned' in stamp.read_text()) == on
        assert all(len(ex.pinned) >= 22 + 7 for ex in train_set)  # the writer always writes the pins


def test_pin_only_prompt_trains_ships_and_solves_from_the_pins(tmp_path, monkeypatch):
    """train.yaml's ``prompt: pins`` (the issue's pin-only prompt): the folders' chat template
    leaves the user turn empty, so the trainer's examples are 8 + 82 tokens with the same
    reply and pins; the shipped folder says so (``reads_prompt``), solves with the pins and
    refuses ``pin=False`` in one line; a bad value and a checkpoint of the other format stop
    the command with one line naming them."""
    import yaml

    import mlx_dgemma.tuner as tuner
    from mlx_dgemma.sudoku import load_model, solve_details
    from mlx_dgemma.sudoku.train import main

    with pytest.raises(ValueError, match="prompt must be one of"):
        recipe.chat_template("digits")
    seen = []
    real = tuner.train

    def spy(model, opt, tr, va, args, **kw):
        seen.append(tr)
        return real(model, opt, tr, va, args, **kw)

    monkeypatch.setattr(tuner, "train", spy)
    cfg_path = tmp_path / "train.yaml"
    args = ["-c", str(cfg_path), "--out", str(tmp_path / "work"), "--ship", str(tmp_path / "ship"),
            "--record", str(tmp_path / "record"), "--checkpoint", str(tmp_path / "checkpoint")]
    cfg_path.write_text(yaml.safe_dump(dict(TINY_RECIPE, iters=2, prompt="pins", ship_solve_rate=0.0)))
    assert main(args) == 0
    assert seen and all(len(ex.prompt) == 8 and len(ex.response) == 82 for ex in seen[-1])
    assert all(len(ex.pinned) >= 22 + 7 for ex in seen[-1])  # the givens still pinned: the puzzle's only way in
    mdl, tok = load_model(tmp_path / "ship")
    assert not recipe.reads_prompt(tok) and recipe.reads_prompt(load_model(recipe.write_initial_model(
        tmp_path / "cells"))[1])
    (res,) = solve_details([EXAMPLE], model=(mdl, tok), attempts=1)
    assert all(c == g for c, g in zip(res.grid, grid.parse(EXAMPLE)) if g != "0")
    with pytest.raises(SudokuInputError, match="pin=False: this model reads the puzzle only from the canvas"):
        solve_details([EXAMPLE], model=(mdl, tok), pin=False)
    # a checkpoint of the pins run does not resume under the cells format
    assert main(args + ["--export-checkpoint"]) == 0
    cfg_path.write_text(yaml.safe_dump(dict(TINY_RECIPE, iters=4)))
    with pytest.raises(SystemExit, match="was trained with prompt 'pins'.*has 'cells'"):
        main(args[:3] + [str(tmp_path / "fresh")] + args[4:] + ["--resume"])
    cfg_path.write_text(yaml.safe_dump(dict(TINY_RECIPE, prompt="digits")))
    with pytest.raises(SystemExit, match=r"train.yaml: prompt must be one of cells, pins, got 'digits'"):
        main(args)


def test_grown_model_computes_what_it_was_grown_from(tmp_path):
    """recipe.grow_layers: a 6-layer model grown to 11 (the sliding stack repeated, the full
    layer last, the added layers' post-norms at zero) gives the same encoder and decoder
    logits, with the grown initial model's frozen routers; Adam's moments grow with zeros;
    another layer count is a one-line error."""
    from mlx.utils import tree_flatten

    from mlx_dgemma import load
    from mlx_dgemma.sudoku.recipe import grow_layers, layer_count, write_initial_model

    size = dict(TINY_RECIPE["model"], num_hidden_layers=6)
    small, _ = load(write_initial_model(tmp_path / "six", seed=3, **size))
    trained = {k: v if ".router." in k else v * (1 + 0.1 * mx.random.normal(v.shape))
               for k, v in tree_flatten(small.parameters())}
    small.load_weights(list(trained.items()))  # moved off the initial values, as training would
    grown_init = write_initial_model(tmp_path / "eleven", seed=3, **dict(size, num_hidden_layers=11, grown_from=6))
    big, _ = load(grown_init)
    routers = {k: v for k, v in tree_flatten(big.parameters()) if ".router." in k}
    big.load_weights(list(grow_layers({k: v for k, v in trained.items() if ".router." not in k}, 6, 11).items()),
                     strict=False)
    assert len(big.layers) == 11 and [big.args.is_full(i) for i in range(11)] == [False] * 10 + [True]
    init6 = dict(tree_flatten(load(tmp_path / "six")[0].parameters()))
    for i, src in enumerate([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5]):  # the frozen routers follow their layers
        np.testing.assert_array_equal(np.array(routers[f"model.decoder.layers.{i}.router.proj.weight"]),
                                      np.array(init6[f"model.decoder.layers.{src}.router.proj.weight"]))
    tokens = mx.array([[2, 5, 30, 31, 40, 7, 9, 11, 60, 61, 62, 63, 64, 65]])
    for m in (small, big):
        cache = m.make_cache()
        m.__dict__.setdefault("_out", []).append(m.encode(tokens, cache, return_logits=True))
        m._out.append(m.denoise(mx.array([[70, 71, 72, 73, 74, 75, 76, 77]]), cache))
    for a, b in zip(small._out, big._out):
        assert float(mx.abs(a - b).max()) <= 1e-5 * max(1.0, float(mx.abs(a).max()))
    moments = {f"{k}.m": mx.ones_like(v) for k, v in trained.items()}
    grown = grow_layers(moments, 6, 11, fresh="zeros")
    assert layer_count(grown) == 11
    assert float(grown["model.decoder.layers.7.mlp.up_proj.weight.m"].sum()) == 0.0  # added: zero
    assert float(grown["model.decoder.layers.10.self_attn.q_proj.weight.m"].min()) == 1.0  # the full layer's, moved
    with pytest.raises(ValueError, match="hold 6 layers, expected 5"):
        grow_layers(trained, 5, 11)


def test_train_command_resumes_a_save_into_a_grown_model(tmp_path):
    """`--resume` with train.yaml's model grown (num_hidden_layers up, grown_from the old
    count) grows the save, its Adam moments and starts a new weight average; a save of
    another count is a one-line error."""
    import json

    import yaml

    from mlx_dgemma import load
    from mlx_dgemma.sudoku.train import main

    cfg = dict(TINY_RECIPE)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    args = ["-c", str(tmp_path / "train.yaml"), "--out", str(tmp_path / "work"), "--ship", str(tmp_path / "ship"),
            "--record", str(tmp_path / "record"), "--checkpoint", str(tmp_path / "no-checkpoint")]
    assert main(args) == 0
    cfg["model"] = dict(cfg["model"], num_hidden_layers=3, grown_from=2)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    assert main(args + ["--resume", "--iters", "6"]) == 0
    assert len(load(tmp_path / "work" / "model")[0].layers) == 3
    assert json.loads((tmp_path / "work" / "progress.json").read_text()) == {"iteration": 6}
    cfg["model"] = dict(cfg["model"], num_hidden_layers=4, grown_from=2)  # the saves now hold 3
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit, match=r"^error: --resume: .* holds 3 layers, the config's model has 4"):
        main(args + ["--resume", "--iters", "8"])


def test_heldout_curve_fits_points_per_e_fold_and_where_they_reach_the_target(tmp_path):
    """benchmarks/sudoku/training/heldout_curve.py: on scorings that lie on a known line in
    ln(examples) it reads that line's slope and where it crosses the target; a shipped-model
    scoring (no iteration) is not a point on the run; too few scorings is a one-line error."""
    import importlib.util
    import json
    import math

    spec = importlib.util.spec_from_file_location(
        "heldout_curve", ROOT / "benchmarks" / "sudoku" / "training" / "heldout_curve.py")
    hc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hc)
    batch = int(hc.read_config(hc.CONFIG)["batch_size"])
    line = lambda it: 0.25 * math.log(it * batch / 1e5) + 0.1  # 25 points per e-fold
    for it in (10_000, 20_000, 40_000):
        (tmp_path / f"heldout-{it}.json").write_text(json.dumps(
            {"iteration": it, "easy": {"solved": line(it)}, "medium": {"solved": line(it) / 2}}))
    (tmp_path / "heldout-shipped.json").write_text(json.dumps({"easy": {"solved": 0.99}, "medium": {"solved": 0.9}}))
    # a scoring with retries: the curve follows its single samples
    (tmp_path / "heldout-80000.json").write_text(json.dumps(
        {"iteration": 80_000, "easy": {"solved": 0.97}, "medium": {"solved": 0.6},
         "single_sample": {"easy": {"solved": line(80_000)}, "medium": {"solved": line(80_000) / 2}}}))
    assert hc.main(["--results", str(tmp_path), "--since", "10000", "--target", "0.8"]) == 0
    md = (tmp_path / "heldout-curve.md").read_text()
    at = 1e5 * math.exp((0.8 - 0.1) / 0.25)  # where the line reaches 80%
    assert "| since 10,000 | 25.0 |" in md and "| last 3 | 25.0 |" in md and "80,000" in md and f"{at:,.0f} examples" in md
    assert "12.5 |" in md  # medium: half the slope
    assert "99.0%" not in md and "97.0%" not in md
    with pytest.raises(SystemExit, match="held-out scorings from iteration 40000, need at least 3"):
        hc.main(["--results", str(tmp_path), "--since", "40000"])


def test_heldout_scoring_ships_only_weights_that_pass_the_bar(tmp_path):
    """benchmarks/sudoku/training/heldout.py --ship: the run's averaged weights go into a
    model folder that loads and solves, with the held-out scores in its card, only when they
    solve the bar's share of the easy puzzles; otherwise nothing is written."""
    import importlib.util
    import json

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_dgemma import load
    from mlx_dgemma.sudoku import solve_details

    spec = importlib.util.spec_from_file_location(
        "heldout", ROOT / "benchmarks" / "sudoku" / "training" / "heldout.py")
    heldout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(heldout)
    run = tmp_path / "run"
    recipe.write_initial_model(run / "init", seed=0, **TINY_RECIPE["model"])
    (run / "adapters").mkdir()
    model, _ = load(run / "init")
    mx.save_safetensors(str(run / "adapters" / "average.safetensors"), dict(tree_flatten(model.parameters())))
    (run / "progress.json").write_text(json.dumps({"iteration": 4}))
    common = ["--run", str(run), "--out", str(tmp_path / "h.json"), "--limit", "2"]
    with pytest.raises(SystemExit) as e:  # the package's model is replaced only on the whole sets
        heldout.main(common + ["--ship"])
    assert e.value.code == 2 and not (tmp_path / "h.json").exists()
    assert heldout.main(common + ["--ship", str(tmp_path / "under")]) == 0  # train.yaml's bar: 80%
    record = json.loads((tmp_path / "h.json").read_text())
    assert record["easy"]["puzzles"] == 2 and record["easy"]["solved"] < 0.8 and record["iteration"] == 4
    assert record["attempts"] >= 1 and record["single_sample"]["easy"]["puzzles"] == 2
    assert record["single_sample"]["easy"]["passes"] <= record["easy"]["passes"]  # retries only add passes
    assert record["shipped"] is False and not (tmp_path / "under").exists()
    assert heldout.main(common + ["--ship", str(tmp_path / "ship"), "--bar", "0"]) == 0
    assert json.loads((tmp_path / "h.json").read_text())["shipped"] == str(tmp_path / "ship")
    card = (tmp_path / "ship" / "README.md").read_text()
    assert "4 iterations" in card and "of 2 easy" in card and "of 2 medium solved" in card and "one sample:" in card
    res = solve_details([EXAMPLE], model=str(tmp_path / "ship"))
    assert len(res[0].grid) == 81 and res[0].grid[0] == EXAMPLE[0]  # a given, pinned
    # the iteration a scoring records: a weight average kept aside (--weights) keeps its own,
    # the run's own average reads the run's progress, other weights record none
    aside, raw = tmp_path / "average-7.safetensors", tmp_path / "raw.safetensors"
    mx.save_safetensors(str(aside), {"w": mx.zeros(1)}, metadata={"iteration": "7"})
    mx.save_safetensors(str(raw), {"w": mx.zeros(1)})
    assert heldout.scored_iteration(run, aside) == 7
    assert heldout.scored_iteration(run, run / "adapters" / "average.safetensors") == 4
    assert heldout.scored_iteration(run, raw) is None
