"""The random draws of one training step, keyed so that they never depend on the batch split.

Every draw is a pure function of ``(seed, iteration, example)`` through ``mlx_dgemma.rng``'s
counter-based hashing: the example is its index in the dataset, so a process that holds
half of a batch draws for its examples exactly what one process with the whole batch
draws for them (what makes data-parallel training equal single-process training), and a
test can hand the very same draws to the PyTorch reference.

Per example: the corruption level ``t ~ U(eps, 1)``, the scored block (uniform over the
response's blocks), the corruption mask (each canvas position independently with
probability ``t``), the replacement tokens (uniform over the whole vocabulary; there is no
mask token) and the self-conditioning coin (``True`` with probability ``p``).
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

from ..rng import mix32, random_tokens, step_key, uniform_from_bits

# Stream ids of the training draws (the drafter's streams are 0-2).
T_LEVEL, BLOCK, COIN, MASK, TOKENS = 16, 17, 18, 19, 20

EPS = 1e-3  # lower bound of the corruption level (the recipe's dllm.eps)


def _row_keys(seed: int, stream: int, iteration: int, examples: Sequence[int]) -> np.ndarray:
    return np.array([step_key(seed, stream, iteration, int(e)) for e in examples], dtype=np.uint32)


def _uniform_rows(seed: int, stream: int, iteration: int, examples: Sequence[int]) -> np.ndarray:
    return uniform_from_bits(mix32(_row_keys(seed, stream, iteration, examples)))


def _position_keys(seed: int, stream: int, iteration: int, examples: Sequence[int], length: int) -> np.ndarray:
    rows = _row_keys(seed, stream, iteration, examples)
    return mix32(rows[:, None] + np.arange(length, dtype=np.uint32)[None])


def make_draws(
    seed: int,
    iteration: int,
    examples: Sequence[int],
    num_blocks: Sequence[int],
    canvas_length: int,
    vocab_size: int,
    self_conditioning_p: float = 0.5,
    eps: float = EPS,
) -> Dict[str, np.ndarray]:
    """The draws for ``examples`` (dataset indices) at ``iteration``, as NumPy arrays.

    ``num_blocks[i]``: how many canvas blocks example ``i``'s response has. Returns
    ``t`` [B] float32, ``blocks`` [B] int32, ``corrupt`` [B, L] bool, ``noise`` [B, L]
    int32 and ``self_condition`` [B] bool.
    """
    n = np.asarray(num_blocks, dtype=np.int64)
    if (n < 1).any():
        raise ValueError("every example needs at least one response block")
    t = (eps + (1.0 - eps) * _uniform_rows(seed, T_LEVEL, iteration, examples)).astype(np.float32)
    blocks = np.minimum((_uniform_rows(seed, BLOCK, iteration, examples) * n).astype(np.int64), n - 1)
    u = uniform_from_bits(_position_keys(seed, MASK, iteration, examples, canvas_length))
    corrupt = u < t[:, None]
    noise = random_tokens(_position_keys(seed, TOKENS, iteration, examples, canvas_length), vocab_size)
    coins = _uniform_rows(seed, COIN, iteration, examples) < self_conditioning_p
    return {
        "t": t,
        "blocks": blocks.astype(np.int32),
        "corrupt": corrupt,
        "noise": noise.astype(np.int32),
        "self_condition": coins,
    }
