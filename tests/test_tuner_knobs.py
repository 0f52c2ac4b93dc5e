"""The trainer's recipe knobs (issue 19, item 2), all off by default:

- ``corrupt_only_free``: an example's pinned reply positions (its JSONL ``pinned`` field:
  what inference pins in the canvas) are never corrupted;
- ``corrupted_loss_weight``: the diffusion term is sum(w_i ce_i) / sum(w_i), w_i that
  weight where corrupted and 1 where clean;
- ``min_corruption_level``: the corruption levels are drawn uniform over [this, 1)
  instead of [1e-3, 1).

The defaults are the published objective: its draws and denominators are checked here
against ``make_draws`` directly, and the loss against transformers' model in
test_tuner_objective.py (unchanged). The weighted term is checked against the per-position
cross-entropies of transformers' model (``reference_terms``). Bounds as in test_tuner_objective.py: float32
sums of a few dozen cross-entropies, 1e-4 relative.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_dgemma.errors import DataError
from mlx_dgemma.tuner.datasets import BatchSpec, Example, iterate_batches, make_batch
from mlx_dgemma.tuner.draws import make_draws
from mlx_dgemma.tuner.objective import objective
from tests.test_tuner_objective import L, V, as_mx, pair, reference_terms, rel  # noqa: F401  (pair: a fixture)
from tests.test_tuner_objective import make_batch as reference_batch

W = 4.0


def test_weighted_diffusion_term_is_the_weighted_mean_of_the_reference_cross_entropies(pair):
    ref, model = pair
    batch = reference_batch(seed=4)
    c = batch["corrupt"]
    assert 0 < c.sum() < c.size, "needs corrupted and clean positions"
    with torch.no_grad():
        rows, enc_sum, enc_n = reference_terms(ref, batch)
    ce, enc = np.stack([r.double().numpy() for r in rows]), float(enc_sum) / enc_n
    w = np.where(c, W, 1.0)
    want = float((w * ce).sum() / w.sum())
    assert rel(want, float(ce.mean())) > 1e-3, "weighting changes nothing here: the test could not fail"
    out = objective(model, as_mx(batch), corrupted_loss_weight=W)
    assert float(out.diffusion_tokens) == w.sum()
    assert rel(float(out.diffusion / out.diffusion_tokens), want) < 1e-4
    assert rel(float(out.loss), want + enc) < 1e-4
    # given denominators (the trainer's global ones) divide the weighted sum
    den = (mx.array(2 * w.sum(), mx.float32), out.encoder_tokens)
    halved = objective(model, as_mx(batch), corrupted_loss_weight=W, denominators=den)
    assert rel(float(halved.loss), want / 2 + enc) < 1e-4


def examples():
    """Three examples (reply lengths 5, 13, 16 with canvas 8): pins in both blocks and in the fill."""
    rng = np.random.default_rng(0)
    out = []
    for k, (p, r, pins) in enumerate([(4, 5, (0, 2, 5, 6, 7)), (6, 13, (1, 3, 8, 9, 12, 14)),
                                      (3, 16, (0, 1, 2, 3, 4, 5, 6, 7, 10, 15))]):
        out.append(Example(rng.integers(3, V, p).tolist(), rng.integers(3, V, r).tolist(), f"f.jsonl:{k + 1}",
                           pinned=pins))
    return out


def spec(**kw):
    return BatchSpec(L, V, eos=1, pad=0, seed=7, **kw)


def test_defaults_are_the_published_draws_and_denominators():
    exs = examples()
    for it in range(1, 6):
        b = {k: np.array(v) for k, v in make_batch(exs, [0, 1, 2], it, spec(), exs).items()}
        d = make_draws(7, it, [0, 1, 2], [1, 2, 2], L, V)
        for k in ("blocks", "corrupt", "noise", "self_condition"):
            assert np.array_equal(b[k], d[k]), k
        assert np.array_equal(b["self_conditioned"], np.flatnonzero(d["self_condition"]))
        enc = sum(len(e.prompt) + -(-len(e.response) // L) * L - 1 for e in exs)
        assert b["denominators"].tolist() == [3 * L, enc]
        # pins are inert while the option is off
        bare = [Example(e.prompt, e.response, e.source) for e in exs]
        b2 = make_batch(bare, [0, 1, 2], it, spec(corrupt_only_free=True), bare)
        assert all(np.array_equal(np.array(b2[k]), b[k]) for k in b)


def test_pinned_positions_stay_clean_and_the_rest_is_corrupted_as_before():
    exs = examples()
    removed = 0
    for it in range(1, 40):
        off = {k: np.array(v) for k, v in make_batch(exs, [0, 1, 2], it, spec(), exs).items()}
        on = {k: np.array(v) for k, v in make_batch(exs, [0, 1, 2], it, spec(corrupt_only_free=True), exs).items()}
        for k in ("tokens", "blocks", "noise", "self_condition", "denominators"):
            assert np.array_equal(on[k], off[k]), k
        for b, e in enumerate(exs):
            start = int(on["prompt_lengths"][b] + on["blocks"][b] * L)
            clean = on["tokens"][b, start : start + L]
            canvas = np.where(on["corrupt"][b], on["noise"][b], clean)  # the objective's canvas
            pinned = np.zeros(L, bool)
            first = int(on["blocks"][b]) * L
            pinned[[p - first for p in e.pinned if first <= p < first + L]] = True
            assert not on["corrupt"][b][pinned].any()
            assert np.array_equal(canvas[pinned], clean[pinned])
            assert np.array_equal(on["corrupt"][b][~pinned], off["corrupt"][b][~pinned])
            removed += int(off["corrupt"][b][pinned].sum())
    assert removed > 20, "the draws rarely hit a pin: the test could not fail"


class FakeGroup:
    """What iterate_batches reads of an mx.distributed group."""

    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def test_weighted_denominators_are_global_over_processes_and_micro_batches():
    """Two processes with two micro-batches a step: every batch carries the whole step's
    weighted count, and the processes' rows are the one process's rows (same draws)."""
    rng = np.random.default_rng(1)
    data = [Example(rng.integers(3, V, 5).tolist(), rng.integers(3, V, int(n)).tolist(), f"f:{i}",
                    pinned=(0, 4, 9)) for i, n in enumerate(rng.integers(9, 17, 16))]
    sp = spec(corrupt_only_free=True, corrupted_loss_weight=W)

    def take(group, n=6):
        it = iterate_batches(data, 4, sp, loop=True, comm_group=group, accumulation_steps=2)
        return [({k: np.array(v) for k, v in b.items()}, last) for (b, last), _ in zip(it, range(n))]

    one, halves = take(None), [take(FakeGroup(r, 2)) for r in range(2)]
    for step in range(3):
        pair_ = one[2 * step : 2 * step + 2]
        assert [last for _, last in pair_] == [False, True]
        want = sum(L * 4 + (W - 1) * b["corrupt"].sum() for b, _ in pair_)
        assert want != 8 * L
        for k in range(2):
            b = pair_[k][0]
            assert b["denominators"][0] == want
            for r in range(2):
                h = halves[r][2 * step + k][0]
                assert h["denominators"][0] == want
                assert np.array_equal(h["corrupt"], b["corrupt"][r::2])
                assert np.array_equal(h["noise"], b["noise"][r::2])


def test_min_corruption_level_raises_every_level_and_keeps_the_other_draws():
    exs = examples()
    more = 0
    for it in range(1, 30):
        base = {k: np.array(v) for k, v in make_batch(exs, [0, 1, 2], it, spec(), exs).items()}
        high = {k: np.array(v) for k, v in make_batch(exs, [0, 1, 2], it, spec(min_corruption_level=0.6), exs).items()}
        d = make_draws(7, it, [0, 1, 2], [1, 2, 2], L, V, eps=0.6)
        assert (d["t"] >= 0.6).all()
        for k in ("blocks", "corrupt", "noise", "self_condition"):
            assert np.array_equal(high[k], d[k]), k
        for k in ("tokens", "blocks", "noise", "self_condition", "denominators"):
            assert np.array_equal(high[k], base[k]), k
        # the same uniform draws against a higher level: a position corrupted before still is
        assert not (base["corrupt"] & ~high["corrupt"]).any()
        more += int((high["corrupt"] & ~base["corrupt"]).sum())
    assert more > 20, "the levels barely moved: the test could not fail"


def test_a_pin_past_the_replys_canvases_is_a_data_error():
    bad = examples()
    bad[1].pinned = (3, 16)  # reply of 13 tokens: two canvases of 8 end at 16
    with pytest.raises(DataError, match=r"^f\.jsonl:2: 'pinned' position 16 is past the reply's canvases \(16 "):
        next(iterate_batches(bad, 2, spec(corrupt_only_free=True)))
    next(iterate_batches(bad, 2, spec()))  # the option off: the pins are never read


@pytest.mark.parametrize("value,needle", [
    ("[1, \"2\"]", "'pinned' must be a list of integer reply positions"),
    ("3", "'pinned' must be a list of integer reply positions"),
    ("[1, true]", "'pinned' must be a list of integer reply positions"),
    ("[0, -1]", "'pinned' position -1 is negative"),
    ("[2, 5, 2]", "'pinned' lists position 2 twice"),
])
def test_bad_pinned_field_is_a_one_line_error_naming_file_and_line(tmp_path, value, needle):
    from mlx_dgemma.tuner.datasets import load_split
    from tests.test_tuner_train import chat

    good = json.dumps(dict(chat("Hi?", "Hello."), pinned=[0, 1]))
    bad = json.dumps(chat("Hi?", "Hello."))[:-1] + f', "pinned": {value}}}'
    path = tmp_path / "train.jsonl"
    path.write_text(good + "\n" + bad + "\n")
    tok = _byte_tokenizer(tmp_path)
    with pytest.raises(DataError) as e:
        load_split(path, tok)
    msg = str(e.value)
    assert msg.startswith(f"{path}:2: ") and needle in msg and "\n" not in msg, msg
    path.write_text(good + "\n")
    assert load_split(path, tok)[0].pinned == (0, 1)


def _byte_tokenizer(tmp_path):
    from mlx_dgemma import load
    from tests.test_tuner_train import tiny_model

    return load(tiny_model(tmp_path / "m"))[1]


def test_sudoku_lines_pin_what_inference_pins(tmp_path):
    """data.chat_line's ``pinned`` = the positions sudoku.constraints_for pins (the givens,
    <turn|>, the fill), and a reply token at a given's position is that given."""
    from transformers import PreTrainedTokenizerFast

    from mlx_dgemma.sudoku import constraints_for
    from mlx_dgemma.sudoku.data import chat_line
    from mlx_dgemma.sudoku.recipe import CANVAS_LENGTH, CHAT_TEMPLATE, write_tokenizer
    from mlx_dgemma.tuner.datasets import check_pinned, load_split

    write_tokenizer(tmp_path)
    tok = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    tok.chat_template = CHAT_TEMPLATE
    solution = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"
    puzzle = "".join(c if k % 3 == 0 else "." for k, c in enumerate(solution))
    line = chat_line(puzzle, solution)
    unpinned = json.dumps({"messages": json.loads(line)["messages"]})
    (tmp_path / "train.jsonl").write_text(line + "\n" + unpinned + "\n")
    ex, old = load_split(tmp_path / "train.jsonl", tok)
    assert set(ex.pinned) == set(constraints_for(puzzle, tok)) and len(ex.pinned) == 27 + CANVAS_LENGTH - 81
    assert old.pinned == ()  # a line without the field (folders written before it) loads unpinned
    digits = tok.get_vocab()
    assert all(ex.response[i] == digits[puzzle[i]] for i in ex.pinned if i < 81)
    check_pinned([ex], CANVAS_LENGTH)
    assert "pinned" not in json.loads(chat_line(puzzle, solution, pinned=False))
