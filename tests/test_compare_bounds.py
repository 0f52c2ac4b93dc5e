"""The float32 bounds of tests/reference/compare.py still catch real defects.

Each defect below is one a port can really make. The healthy model passes on the same
inputs and the defective one fails the bound (not only the argmax), so a looser bound
that let such a defect through would fail here.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_dgemma import load_model
from mlx_dgemma.model import RMSNormNoScale
from tests.reference.compare import RTOL, assert_logits_match, logits_report
from tests.reference.hf_reference import (
    build_reference,
    reference_denoise,
    reference_encode,
    save_checkpoint,
    tiny_config,
)

# Compared with the reference: CI runs these under both BLAS libraries (README, Tests).
pytestmark = pytest.mark.reference

V = 160


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Decisive routing (every expert used): every position must be within the bound."""
    ref = build_reference(tiny_config(top_k_experts=8), seed=1)
    path = save_checkpoint(ref, tmp_path_factory.mktemp("bounds"))
    rng = np.random.default_rng(11)
    prompt, canvas = rng.integers(0, V, (1, 20)), rng.integers(0, V, (1, 16))  # 20 > window 8
    want = reference_denoise(ref, canvas, reference_encode(ref, [prompt]))
    sc = want / 0.5
    want_sc = reference_denoise(ref, canvas, reference_encode(ref, [prompt]), sc)
    return path, prompt, canvas, want, sc, want_sc


def run(model, prompt, canvas, sc=None):
    cache = model.make_cache()
    model.encode(mx.array(prompt), cache)
    return np.array(model.denoise(mx.array(canvas), cache, None if sc is None else mx.array(sc)))


def norm_eps_1e5(model):
    """A norm epsilon of 1e-5 (a common default) instead of the config's 1e-6."""
    for m in model.modules():
        if isinstance(m, (nn.RMSNorm, RMSNormNoScale)):
            m.eps = 1e-5


def window_off_by_one(model):
    """Sliding layers that keep (and the encoder mask that sees) one token too many."""
    model.args.sliding_window += 1


DEFECTS = {"norm_eps_1e-5": norm_eps_1e5, "sliding_window_plus_one": window_off_by_one}


def test_the_healthy_model_passes(setup):
    path, prompt, canvas, want, sc, want_sc = setup
    model, _ = load_model(path)
    assert_logits_match(want, run(model, prompt, canvas), exact=True)
    assert_logits_match(want_sc, run(model, prompt, canvas, sc), exact=True)


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_a_defect_breaks_the_bound(setup, defect):
    path, prompt, canvas, want, _, _ = setup
    model, _ = load_model(path)
    DEFECTS[defect](model)
    got = run(model, prompt, canvas)
    assert logits_report(want, got)["max_rel"] > 2 * RTOL, "the defect hides inside the bound"
    with pytest.raises(AssertionError, match="within|median"):
        assert_logits_match(want, got, exact=True)


def test_dropped_self_conditioning_breaks_the_bound(setup):
    path, prompt, canvas, _, sc, want_sc = setup
    model, _ = load_model(path)
    got = run(model, prompt, canvas)  # the signal never reaches the decoder
    assert logits_report(want_sc, got)["max_rel"] > 2 * RTOL
    with pytest.raises(AssertionError, match="within|median"):
        assert_logits_match(want_sc, got, exact=True)
