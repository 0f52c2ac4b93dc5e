"""Logits processing for the sampling fields agents send (top_k, top_p, min_p, penalties,
logit_bias), applied as the reference applies a ``logits_processor``.

The reference's block loop (``generation_diffusion_gemma.py``) takes an external
``logits_processor`` list and runs it on the decoder's raw logits of EVERY denoising
step, at every canvas position, with the committed sequence (prompt + earlier blocks)
as ``input_ids``, before its own linear temperature schedule. The sample, the argmax,
the entropies that drive acceptance and stopping, and the self-conditioning signal all
see the processed logits. :class:`LogitsProcessors` is that hook for these fields, in
this order:

1. ``repetition_penalty`` (transformers' ``RepetitionPenaltyLogitsProcessor``): logits
   of tokens in the prompt or the reply so far are divided by it when positive,
   multiplied when negative;
2. one additive bias per token: ``logit_bias`` (OpenAI), minus
   ``frequency_penalty * count + presence_penalty * (count > 0)`` over the reply's
   committed tokens (OpenAI's formula), and ``suppress`` (tokens that may not appear);
3. ``top_k``, ``top_p``, ``min_p`` (transformers' ``TopK``/``TopP``/``MinP`` warpers):
   tokens outside the kept set get ``MASKED``. They act on the untempered
   distribution (the schedule's temperature comes after, as in the reference).

Tokens within one block are denoised together, so penalties see the tokens of EARLIER
blocks (and the prompt), not the block being written: the same ``input_ids`` the
reference's processors receive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .drafter import SettingsError

# What a removed token's logit becomes: finite (a fused sampler may compute 0 * x, which
# is NaN for -inf), and far below any soft-capped logit (|logit| <= 30) at any temperature.
MASKED = -1e30


@dataclass
class LogitsProcessors:
    """The sampling fields to apply; the defaults leave the logits untouched."""

    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Dict[int, float] = field(default_factory=dict)
    suppress: Tuple[int, ...] = ()

    def __post_init__(self):
        def num(name: str, lo: float, hi: float, lo_open: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise SettingsError(f"{name} must be a number, got {v!r}")
            if v < lo or v > hi or (lo_open and v == lo):
                raise SettingsError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
            setattr(self, name, float(v))

        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise SettingsError(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        self.top_k = int(self.top_k)
        num("top_p", 0.0, 1.0, lo_open=True)
        num("min_p", 0.0, 1.0)
        num("presence_penalty", -2.0, 2.0)
        num("frequency_penalty", -2.0, 2.0)
        num("repetition_penalty", 0.0, math.inf, lo_open=True)
        for tok, bias in self.logit_bias.items():
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
                raise SettingsError(f"logit_bias[{tok}] must be a number in [-100, 100], got {bias!r}")
        self.suppress = tuple(int(t) for t in self.suppress)

    @property
    def active(self) -> bool:
        return (self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0 or self.repetition_penalty != 1.0
                or bool(self.presence_penalty or self.frequency_penalty or self.logit_bias or self.suppress))

    def check_vocabulary(self, vocab_size: int) -> None:
        for name, ids in (("logit_bias", self.logit_bias), ("suppress", self.suppress)):
            bad = next((t for t in ids if not 0 <= int(t) < vocab_size), None)
            if bad is not None:
                raise SettingsError(f"{name}: token id {bad} is outside the vocabulary [0, {vocab_size})")

    def for_context(self, prompt: Sequence[int], generated: Sequence[int], vocab_size: int
                    ) -> Optional[Callable[[mx.array], mx.array]]:
        """The processing for one block, given the committed tokens (the prompt and the
        reply so far); None when it would change nothing."""
        seen = None
        if self.repetition_penalty != 1.0:
            seen = mx.array(np.unique(np.concatenate([np.asarray(prompt, np.int64).ravel(),
                                                      np.asarray(generated, np.int64)])).astype(np.int32))
            if seen.size == 0:
                seen = None
        bias = np.zeros(vocab_size, np.float32)
        for tok, b in self.logit_bias.items():
            bias[int(tok)] += b
        if (self.presence_penalty or self.frequency_penalty) and len(generated):
            counts = np.bincount(np.asarray(generated, np.int64), minlength=vocab_size)[:vocab_size]
            bias -= (self.frequency_penalty * counts + self.presence_penalty * (counts > 0)).astype(np.float32)
        bias[list(self.suppress)] = MASKED
        bias = mx.array(bias) if bias.any() else None
        warp = self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0
        if seen is None and bias is None and not warp:
            return None

        def process(logits: mx.array) -> mx.array:
            x = logits
            if seen is not None:
                picked = x[..., seen]
                x[..., seen] = mx.where(picked < 0, picked * self.repetition_penalty, picked / self.repetition_penalty)
            if bias is not None:
                x = x + bias
            if self.top_k > 0:
                x = top_k_filter(x, self.top_k)
            if self.top_p < 1.0:
                x = top_p_filter(x, self.top_p)
            if self.min_p > 0.0:
                x = min_p_filter(x, self.min_p)
            return x

        return process


def top_k_filter(x: mx.array, k: int) -> mx.array:
    """Keep the ``k`` largest logits of each row (ties with the k-th kept too)."""
    if k >= x.shape[-1]:
        return x
    kth = mx.topk(x, k, axis=-1).min(axis=-1, keepdims=True)
    return mx.where(x < kth, MASKED, x)


def top_p_filter(x: mx.array, p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability reaches ``p``
    (transformers' rule: drop the ascending-sorted prefix whose cumulative probability
    is <= 1 - p; the most likely token always stays)."""
    order = mx.argsort(x, axis=-1)
    ascending = mx.take_along_axis(x, order, axis=-1)
    cum = mx.cumsum(mx.softmax(ascending, axis=-1, precise=True), axis=-1)
    drop = cum <= 1.0 - p
    drop[..., -1] = False
    drop = mx.put_along_axis(mx.zeros(x.shape, dtype=mx.bool_), order, drop, axis=-1)
    return mx.where(drop, MASKED, x)


def min_p_filter(x: mx.array, min_p: float) -> mx.array:
    """Drop tokens less likely than ``min_p`` times the most likely one."""
    p = mx.softmax(x, axis=-1, precise=True)
    return mx.where(p < min_p * p.max(axis=-1, keepdims=True), MASKED, x)
