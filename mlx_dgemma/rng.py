"""Counter-based random streams shared by the MLX path, the fused kernels and the tests.

Every random number the drafter uses is a pure function of
``(seed, stream, block, step, position, token)``, hashed with the 32-bit ``lowbias32``
mixer. Results therefore do not depend on thread scheduling, on the backend, or on
which other requests share a batch (each batch row has its own seed), and a NumPy twin
lets tests feed the exact same noise to the PyTorch reference.

Streams: ``CANVAS`` (the block's initial canvas), ``SAMPLE`` (Gumbel noise for the
denoiser sample) and ``RENOISE`` (fresh tokens for rejected positions), all keyed by
canvas slot; ``ENCODER`` (Gumbel noise for the encoder's own sample in ``decode="ar"``
and ``"verified"``), keyed by the ABSOLUTE sequence position instead
(:func:`sequence_keys`), so the encoder's choice at a position does not depend on
which block, pass or step reached it.
"""

from __future__ import annotations

from typing import Sequence, Union

import mlx.core as mx
import numpy as np

CANVAS, SAMPLE, RENOISE, ENCODER = 0, 1, 2, 3
_M1, _M2 = 0x7FEB352D, 0x846CA68B
_GOLDEN = 0x9E3779B9
MASK32 = 0xFFFFFFFF


def mix32_int(x: int) -> int:
    """lowbias32 on a Python int (host-side key derivation)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * _M1) & MASK32
    x ^= x >> 15
    x = (x * _M2) & MASK32
    x ^= x >> 16
    return x


def mix32(x):
    """lowbias32 on a uint32 MLX or NumPy array (wrapping multiplies)."""
    if isinstance(x, np.ndarray):
        x = x.astype(np.uint32)
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(_M1)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(_M2)
        return x ^ (x >> np.uint32(16))
    x = x ^ (x >> 16)
    x = x * mx.array(_M1, dtype=mx.uint32)
    x = x ^ (x >> 15)
    x = x * mx.array(_M2, dtype=mx.uint32)
    return x ^ (x >> 16)


def step_key(seed: int, stream: int, block: int, step: int) -> int:
    """One 32-bit key per (seed, stream, block, step)."""
    k = mix32_int((seed & MASK32) ^ mix32_int((seed >> 32) + _GOLDEN * (stream + 1)))
    k = mix32_int(k ^ mix32_int((block * 0x27D4EB2D + 0x165667B1) & MASK32))
    return mix32_int(k ^ ((step * _GOLDEN) & MASK32))


def position_keys(
    seeds: Sequence[int], stream: int, block: int, step: int, length: int, numpy: bool = False
) -> Union[mx.array, np.ndarray]:
    """Keys [B, length] (uint32): one per batch row (own seed) and canvas position."""
    rows = np.array([step_key(int(s), stream, block, step) for s in seeds], dtype=np.uint32)
    keys = mix32(rows[:, None] + np.arange(length, dtype=np.uint32)[None])
    return keys if numpy else mx.array(keys)


def sequence_keys(seeds, stream: int, positions, numpy: bool = False) -> Union[mx.array, np.ndarray]:
    """Keys [n] (uint32) for absolute sequence ``positions`` [n] under ``seeds`` (one
    seed for all, or one per position)."""
    positions = np.asarray(positions, dtype=np.uint32).reshape(-1)
    seeds = np.broadcast_to(np.asarray(seeds, dtype=object), positions.shape)
    memo = {}
    rows = np.array([memo.setdefault(int(s), step_key(int(s), stream, 0, 0)) for s in seeds], dtype=np.uint32)
    keys = mix32(rows + positions)
    return keys if numpy else mx.array(keys)


def uniform_from_bits(h):
    """uint32 hash -> float32 in the open interval (0, 1), 24 bits of mantissa."""
    if isinstance(h, np.ndarray):
        return ((h >> np.uint32(8)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-24)
    return ((h >> 8).astype(mx.float32) + 0.5) * (2.0**-24)


def token_bits(keys, vocab_size: int):
    """Hash [B, L, V] for every (position key, token)."""
    if isinstance(keys, np.ndarray):
        return mix32(keys[..., None] ^ np.arange(vocab_size, dtype=np.uint32))
    return mix32(keys[..., None] ^ mx.arange(vocab_size, dtype=mx.uint32))


def gumbel(keys, vocab_size: int):
    """Gumbel(0, 1) noise [B, L, V]; argmax(logits + gumbel) samples softmax(logits)."""
    u = uniform_from_bits(token_bits(keys, vocab_size))
    if isinstance(u, np.ndarray):
        return -np.log(-np.log(u))
    return -mx.log(-mx.log(u))


def random_tokens(keys, vocab_size: int):
    """Uniform token ids [B, L] (int32) from position keys."""
    if isinstance(keys, np.ndarray):
        return (mix32(keys ^ np.uint32(_GOLDEN)) % np.uint32(vocab_size)).astype(np.int32)
    return (mix32(keys ^ mx.array(_GOLDEN, dtype=mx.uint32)) % vocab_size).astype(mx.int32)
