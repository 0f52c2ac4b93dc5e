"""The set-up the issue-21 record scripts share: one tree's model on the ``mid`` checkpoint
that ``benchmarks/ab_trees.py`` builds, quantized as the benchmarks quantize, configured by
the tree's backend where the tree has one, and primed at a prompt of ``P`` tokens."""
import os
import sys
from pathlib import Path

CHECKPOINT = "/tmp/mlx_dgemma_bench/mid"


def import_tree(tree: str):
    """The tree's ``mlx_dgemma`` (first on the path, with the tree's benchmarks/common.py)."""
    sys.path[:0] = [tree, tree + "/benchmarks"]
    import mlx_dgemma

    return mlx_dgemma


def build(pkg, bits: int, checkpoint: str = CHECKPOINT):
    """``pkg``'s model, quantized to ``bits`` (0: float), with the backend's defaults when
    the package has a backend (trees before issue 21 configured themselves)."""
    import mlx.core as mx
    from common import quantize

    model, _ = pkg.load_model(checkpoint)
    if bits:
        quantize(model, bits, 64)
        if os.path.exists(Path(pkg.__file__).parent / "backend.py"):  # not the editable install's
            import importlib

            importlib.import_module(pkg.__name__ + ".backend").defaults(model)
    mx.eval(model.parameters())
    return model


def prime(model, P: int):
    """(canvas, cache after a P-token prompt, pass-1 logits, their self-conditioning signal)."""
    import mlx.core as mx
    import numpy as np

    V, L = model.args.vocab_size, model.args.canvas_length
    prompt = mx.array(np.random.RandomState(0).randint(3, V, (1, P)))
    canvas = mx.array(np.random.RandomState(1).randint(3, V, (1, L)))
    cache = model.make_cache()
    model.encode(prompt, cache)
    mx.eval([x.state for x in cache])
    logits = model.denoise(canvas, cache)
    sc = model.soft_embeddings(mx.softmax(logits, -1))
    mx.eval(sc)
    return canvas, cache, logits, sc
