"""The drafter: denoise one canvas exactly as the reference's ``_denoising_step`` loop.

Per step ``n`` (counting DOWN from ``N = max_denoising_steps`` to 1):

1. decoder logits for the current canvas, self-conditioned on the previous step;
2. temperature ``t = t_min + (t_max - t_min) * n / N``; from ``logits / t``: a sample,
   the argmax and the per-position entropy (one fused pass: ``_sample_step``);
3. entropy-bound acceptance: sort the entropies ascending and accept the positions
   where ``cumsum(sorted) - sorted <= entropy_bound``; accepted positions take the
   sample, every other position gets a fresh uniform token (renoising);
4. rows that already stopped are frozen (argmax, canvas and self-conditioning kept);
5. a row stops when its argmax canvas equals the previous ``stability_threshold``
   argmax canvases of this block AND the mean entropy is below ``confidence_threshold``.

Three opt-in additions, none in the reference (without them, the tokens are the
reference's): canvas constraints (``constraints``: per row ``{position: token}`` pinned
through every step, see :class:`CanvasPins`), the confidence-threshold acceptance rule
(``DenoiseSettings.sampler = "confidence"``, see :func:`confidence_mask`) and greedy
acceptance (``DenoiseSettings.greedy``: accepted positions take the argmax).

The committed block is the LAST ARGMAX canvas. All randomness comes from ``rng``:
the initial canvas from ``CANVAS`` (step 0), the Gumbel noise from ``SAMPLE`` and the
renoising tokens from ``RENOISE`` (both keyed by the reference's counting-down step).

One deliberate difference: the reference feeds ``processed_logits.to(embedding dtype)``
to the next step and the decoder takes their softmax. We build the self-conditioning
signal directly from the step's log-sum-exp (``probabilities``), so no second softmax
reduction over the vocabulary; for float32 weights this is the same computation, for
bf16 weights it skips the reference's rounding of the logits to bf16 before the softmax.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from . import rng
from .sampling import StepSample, probabilities, temperature

# ---------------------------------------------------------------------------------------
# Sampling indirection: the ONE place that picks the per-step sampling implementation.
# mlx_dgemma.kernels.sample_step: the fused Metal/CUDA kernel where one runs and passes its
# self-check, else sample_step_mlx (same semantics). Callers may also pass ``sample_fn=``.
from .kernels import sample_step as _sample_step  # noqa: E402
from .kernels import soft_embeddings as _soft_embeddings  # noqa: E402
from .errors import ConstraintError, SettingsError  # noqa: F401  (raised here; defined with the others)
# ---------------------------------------------------------------------------------------

SampleFn = Callable[[mx.array, float, mx.array], StepSample]


SAMPLERS = ("entropy-bound", "confidence")


# The reference's global defaults (DiffusionGemmaGenerationConfig._get_default_generation_params).
_DEFAULTS = dict(
    max_denoising_steps=48,
    entropy_bound=0.1,
    t_min=0.4,
    t_max=0.8,
    stability_threshold=1,
    confidence_threshold=0.005,
)


@dataclass
class DenoiseSettings:
    """How one canvas is denoised (the reference's diffusion parameters).

    ``stability_threshold`` or ``confidence_threshold`` set to ``None`` disables adaptive
    stopping (every block then runs ``max_denoising_steps`` steps), as in the reference.
    ``sc_top_k`` (opt-in, not in the reference): build the self-conditioning signal from
    the ``k`` most likely tokens only (their exact probabilities; the tail mass on the mean
    embedding row: ``mlx_dgemma.kernels.topk_soft_embeddings``).
    ``greedy`` (opt-in, not in the reference): accepted positions take the argmax of the
    step's distribution instead of a sample from it (entropies, acceptance and renoising
    are unchanged), so the only randomness left is the initial canvas and the renoising.
    """

    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: Optional[int] = 1
    confidence_threshold: Optional[float] = 0.005
    sc_top_k: Optional[int] = None
    sampler: str = "entropy-bound"
    threshold: float = 0.9
    greedy: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> "DenoiseSettings":
        def num(name, v):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise SettingsError(f"{name} must be a finite number, got {v!r}")
            return float(v)

        def integer(name, v):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) and not (
                isinstance(v, float) and v.is_integer()
            ):
                raise SettingsError(f"{name} must be an integer, got {v!r}")
            return int(v)

        self.max_denoising_steps = integer("max_denoising_steps", self.max_denoising_steps)
        if self.max_denoising_steps < 1:
            raise SettingsError(f"max_denoising_steps must be >= 1, got {self.max_denoising_steps}")
        self.entropy_bound = num("entropy_bound", self.entropy_bound)
        if self.entropy_bound <= 0:
            raise SettingsError(f"entropy_bound must be > 0, got {self.entropy_bound}")
        self.t_min, self.t_max = num("t_min", self.t_min), num("t_max", self.t_max)
        if self.t_min < 0:
            raise SettingsError(f"t_min must be >= 0, got {self.t_min}")
        if self.t_max <= self.t_min:
            raise SettingsError(f"t_max must be > t_min, got t_max={self.t_max}, t_min={self.t_min}")
        if self.stability_threshold is not None:
            self.stability_threshold = integer("stability_threshold", self.stability_threshold)
            if self.stability_threshold < 0:
                raise SettingsError(f"stability_threshold must be >= 0, got {self.stability_threshold}")
        if self.confidence_threshold is not None:
            self.confidence_threshold = num("confidence_threshold", self.confidence_threshold)
            if self.confidence_threshold <= 0:
                raise SettingsError(f"confidence_threshold must be > 0, got {self.confidence_threshold}")
        if self.sc_top_k is not None:
            self.sc_top_k = integer("sc_top_k", self.sc_top_k)
            if self.sc_top_k < 1:
                raise SettingsError(f"sc_top_k must be >= 1, got {self.sc_top_k}")
        if self.sampler not in SAMPLERS:
            raise SettingsError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        self.threshold = num("threshold", self.threshold)
        if not 0 <= self.threshold <= 1:
            raise SettingsError(f"threshold must be in [0, 1], got {self.threshold}")
        if not isinstance(self.greedy, (bool, np.bool_)):
            raise SettingsError(f"greedy must be true or false, got {self.greedy!r}")
        self.greedy = bool(self.greedy)
        return self

    @property
    def adaptive_stopping(self) -> bool:
        return self.stability_threshold is not None and self.confidence_threshold is not None

    @classmethod
    def from_generation_config(
        cls, config: Union[Mapping[str, Any], str, Path, None] = None, **overrides: Any
    ) -> "DenoiseSettings":
        """Settings from generation_config.json (a dict, the file, or its model folder), then
        the reference's defaults; keyword ``overrides`` win (``None`` values are ignored).

        ``entropy_bound`` may sit at the top level or under ``sampler_config``.
        """
        cfg = load_generation_config(config) if not isinstance(config, Mapping) else dict(config)
        values: Dict[str, Any] = dict(_DEFAULTS)
        sampler = cfg.get("sampler_config")
        if isinstance(sampler, Mapping) and sampler.get("entropy_bound") is not None:
            values["entropy_bound"] = sampler["entropy_bound"]
        for f in fields(cls):
            if cfg.get(f.name) is not None:
                values[f.name] = cfg[f.name]
        names = {f.name for f in fields(cls)}
        for k, v in overrides.items():
            if k not in names:
                raise SettingsError(f"unknown sampler setting {k!r} (expected one of {', '.join(sorted(names))})")
            if v is not None:
                values[k] = v
        return cls(**values)


def load_generation_config(path: Union[str, Path, None]) -> Dict[str, Any]:
    """generation_config.json as a dict: from the file or its folder; {} when absent."""
    if path is None:
        return {}
    p = Path(path)
    if p.is_dir():
        p = p / "generation_config.json"
    if not p.is_file():
        return {}
    try:
        cfg = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SettingsError(f"{p}: not valid JSON ({e})".splitlines()[0]) from None
    if not isinstance(cfg, dict):
        raise SettingsError(f"{p}: expected a JSON object")
    return cfg


class Draft(NamedTuple):
    """The state after one denoising step (what ``on_draft`` receives)."""

    block: int
    step: int  # 1-based loop iteration within the block
    remaining: int  # the reference's counting-down step n (N .. 1)
    tokens: mx.array  # [B, L] int32, the argmax canvas (the reference's draft)
    accepted: np.ndarray  # [B] positions accepted at this step
    mean_entropy: np.ndarray  # [B] mean entropy of softmax(logits / t)
    finished: np.ndarray  # [B] bool, rows that stopped denoising


@dataclass
class BlockResult:
    tokens: mx.array  # [B, L] int32: the committed block (the last argmax canvas)
    passes: np.ndarray  # [B] decoder passes counted as the reference counts them
    steps: int  # loop iterations run for the whole batch
    stopped: np.ndarray  # [B] bool: the row stopped early (stable and confident)
    mean_entropy: np.ndarray  # [B] at the row's last counted step
    canvas: mx.array = field(repr=False, default=None)  # the last (renoised) canvas



class StableAndConfident:
    """The reference's StableAndConfidentStoppingCriteria for one block (fresh per block).

    A row stops when its argmax canvas equals each of the previous ``stability_threshold``
    argmax canvases of the block (``0``: always stable) AND its mean entropy is below
    ``confidence_threshold``. Either being ``None`` disables stopping.
    """

    def __init__(self, stability_threshold: Optional[int], confidence_threshold: Optional[float]):
        self.enabled = stability_threshold is not None and confidence_threshold is not None
        self.S = stability_threshold or 0
        self.confidence = confidence_threshold
        # None stands for the reference's history initialised to -1 (never equal).
        self.history: deque = deque([None] * self.S, maxlen=self.S or None)

    def __call__(self, argmax: mx.array, mean_entropy: np.ndarray) -> np.ndarray:
        B = argmax.shape[0]
        stable = np.ones(B, bool)
        if self.S:
            for h in self.history:
                stable &= np.zeros(B, bool) if h is None else np.array((h == argmax).all(-1))
            self.history.append(argmax)
        return stable & (np.asarray(mean_entropy) < self.confidence)


def initial_canvas(seeds: Sequence[int], block: int, length: int, vocab_size: int) -> mx.array:
    """The block's starting canvas, uniform over the whole vocabulary."""
    return rng.random_tokens(rng.position_keys(seeds, rng.CANVAS, block, 0, length), vocab_size)


def entropy_bound_mask(entropy: mx.array, bound: float) -> mx.array:
    """[B, L] bool: the reference's EntropyBoundSampler.accept_canvas selection.

    Sort ascending; accept where ``cumsum(sorted) - sorted <= bound`` (written as the
    reference writes it, not as an exclusive cumsum, so rounding matches too).
    """
    order = mx.argsort(entropy, axis=-1)
    s = mx.take_along_axis(entropy, order, axis=-1)
    sel = (mx.cumsum(s, axis=-1) - s) <= bound
    return mx.put_along_axis(mx.zeros(sel.shape, dtype=mx.bool_), order, sel, axis=-1)


def confidence_mask(confidence: mx.array, threshold: float, free: Optional[mx.array] = None) -> mx.array:
    """[B, L] bool: the confidence-threshold rule (Fast-dLLM; mlx-vlm's ``confidence-threshold``).

    Accept where the top probability exceeds ``threshold``, and at least the most confident
    position of each row (among the ``free`` ones, when some are pinned).
    """
    c = confidence if free is None else mx.where(free, confidence, -1.0)
    best = mx.arange(c.shape[-1])[None] == mx.argmax(c, axis=-1)[:, None]
    if free is not None:
        best = best & free
    return (c > threshold) | best


def top_probability(logits: mx.array, temp: float, sample: StepSample) -> mx.array:
    """[B, L] max of softmax(logits / t), from the step's argmax and log-sum-exp."""
    top = mx.take_along_axis(logits, sample.argmax[..., None], axis=-1)[..., 0].astype(mx.float32) / temp
    return mx.exp(top - sample.lse)


@dataclass
class CanvasPins:
    """Canvas constraints for one block: positions pinned to given tokens, per batch row.

    A pinned position holds its token through every step: it starts the block with it, is
    never renoised, is counted as accepted (its entropy counts as 0 in the entropy-bound
    rule and in the stopping criterion's mean entropy), its argmax (so the committed block)
    is the pinned token, and self-conditioning sees it as certain (a one-hot probability
    row, i.e. the token's own embedding) from the second step on; the first step takes the
    reference's no-self-conditioning path for the whole canvas. Every free position follows
    the reference's rule unchanged: with pinned entropies at 0 the entropy-bound selection
    over the free positions is exactly the reference's, and a row without pins is exactly
    the reference's.
    """

    mask: mx.array  # [B, L] bool
    tokens: mx.array  # [B, L] int32 (0 where free)
    _embeddings: Optional[mx.array] = field(default=None, repr=False)

    @classmethod
    def from_rows(
        cls, rows: Sequence[Optional[Mapping[int, int]]], length: int, vocab_size: int
    ) -> Optional["CanvasPins"]:
        """From one ``{position: token}`` per row (``None`` or ``{}``: nothing pinned);
        ``None`` when no row pins anything."""
        mask = np.zeros((len(rows), length), bool)
        toks = np.zeros((len(rows), length), np.int32)
        for b, row in enumerate(rows):
            for pos, tok in (row or {}).items():
                if isinstance(pos, bool) or not isinstance(pos, (int, np.integer)) or not 0 <= pos < length:
                    raise ConstraintError(f"pinned position {pos!r} is outside the canvas [0, {length})")
                if isinstance(tok, bool) or not isinstance(tok, (int, np.integer)) or not 0 <= tok < vocab_size:
                    raise ConstraintError(f"pinned token {tok!r} at position {pos} is outside the vocabulary [0, {vocab_size})")
                mask[b, pos], toks[b, pos] = True, tok
        if not mask.any():
            return None
        return cls(mx.array(mask), mx.array(toks))

    def embeddings(self, model) -> mx.array:
        """[B, L, H]: the self-conditioning signal of a one-hot row (the token's embedding
        times the embedding scale; ``onehot @ E`` is exactly that row)."""
        if self._embeddings is None:
            self._embeddings = model.embed(self.tokens)
        return self._embeddings

    def canvas(self, canvas: mx.array) -> mx.array:
        return mx.where(self.mask, self.tokens, canvas)


def block_constraints(constraints: Optional[Mapping[int, int]], block: int, length: int) -> Dict[int, int]:
    """The part of a row's constraints (keyed by offset in the generated tokens) that falls
    in block ``block``, keyed by canvas position."""
    lo = block * length
    return {int(p) - lo: int(t) for p, t in (constraints or {}).items() if lo <= int(p) < lo + length}


class StepUpdate(NamedTuple):
    canvas: mx.array  # [B, L] the next canvas: accepted samples, fresh noise elsewhere
    argmax: mx.array  # [B, L] the step's argmax canvas (the draft)
    accept: mx.array  # [B, L] bool
    self_conditioning: mx.array  # [B, L, H] the next step's signal
    mean_entropy: mx.array  # [B] for the stopping criterion


def self_conditioning(model, logits: mx.array, temp: float, sample: StepSample, settings: DenoiseSettings) -> mx.array:
    """The next step's self-conditioning embeddings from this step's logits (with the
    probabilities the sampling pass wrote, when it wrote them: the CPU kernel)."""
    probs = getattr(sample, "probs", None)
    if probs is not None:
        sample.probs = None  # used once; do not keep [B, L, V] alive through the next step
    return _soft_embeddings(model, logits, temp, sample.lse, top_k=settings.sc_top_k, probs=probs)


def update(
    model, logits: mx.array, temp: float, sample: StepSample, renoise: mx.array,
    settings: DenoiseSettings, pins: Optional[CanvasPins] = None,
) -> StepUpdate:
    """One step's acceptance, renoising and next self-conditioning signal (the drafter's
    and the server scheduler's shared step). Without pins and with the entropy-bound rule
    this is the reference's accept_canvas then renoise_canvas: accepted positions take the
    sample, every other position a fresh token (the current canvas survives nowhere)."""
    entropy = sample.entropy if pins is None else mx.where(pins.mask, 0.0, sample.entropy)
    if settings.sampler == "confidence":
        free = None if pins is None else ~pins.mask
        accept = confidence_mask(top_probability(logits, temp, sample), settings.threshold, free)
    else:
        accept = entropy_bound_mask(entropy, settings.entropy_bound)
    canvas = mx.where(accept, sample.argmax if settings.greedy else sample.sampled, renoise)
    argmax = sample.argmax
    sc = self_conditioning(model, logits, temp, sample, settings)
    if pins is not None:
        accept = accept | pins.mask
        canvas, argmax = pins.canvas(canvas), pins.canvas(argmax)
        sc = mx.where(pins.mask[..., None], pins.embeddings(model).astype(sc.dtype), sc)
    return StepUpdate(canvas, argmax, accept, sc, entropy.mean(-1))


def denoise_steps(
    model,
    cache,
    settings: DenoiseSettings,
    seeds: Sequence[int],
    block: int,
    sample_fn: Optional[SampleFn] = None,
    active: Optional[Sequence[bool]] = None,
    constraints: Optional[Sequence[Optional[Mapping[int, int]]]] = None,
    process: Optional[Callable[[mx.array, mx.array], mx.array]] = None,
) -> Iterator[Draft]:
    """Generator form of :func:`denoise_block`: yields a :class:`Draft` after every step
    and returns the :class:`BlockResult` (``result = yield from denoise_steps(...)``).

    ``active``: rows to denoise (default all). Inactive rows (sequences already finished)
    start frozen and are not counted as passes, as the reference counts them; their
    tokens are the initial canvas (the caller pads them anyway).
    ``constraints``: one ``{canvas position: token id}`` per row (or ``None``), pinned
    through every step (:class:`CanvasPins`).
    ``process(logits, draft)``: rewrites each step's decoder logits [B, L, V] given the
    previous step's argmax canvas (the initial canvas at the first step) before anything
    reads them (a grammar's masks: :mod:`mlx_dgemma.grammar`); None leaves them as they are.
    """
    sample_fn = sample_fn or _sample_step
    seeds = [int(s) for s in seeds]
    B, L, V = len(seeds), model.args.canvas_length, model.args.vocab_size
    if constraints is not None and len(constraints) != B:
        raise ConstraintError(f"{len(constraints)} constraint rows for a batch of {B}")
    pins = CanvasPins.from_rows(constraints, L, V) if constraints is not None else None
    N = settings.max_denoising_steps
    canvas = initial_canvas(seeds, block, L, V)
    if pins is not None:
        canvas = pins.canvas(canvas)
    argmax = canvas
    sc: Optional[mx.array] = None
    live = np.ones(B, bool) if active is None else np.asarray(active, bool).copy()
    if live.shape != (B,):
        raise ValueError(f"active has shape {live.shape}, expected ({B},)")
    finished = ~live  # the reference's finished_denoising | finished_sequences
    passes = np.zeros(B, np.int64)
    mean_entropy = np.full(B, np.nan, np.float32)
    stopper = StableAndConfident(settings.stability_threshold, settings.confidence_threshold)
    steps = 0
    for n in range(N, 0, -1):
        if finished.all():
            break
        passes += ~finished
        steps += 1
        t = temperature(n, N, settings.t_min, settings.t_max)
        logits = model.denoise(canvas, cache, self_conditioning_embeddings=sc)
        if process is not None:
            logits = process(logits, argmax)
        s = sample_fn(logits, t, rng.position_keys(seeds, rng.SAMPLE, block, n, L))
        renoise = rng.random_tokens(rng.position_keys(seeds, rng.RENOISE, block, n, L), V)
        u = update(model, logits, t, s, renoise, settings, pins)
        new_canvas, new_argmax, new_sc, accept = u.canvas, u.argmax, u.self_conditioning, u.accept
        if finished.any():  # freeze rows that stopped earlier
            fz = mx.array(finished)
            new_argmax = mx.where(fz[:, None], argmax, new_argmax)
            new_canvas = mx.where(fz[:, None], canvas, new_canvas)
            if sc is not None:
                new_sc = mx.where(fz[:, None, None], sc, new_sc)
        ent = u.mean_entropy
        mx.eval(new_canvas, new_argmax, new_sc, ent, accept)
        ent_np = np.array(ent)
        mean_entropy = np.where(finished, mean_entropy, ent_np)
        if stopper.enabled:
            # frozen rows are finished already, so their (stale) entropy cannot matter
            finished = finished | stopper(new_argmax, ent_np)
        canvas, argmax, sc = new_canvas, new_argmax, new_sc
        yield Draft(block, steps, n, argmax, np.array(accept.sum(-1)), mean_entropy.copy(), finished.copy())
    stopped = finished & live
    return BlockResult(argmax, passes, steps, stopped, mean_entropy, canvas)


def denoise_block(
    model,
    cache,
    settings: DenoiseSettings,
    seeds: Sequence[int],
    block: int,
    on_draft: Optional[Callable[[Draft], None]] = None,
    sample_fn: Optional[SampleFn] = None,
    active: Optional[Sequence[bool]] = None,
    constraints: Optional[Sequence[Optional[Mapping[int, int]]]] = None,
) -> BlockResult:
    """Denoise one canvas of ``canvas_length`` tokens for each of ``len(seeds)`` rows.

    ``cache`` holds every row's prefix (only read). ``block`` numbers the canvas within
    the generation (it keys the random streams). ``on_draft`` gets a :class:`Draft` after
    each step. Returns the committed block (the last argmax canvas) and the counts.
    """
    gen = denoise_steps(model, cache, settings, seeds, block, sample_fn=sample_fn, active=active,
                        constraints=constraints)
    while True:
        try:
            d = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_draft is not None:
            on_draft(d)
