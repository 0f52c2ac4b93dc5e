"""The DiffusionGemma training objective.

As NVIDIA NeMo AutoModel's ``DiffusionGemmaSFTRecipe`` implements it (and says Google's
recipe does), for a batch of clean sequences ``prompt + response + EOS fill`` whose
response is cut into canvases of ``canvas_length`` aligned to its first token:

- encoder: one causal pass over the clean sequence. Its per-layer K/V is what every
  canvas attends to; its next-token cross-entropy over the valid sequence is the
  encoder loss (the final norm, the tied head and the soft-cap, as the reference's logits).
- decoder: one block per example is scored. Its canvas is the clean block with each
  position replaced, with probability ``t``, by a token uniform over the vocabulary; the
  canvas sits at the response tokens' absolute positions, attends bidirectionally to
  itself and to the clean prefix before the block (the prompt and the earlier response
  blocks). Sliding layers see only the last ``sliding_window - 1`` prefix tokens and the
  whole canvas, as at inference (no per-query window).
- self-conditioning: pass 1 runs without gradients and without a signal; per example a
  coin decides whether its soft-maxed logits (soft-capped, not temperature-scaled) feed
  pass 2 or the signal is zero (the reference's no-signal path, exactly).
- loss: the mean cross-entropy over every position of the scored blocks (corrupted or
  not, no ``1/t`` weight) plus ``encoder_loss_weight`` times the encoder's mean
  cross-entropy; both means are token means over the batch (or over the global batch
  when the caller passes the denominators, as data-parallel training does).
  ``corrupted_loss_weight`` (a recipe knob, not the published objective's) weights the
  diffusion term toward the corrupted positions: sum(w_i ce_i) / sum(w_i) with w_i that
  weight where corrupted and 1 where clean; 1 is the published token mean.

The randomness comes in explicitly (``draws.make_draws`` makes it), so a test can give
the same draws to a PyTorch computation of the objective.

Where this differs from NeMo's code, the result does not: NeMo runs the decoder over every
block of the reply (block-diagonal: no block sees another's canvas) and scores one; only
the scored block is run here, which gives that block the same logits. NeMo's sliding
layers see the last ``sliding_window - 1`` prefix tokens before the block, anchored at the
block's start, as inference does (its attention_mask.py notes that an earlier per-query
band broke that parity); so do these. The encoder loss is a token mean over the batch, as
NeMo takes it (its comment says Google takes a per-example mean).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from .. import backend, fastmath
from ..cache import PrefixCache
from ..model import DecoderLayer, Model

# A batch: ``tokens`` [B, T] int32, the clean sequences right-padded; ``prompt_lengths``
# [B] (where each response starts); ``lengths`` [B] (where each EOS fill ends: a whole
# number of canvases after the prompt); the draws for the scored block: ``blocks`` [B],
# ``corrupt`` [B, L] bool, ``noise`` [B, L] int32, ``self_condition`` [B] bool; optionally
# ``self_conditioned`` [n] int32, the indices of the rows whose ``self_condition`` is set
# (``make_batch`` writes it): pass 1 then runs on those rows alone.
Batch = Dict[str, mx.array]


class Loss(NamedTuple):
    loss: mx.array  # diffusion mean + encoder_loss_weight * encoder mean
    diffusion: mx.array  # summed (weighted) cross-entropy over the scored canvas positions
    encoder: mx.array  # summed next-token cross-entropy of the encoder
    diffusion_tokens: mx.array  # how many positions each sum has (diffusion: the sum of the weights)
    encoder_tokens: mx.array


def prepare_for_training(model: Model) -> Model:
    """Switch the model to its traceable paths (``backend.plain``): the CPU
    inference defaults go through the host or C kernels and cannot be differentiated or
    compiled. Both give the same numbers within float rounding. A model set to a
    traceable expert dispatch keeps it ("blocked" or "dense": faster to train on the CPU)."""
    backend.plain(model)
    return model


class _KVRecorder:
    """Stands in for a layer's cache during the encoder pass: keeps the layer's K/V (all
    of them: the decoder's masks below pick what each canvas sees)."""

    keys = values = None
    offset = 0

    def append(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        self.keys, self.values = keys, values
        return keys, values


def _checkpointed(layer: nn.Module, fn: Callable) -> Callable:
    """``fn`` recomputed in the backward pass instead of kept (mlx-lm's grad_checkpoint,
    per call: the encoder's K/V must be outputs of the checkpointed function)."""

    def inner(params, *args):
        layer.update(params)
        return fn(*args)

    ckpt = mx.checkpoint(inner)
    return lambda *args: ckpt(layer.trainable_parameters(), *args)


class _CheckpointedLayer(DecoderLayer):
    """A layer recomputed in the backward pass instead of kept (swapped in for the passes
    below when ``checkpoint``): in the encoder its K/V are outputs of the checkpointed
    function, then go to the layer's recorder."""

    def __call__(self, x, cache, offset, mask, write: bool):
        layer = super().__call__
        if write:
            def run(x):
                rec = _KVRecorder()
                return layer(x, rec, offset, mask, True), rec.keys, rec.values

            h, k, v = _checkpointed(self, run)(x)
            cache.append(k, v)
            return h
        pk, pv = cache
        return _checkpointed(self, lambda x, pk, pv, offset, mask: layer(x, (pk, pv), offset, mask, False))(
            x, pk, pv, offset, mask)


@contextmanager
def _checkpointing(model: Model, on: bool) -> Iterator[None]:
    if not on:
        yield
        return
    for layer in model.layers:
        layer.__class__ = _CheckpointedLayer
    try:
        yield
    finally:
        for layer in model.layers:
            layer.__class__ = DecoderLayer


def encoder_pass(model: Model, tokens: mx.array, checkpoint: bool = False, logits: bool = True):
    """The causal encoder over ``tokens`` [B, T] (the model's own pass, ``encode_chunk``, into
    recorders instead of a cache): per-layer (K, V) of every position and, with ``logits``,
    its logits [B, T, V] (else None: the last layer stops at its K/V)."""
    prepare_for_training(model)
    recorders = PrefixCache(_KVRecorder() for _ in model.layers)
    with _checkpointing(model, checkpoint):
        out = model.encode_chunk(tokens, recorders, return_logits=logits)
    return [(r.keys, r.values) for r in recorders], out


def decoder_masks(model: Model, starts: mx.array, T: int, L: int) -> Tuple[mx.array, mx.array]:
    """Key masks [B, 1, 1, T + L] over the encoder's K/V followed by the canvas, for full
    and sliding layers. The canvas starting at ``starts`` [B] sees the clean prefix before
    it (sliding layers: its last ``sliding_window - 1`` tokens) and the whole canvas."""
    k = mx.arange(T)[None]
    s = starts[:, None]
    full = k < s
    sliding = full & (k >= s - (model.args.sliding_window - 1))
    canvas = mx.ones((starts.shape[0], L), dtype=mx.bool_)
    return (
        mx.concatenate([full, canvas], axis=1)[:, None, None, :],
        mx.concatenate([sliding, canvas], axis=1)[:, None, None, :],
    )


def decoder_pass(model: Model, canvas: mx.array, signal: Optional[mx.array], kv, masks, offset,
                 checkpoint: bool = False) -> mx.array:
    """Decoder logits [B, L, V] for ``canvas`` over the given per-layer K/V and key masks
    (the model's own decoder pass, ``decode_layers``)."""
    prepare_for_training(model)
    prefixes = [(k, v, masks[0] if model.args.is_full(i) else masks[1]) for i, (k, v) in enumerate(kv)]
    with _checkpointing(model, checkpoint):
        return model.decode_layers(canvas, signal, prefixes, offset, head=True)


def signal_of(model: Model, first: mx.array) -> mx.array:
    """The self-conditioning signal of pass 1's logits: the soft lookup of their softmax."""
    probs = fastmath.softmax(first) if fastmath.enabled(first) else mx.softmax(first, axis=-1)
    return model.soft_embeddings(probs)


def prefix_span(batch: Batch, multiple: int = 32) -> int:
    """How many leading encoder positions any canvas of ``batch`` can see (rounded up to
    ``multiple``, so that compiled steps are reused): the decoder needs no keys past it."""
    L = batch["corrupt"].shape[1]
    end = int((batch["prompt_lengths"] + batch["blocks"] * L).max().item())
    return min(batch["tokens"].shape[1], -(-max(end, 1) // multiple) * multiple)


def objective(
    model: Model,
    batch: Batch,
    encoder_loss_weight: float = 1.0,
    self_conditioning: bool = True,
    denominators: Optional[Tuple[mx.array, mx.array]] = None,
    checkpoint: bool = False,
    span: Optional[int] = None,
    corrupted_loss_weight: float = 1.0,
) -> Loss:
    """The loss of ``batch`` (see ``Batch``) and its parts.

    ``self_conditioning=False`` skips pass 1 (every coin counts as tails).
    ``denominators``: (diffusion tokens, encoder tokens) to divide the sums by instead of
    this batch's own counts: data-parallel training passes the global batch's.
    ``checkpoint``: recompute each layer in the backward pass (less memory, ~1/3 more time).
    ``span``: the decoder attends only to the first ``span`` encoder positions
    (``prefix_span``; the keys past it are hidden from every canvas anyway).
    ``encoder_loss_weight=0``: the encoder runs over ``span`` positions only, without its
    head (the diffusion term alone, at less cost); ``encoder`` and ``encoder_tokens`` are 0.
    ``corrupted_loss_weight``: the weight of a corrupted position's cross-entropy in the
    diffusion mean (clean positions weigh 1; ``denominators`` must then be weighted sums).
    """
    tokens, starts_p, lengths = batch["tokens"], batch["prompt_lengths"], batch["lengths"]
    corrupt, noise = batch["corrupt"], batch["noise"]
    B, T = tokens.shape
    L = corrupt.shape[1]

    if encoder_loss_weight:
        kv, enc_logits = encoder_pass(model, tokens, checkpoint)
        valid = mx.arange(1, T)[None] < lengths[:, None]  # next-token pairs inside the sequence
        enc_ce = fastmath.cross_entropy(enc_logits[:, :-1], tokens[:, 1:]) * valid
        enc_sum, enc_n = enc_ce.sum(), valid.sum()
    else:
        # The encoder's loss weighs nothing: run it only over the positions the decoder
        # reads (causal, so their K/V are the same) and without its head; its loss is
        # reported as 0 over 0 tokens.
        kv, _ = encoder_pass(model, tokens if span is None else tokens[:, :span], checkpoint, logits=False)
        enc_sum, enc_n = mx.array(0.0), mx.array(0)

    starts = starts_p + batch["blocks"] * L
    positions = starts[:, None] + mx.arange(L)[None]
    clean = mx.take_along_axis(tokens, mx.minimum(positions, T - 1), axis=1)
    canvas = mx.where(corrupt, noise, clean)
    if span is not None and span < T:
        kv = [(k[..., :span, :], v[..., :span, :]) for k, v in kv]
    masks = decoder_masks(model, starts, kv[0][0].shape[2], L)

    signal = None
    rows = batch.get("self_conditioned")  # the heads rows' indices, when the batch lists them
    if self_conditioning and rows is None:
        first = mx.stop_gradient(decoder_pass(model, canvas, None, kv, masks, starts))  # no backward: no checkpoint
        signal = signal_of(model, first)
        signal = signal * batch["self_condition"][:, None, None].astype(signal.dtype)  # tails: zero, the no-signal path
    elif self_conditioning and rows.size:
        # pass 1 for the heads rows alone (a tails row's signal is zero whatever pass 1 says)
        first = mx.stop_gradient(decoder_pass(model, canvas[rows], None, [(k[rows], v[rows]) for k, v in kv],
                                              tuple(m[rows] for m in masks), starts[rows]))
        part = signal_of(model, first)
        heads = batch["self_condition"]
        slot = mx.where(heads, mx.cumsum(heads.astype(mx.int32)) - 1, rows.size)  # tails: the zero row
        signal = mx.concatenate([part, mx.zeros((1,) + part.shape[1:], part.dtype)])[slot]
    logits = decoder_pass(model, canvas, signal, kv, masks, starts, checkpoint)
    scored = positions < lengths[:, None]  # always the whole block when the fill is complete
    diff_ce = fastmath.cross_entropy(logits, clean) * scored
    diff_sum, diff_n = diff_ce.sum(), scored.sum()
    if corrupted_loss_weight != 1.0:  # 1: the published token mean, computed as it always was
        weights = mx.where(corrupt & scored, corrupted_loss_weight, scored.astype(mx.float32))
        diff_sum, diff_n = (diff_ce * weights).sum(), weights.sum()

    d_den, e_den = (diff_n, enc_n) if denominators is None else denominators
    loss = diff_sum / mx.maximum(d_den, 1) + encoder_loss_weight * enc_sum / mx.maximum(e_den, 1)
    return Loss(loss, diff_sum, enc_sum, diff_n, enc_n)
