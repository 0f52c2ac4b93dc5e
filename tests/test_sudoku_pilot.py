"""benchmarks/sudoku/pilot.py at the smallest scale: its puzzles, its tokenizer, a few
training iterations and the evaluation's numbers."""

import importlib.util
import json
import os
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    """A script of benchmarks/sudoku as a module."""
    spec = importlib.util.spec_from_file_location(f"sudoku_{name}", ROOT / "benchmarks" / "sudoku" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def pilot():
    return _script("pilot")


@pytest.mark.parametrize("n", [4, 6])
def test_grids_are_valid_and_puzzles_unique(pilot, n):
    heldout = pilot.make_puzzles(n, 8, pilot.HELDOUT_SEED)
    train = pilot.make_puzzles(n, 8, pilot.TRAIN_SEED, exclude=[p for p, _ in heldout])
    lo, hi = pilot.GIVENS[n]
    for p, sol in heldout + train:
        assert pilot.is_solution("0" * n * n, sol, n)  # every row, column and box holds 1..n once
        assert pilot.is_solution(p, sol, n)  # the givens are the solution's
        assert lo <= sum(c != "0" for c in p) <= hi
        assert pilot.count_solutions(p, n) == 1
    assert not {p for p, _ in heldout} & {p for p, _ in train}
    assert len({p for p, _ in train}) == len(train)


def test_checks_catch_wrong_grids(pilot):
    sol = pilot.random_grid(6, random.Random(3))
    swapped = sol[1] + sol[0] + sol[2:]  # two cells of a row swapped: columns break
    assert not pilot.is_solution("0" * 36, swapped, 6)
    assert pilot.count_solutions("0" * 16, 4, limit=2) == 2
    # the 2x3 boxes: the first box is rows A-B, columns 1-3
    assert pilot.units(6)[12] == [0, 1, 2, 6, 7, 8]


@pytest.mark.parametrize("prompt", ["cells", "pins"])
def test_tokenizer_one_token_per_cell(pilot, tmp_path, prompt):
    from transformers import PreTrainedTokenizerFast

    from mlx_dgemma.tuner.datasets import chat_example

    n = 4
    pilot.write_tokenizer_for(n)(tmp_path)
    tok = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    tok.chat_template = pilot.recipe.chat_template(prompt)
    puzzle, sol = "1000003000200004", "1342243131244213"
    ex = chat_example(tok, pilot.prompt_messages(puzzle, n, sol))
    vocab = pilot.vocabulary(n)
    assert ex.response == [vocab[d] for d in sol] + [pilot.recipe.TURN_CLOSE]
    cells = [t for t in ex.prompt if t in {vocab[c] for c in pilot.cells(n)}]
    if prompt == "pins":  # the user turn left empty: the puzzle reaches the model as canvas pins alone
        assert cells == [] and len(ex.prompt) == 8
        return
    assert cells[:2] == [vocab["A11"], vocab["A2."]] and len(cells) == n * n
    assert len(ex.response) <= pilot.canvas_length(n) == 24 and pilot.canvas_length(6) == 40


def test_a_few_iterations_train_and_evaluate(pilot, tmp_path):
    out = tmp_path / "run"
    args = ["--size", "4", "--iters", "4", "--eval-every", "2", "--eval-puzzles", "4", "--train-puzzles", "32",
            "--hidden-size", "32", "--layers", "2", "--intermediate-size", "32", "--head-dim", "8",
            "--moe-intermediate-size", "16", "--out", str(out), "--note", "a quiet machine"]
    assert pilot.main(args) == 0
    rows = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "blanks_right" in r]
    assert [r["iteration"] for r in evals] == [0, 2, 4]
    for r in evals:
        assert 0.0 <= r["blanks_right"] <= 1.0 and 0.0 <= r["solved"] <= 1.0
        assert r["examples"] == 16 * r["iteration"]
    assert any(r.get("train_loss", 0) > 0 for r in rows)
    record = json.loads((out / "record.json").read_text())
    assert record["command"].startswith("python benchmarks/sudoku/pilot.py --size 4")
    assert "--note" not in record["command"] and record["note"] == "a quiet machine"  # it describes, not reproduces
    assert "| 4 | 64 |" in (out / "results.md").read_text()
    assert record["nice"] == os.nice(0) and f"at nice {os.nice(0)}," in (out / "results.md").read_text()
    assert not (out / "curve.jsonl.part").exists()


def test_bad_flags_exit_2(pilot, capsys):
    with pytest.raises(SystemExit) as e:
        pilot.parse_args(["--size", "9"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        pilot.parse_args(["--top-k", "3", "--experts", "2"])
    assert e.value.code == 2 and "--top-k 3" in capsys.readouterr().err


def test_compare_pilots_plots_arms_against_examples_and_minutes(tmp_path, capsys):
    """A 9x9 run's curve (batch 16: examples from its training reports) beside another arm;
    --rate adds the minutes panel, and an arm it does not name is a one-line error."""
    compare = _script("compare_pilots")
    for arm, gain in (("slow", 0.2), ("fast", 0.1)):
        rows = [{"iteration": 10, "examples": 160, "train_loss": 1.0}]
        rows += [{"iteration": i, "val_blank_accuracy": gain * i / 100, "val_solve_rate": 0.0} for i in (100, 200)]
        (tmp_path / arm).mkdir()
        (tmp_path / arm / "curve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = tmp_path / "curves.png"
    arms = [str(tmp_path / "slow"), str(tmp_path / "fast")]
    assert compare.main(arms + ["--plot", str(png), "--rate", "slow=10", "--rate", "fast=40", "--tail", "2"]) == 0
    out = capsys.readouterr().out
    assert "| 200 | 40.0% / 0.0% | 20.0% / 0.0% |" in out
    assert "| mean of 100, 200 | 30.0% / 0.0% | 15.0% / 0.0% |" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert compare.evaluations(arms[0])[200]["examples_seen"] == 3200
    with pytest.raises(SystemExit, match=r"--rate medium=3: no arm named 'medium' \(arms: slow, fast\)"):
        compare.main(arms + ["--plot", str(png), "--rate", "medium=3"])
    with pytest.raises(SystemExit, match=r"--rate slow=quick: expected ARM=EXAMPLES_PER_SECOND"):
        compare.main(arms + ["--plot", str(png), "--rate", "slow=quick"])
    with pytest.raises(SystemExit) as e:  # a rate without a figure to draw it in
        compare.main(arms + ["--rate", "slow=10"])
    assert e.value.code == 2 and "--rate adds a panel to --plot's figure" in capsys.readouterr().err
