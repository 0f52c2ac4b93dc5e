"""The training loop: mlx-lm's, with the diffusion objective and what it needs to report.

The same shape as ``mlx_lm.tuner.trainer.train`` (a compiled step over model, optimizer
and random state; gradient accumulation; ``average_gradients`` over ``mx.distributed``;
validation, reports and saves every so many steps; the same ``TrainingArgs`` and
``TrainingCallback``). It differs where mlx-lm's loop cannot serve: the loss has two
parts that are reported apart, the token means are taken over the whole optimizer step
on every process (so two processes with half a batch each equal one with all of it), the
gradient norm is clipped, saves are atomic, and a stop signal (Ctrl-C, SIGTERM) ends the
run after the current step on every process, with a save (``stop``).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.nn.utils import average_gradients
from mlx.utils import tree_map
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.trainer import TrainingArgs as _MLXTrainingArgs

from .. import runtime
from ..model import Model
from .datasets import BatchSpec, Example, iterate_batches
from .draws import EPS
from .objective import objective, prefix_span, prepare_for_training
from .stop import StopRequest, stop_requests
from .utils import numbered_adapter_file, save_adapters, save_optimizer_state
from .weight_average import WeightAverage

STOP_CHECK_EVERY = 10  # optimizer updates between the processes' checks for a stop request


@dataclass
class TrainingArgs(_MLXTrainingArgs):
    encoder_loss_weight: float = field(default=1.0, metadata={
        "help": "Weight of the encoder's next-token loss (0: not computed, and the encoder runs only over the "
                "positions the decoder reads)."})
    self_conditioning_p: float = field(default=0.5, metadata={"help": "Per-example self-conditioning probability."})
    grad_clip: float = field(default=1.0, metadata={"help": "Clip the gradient norm (0: off)."})
    seed: int = field(default=0, metadata={"help": "Seed of the batch order and the objective's draws."})
    val_seed: Optional[int] = field(default=None, metadata={
        "help": "Seed of the validation draws (default: seed + 1); a resumed run that reseeds its training "
                "draws keeps it, so that its validation losses compare with the earlier ones."})
    pad_to: int = field(default=32, metadata={"help": "Pad batch rows to a multiple of this many tokens."})
    fill_token_id: Optional[int] = field(default=None, metadata={"help": "EOS fill token (default: the model's EOS)."})
    start_iteration: int = field(default=0, metadata={
        "help": "Iterations trained before this run (a resume): numbered saves carry the total, "
                "so a resumed run does not overwrite the earlier run's."})
    corrupt_only_free: bool = field(default=False, metadata={
        "help": "Never corrupt the positions an example pins (its 'pinned' field: what inference pins in the "
                "canvas, e.g. a Sudoku's givens); off: the published objective corrupts every position."})
    corrupted_loss_weight: float = field(default=1.0, metadata={
        "help": "Weight of a corrupted position's cross-entropy in the diffusion mean (clean positions: 1; "
                "1 is the published token mean)."})
    min_corruption_level: float = field(default=EPS, metadata={
        "help": "Draw each example's corruption level uniform over [this, 1) (the published objective: "
                "1e-3); validation keeps the published levels, so its losses compare across settings."})
    optimizer_file: Optional[str] = field(default=None, metadata={
        "help": "Also save the optimizer state (Adam's moments and step) here at every save, "
                "for a resume that continues exactly (tuner.utils.load_optimizer_state)."})


def batch_spec(model: Model, args: TrainingArgs, seed: Optional[int] = None) -> BatchSpec:
    a = model.args
    eos = args.fill_token_id if args.fill_token_id is not None else (a.eos_token_ids or [1])[0]
    if not args.corrupted_loss_weight > 0:
        raise ValueError(f"corrupted_loss_weight must be positive, got {args.corrupted_loss_weight}")
    if not 0 < args.min_corruption_level < 1:
        raise ValueError(f"min_corruption_level must be in (0, 1), got {args.min_corruption_level}")
    return BatchSpec(a.canvas_length, a.vocab_size, eos, a.pad_token_id, args.seed if seed is None else seed,
                     args.self_conditioning_p, args.pad_to, args.corrupt_only_free, args.corrupted_loss_weight,
                     args.min_corruption_level)


def _parts(sums) -> Dict[str, float]:
    d, e, dn, en = (float(x) for x in sums)
    return {"diffusion": d / max(dn, 1.0), "encoder": e / max(en, 1.0)}


def evaluate(model: Model, dataset: Sequence[Example], batch_size: int, num_batches: int, args: TrainingArgs,
             progress_callback=None) -> Dict[str, float]:
    """Validation loss and its parts over ``num_batches`` batches (-1: all), with fixed
    draws: the same batches and noise at every evaluation, so the numbers compare."""
    model.eval()
    world = mx.distributed.init()
    # noise independent of the training draws, the same at every evaluation, at the published levels
    spec = replace(batch_spec(model, args, seed=args.seed + 1 if args.val_seed is None else args.val_seed),
                   min_corruption_level=EPS)
    sc = args.self_conditioning_p > 0
    sums = mx.zeros((4,))
    batches = iterate_batches(dataset, batch_size, spec, shuffle=False, comm_group=world)
    for n, (batch, _) in enumerate(batches):
        if num_batches != -1 and n >= num_batches:
            break
        den = batch["denominators"]
        out = objective(model, batch, args.encoder_loss_weight, sc, (den[0], den[1]),
                        span=prefix_span(batch, args.pad_to), corrupted_loss_weight=args.corrupted_loss_weight)
        sums = sums + mx.stack([out.diffusion, out.encoder, out.diffusion_tokens, out.encoder_tokens]).astype(mx.float32)
        mx.eval(sums)
        if progress_callback is not None:
            progress_callback()
    sums = mx.distributed.all_sum(sums, stream=mx.cpu)
    p = _parts(sums.tolist())
    p["loss"] = p["diffusion"] + args.encoder_loss_weight * p["encoder"]
    return p


@contextmanager
def buffer_cache_for_training() -> Iterator[None]:
    """Let MLX's CPU allocator keep what a training step frees, for the next step.

    MLX 0.32's CPU allocator caches at most 32 MB of freed buffers (on Metal the limit is
    the memory limit). A training step frees and reallocates its activations every
    iteration (0.47 GB a process for the Sudoku recipe), so past 32 MB they went back to
    malloc: glibc's ``_int_malloc`` was 5% of a training process's samples, 2.6% with
    this. The Sudoku step, two trees in one sitting: 0.75 / 0.81 s against 0.86 / 0.84 s
    in the first sittings, the same within 3% in the last ones (benchmarks/sudoku/README.md).
    The step's shapes repeat, so its cache holds what the next step reuses and stays under
    the step's own peak. The limit is restored afterwards."""
    if not runtime.cpu_allocator():
        yield
        return
    before = mx.set_cache_limit(mx.get_memory_limit())
    try:
        yield
    finally:
        mx.set_cache_limit(before)


def train(
    model: Model,
    optimizer: optim.Optimizer,
    train_dataset: Sequence[Example],
    val_dataset: Optional[Sequence[Example]] = None,
    args: TrainingArgs = TrainingArgs(),
    training_callback: Optional[TrainingCallback] = None,
    log=print,
    on_save: Optional[Callable[[int], None]] = None,
    weight_average: Optional[WeightAverage] = None,
) -> List[dict]:
    """Train ``model``'s trainable parameters; returns the reports (train and validation).

    Adapters are saved (atomically) to ``args.adapter_file`` every ``steps_per_save``
    iterations (counted with ``start_iteration``), with a numbered copy beside it, and at
    the end; ``args.optimizer_file`` gets the optimizer state with each. SIGINT (Ctrl-C) or
    SIGTERM stops the run after the current step, on every process at the same one
    (``tuner.stop``): it saves them (numbered too), says where, and raises
    ``KeyboardInterrupt``; a second signal stops at once, with a save. ``on_save(total
    iteration)`` runs after every save (process 0), so a caller can record which save is
    the last one on disk. ``weight_average`` takes in the weights after every optimizer
    update (every process; the caller saves it, e.g. from ``on_save``). On the CPU, MLX's
    buffer cache is raised for the run (``buffer_cache_for_training``).
    """
    with buffer_cache_for_training(), stop_requests() as stop:
        return _train(model, optimizer, train_dataset, val_dataset, args, training_callback, log, on_save,
                      weight_average, stop)


def _train(model, optimizer, train_dataset, val_dataset, args, training_callback, log, on_save,
           weight_average, stop: StopRequest) -> List[dict]:
    world = mx.distributed.init()
    size, rank = world.size(), world.rank()
    prepare_for_training(model)
    spec = batch_spec(model, args)
    sc = args.self_conditioning_p > 0
    accum = args.grad_accumulation_steps
    if accum < 1:
        raise ValueError("grad_accumulation_steps must be at least 1")
    log = log if rank == 0 else (lambda *a, **k: None)

    def loss_fn(model, batch, span):
        den = batch["denominators"]
        out = objective(model, batch, args.encoder_loss_weight, sc, (den[0], den[1]), args.grad_checkpoint, span,
                        args.corrupted_loss_weight)
        parts = mx.stack([out.diffusion, out.encoder, out.diffusion_tokens, out.encoder_tokens]).astype(mx.float32)
        # Each process divides by the global counts; average_gradients then divides by the
        # number of processes, which this undoes: the sum over processes is the global mean.
        return out.loss * size, parts

    loss_value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, span, prev_grad, do_update):
        (_, parts), grad = loss_value_and_grad(model, batch, span)
        if prev_grad is not None:
            grad = tree_map(lambda x, y: x + y, grad, prev_grad)
        if do_update:
            grad = average_gradients(grad)
            if args.grad_clip > 0:
                grad, _ = optim.clip_grad_norm(grad, args.grad_clip)
            optimizer.update(model, grad)
            grad = None
        return parts, grad

    history: List[dict] = []
    adapter_file = Path(args.adapter_file)

    def save(it: int, numbered: bool) -> None:
        if rank != 0:
            return
        total = it + args.start_iteration
        save_adapters(model, adapter_file)
        if numbered:
            save_adapters(model, numbered_adapter_file(adapter_file, total))
        if args.optimizer_file:
            save_optimizer_state(optimizer, args.optimizer_file, total)
        if on_save is not None:
            on_save(total)

    def validate(it: int) -> None:
        tic = time.perf_counter()
        v = evaluate(model, val_dataset, args.batch_size, args.val_batches, args)
        model.train()
        v = {"iteration": it, "val_loss": v["loss"], "val_diffusion_loss": v["diffusion"],
             "val_encoder_loss": v["encoder"], "val_time": time.perf_counter() - tic}
        history.append(v)
        log(f"Iter {it + args.start_iteration}: Val loss {v['val_loss']:.3f} (diffusion {v['val_diffusion_loss']:.3f}, "
            f"encoder {v['val_encoder_loss']:.3f}), Val took {v['val_time']:.3f}s", flush=True)
        if training_callback is not None:
            training_callback.on_val_loss_report(v)

    model.train()
    sums, n_tokens, steps, train_time, trained_tokens = mx.zeros((4,)), mx.array(0), 0, 0.0, 0
    grad_accum = None
    it = done = updates = 0  # done: the last iteration whose update is in the weights
    stopped = False
    batches = iterate_batches(train_dataset, args.batch_size, spec, loop=True, comm_group=world,
                              accumulation_steps=accum)
    try:
        for it, (batch, last) in zip(range(1, args.iters + 1), batches):
            at = it + args.start_iteration  # reports, evaluations and saves fall on the total's grid,
            # so a run resumed at any iteration reports where the uninterrupted one would
            if val_dataset and (it == 1 or at % args.steps_per_eval == 0 or it == args.iters):
                validate(it)
            tic = time.perf_counter()
            span = prefix_span(batch, args.pad_to)
            parts, grad_accum = step(batch, span, grad_accum, last or it == args.iters)
            # from here ``state`` holds this iteration's update (lazily: a Ctrl-C during the
            # eval below still saves it, since saving evaluates it)
            done = it
            if weight_average is not None and grad_accum is None:  # an update happened
                weight_average.update(model)
            sums = sums + parts
            n_tokens = n_tokens + batch["lengths"].sum()
            steps += 1
            updates += grad_accum is None
            # after an update; across processes every STOP_CHECK_EVERY updates (the sum is a
            # ring round trip; its cost per step measured 0-5% in order-swapped A/B rounds)
            check = grad_accum is None and it < args.iters and (size == 1 or updates % STOP_CHECK_EVERY == 0)
            stopping = stop.agreed(world) if check else None
            mx.eval(state, sums, n_tokens, grad_accum, weight_average.params if weight_average else None, stopping)
            train_time += time.perf_counter() - tic
            if check and stopping.item() > 0:
                stopped = True
                break

            if at % args.steps_per_report == 0 or it == args.iters:
                total = mx.distributed.all_sum(mx.concatenate([sums, n_tokens[None].astype(mx.float32)]),
                                               stream=mx.cpu).tolist()
                p = _parts(total[:4])
                toks = int(total[4])
                trained_tokens += toks
                r = {
                    "iteration": it,
                    "train_loss": p["diffusion"] + args.encoder_loss_weight * p["encoder"],
                    "diffusion_loss": p["diffusion"],
                    "encoder_loss": p["encoder"],
                    "learning_rate": optimizer.learning_rate.item(),
                    "iterations_per_second": steps / train_time,
                    "tokens_per_second": toks / train_time,
                    "trained_tokens": trained_tokens,
                    "peak_memory": mx.get_peak_memory() / 1e9,
                }
                history.append(r)
                log(f"Iter {at}: Train loss {r['train_loss']:.3f} (diffusion {r['diffusion_loss']:.3f}, "
                    f"encoder {r['encoder_loss']:.3f}), Learning Rate {r['learning_rate']:.3e}, "
                    f"It/sec {r['iterations_per_second']:.3f}, Tokens/sec {r['tokens_per_second']:.1f}, "
                    f"Trained Tokens {trained_tokens}, Peak mem {r['peak_memory']:.3f} GB", flush=True)
                if training_callback is not None:
                    training_callback.on_train_loss_report(r)
                sums, n_tokens, steps, train_time = mx.zeros((4,)), mx.array(0), 0, 0.0

            if at % args.steps_per_save == 0:
                save(it, numbered=True)
                log(f"Iter {at}: Saved adapter weights to {adapter_file} and "
                    f"{numbered_adapter_file(adapter_file, at)}.", flush=True)
    except KeyboardInterrupt:
        # the weights of the last iteration whose step returned (a Ctrl-C while a step is
        # traced leaves its update unapplied: ``state`` is assigned when the step returns)
        save(done, numbered=True)
        total = done + args.start_iteration
        log(f"\nInterrupted at iteration {total}: adapter weights saved to {adapter_file} and "
            f"{numbered_adapter_file(adapter_file, total)}.", flush=True)
        raise
    if stopped:
        save(done, numbered=True)
        if size > 1:  # no process leaves before the save is written (a launcher may end the others)
            mx.eval(mx.distributed.all_sum(mx.array(0.0), group=world, stream=mx.cpu))
        total = done + args.start_iteration
        log(f"\nStopped after iteration {total} ({stop.name}): adapter weights saved to {adapter_file} and "
            f"{numbered_adapter_file(adapter_file, total)}.", flush=True)
        raise KeyboardInterrupt
    save(it, numbered=(it + args.start_iteration) % args.steps_per_save != 0)
    log(f"Saved final weights to {adapter_file}.", flush=True)
    return history
