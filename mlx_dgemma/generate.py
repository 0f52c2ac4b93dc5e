"""The block loop: prefill, then canvas after canvas, each committed block encoded.

Semantics follow the reference's ``DiffusionGemmaGenerationMixin.generate``:

- ``ceil(max_tokens / canvas_length)`` blocks at most (fewer if the context runs out);
- each block is denoised by :mod:`mlx_dgemma.drafter`; the committed block (the last
  argmax canvas) is finalised like ``_finalize_canvas``: a row whose block holds an EOS
  id is finished, every token after its first EOS becomes pad, and every later block of
  a finished row is all pad; generation stops when every row is finished;
- the committed block is encoded into the prefix cache at the START of the next block
  (as the reference does), so the final block is never encoded;
- ``tokens_per_forward`` is ``_compute_tokens_per_forward``: non-pad generated tokens
  divided by the row's decoder passes.

Text APIs (:func:`stream_generate`, :func:`generate`) trim the output to ``max_tokens``
tokens (the reference returns whole blocks); ``tokens_per_forward`` is still computed
over the whole blocks, exactly as the reference computes it.

``decode`` picks the decoding (default ``"diffusion"``: the block loop above).
``"ar"`` decodes with the encoder alone, one token per forward, and ``"verified"``
writes exactly the same tokens, the decoder drafting blocks that the encoder verifies
(:mod:`mlx_dgemma.verify`; token-level loop: :func:`generate_steps`).

Run ``python -m mlx_dgemma.generate --help`` for the command line (:mod:`mlx_dgemma.cli`).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .cache import PrefixCache
from .drafter import (
    BlockResult,
    ConstraintError,
    DenoiseSettings,
    Draft,
    SettingsError,
    block_constraints,
    denoise_steps,
    load_generation_config,
)
from .verify import DECODE_MODES, EncoderRule, Step, decode_steps
from .errors import GenerateInputError  # noqa: F401  (raised here; defined with the others)



# ---------------------------------------------------------------------------------------
# Reference pieces (pure functions, tested against the reference's own methods)


def finalize_block(
    tokens: np.ndarray, finished: np.ndarray, eos_token_ids: Sequence[int], pad_token_id: Optional[int]
):
    """The reference's ``_finalize_canvas`` on one committed block.

    ``tokens`` [B, L] (copied), ``finished`` [B] rows finished in earlier blocks.
    Returns ``(tokens, finished)`` after this block.
    """
    tokens = np.array(tokens, copy=True)
    eos = np.asarray(list(eos_token_ids or []), dtype=np.int64)
    this = np.isin(tokens, eos).any(-1) if eos.size else np.zeros(len(tokens), bool)
    prev = np.asarray(finished, bool)
    now = prev | this
    if pad_token_id is not None and now.any():
        tokens[prev] = pad_token_id
        if eos.size and this.any():
            is_eos = np.isin(tokens, eos)
            cs = np.cumsum(is_eos, axis=-1)
            tokens[(cs > 0) & ~((cs == 1) & is_eos)] = pad_token_id
    return tokens, now


def tokens_per_forward(generated: np.ndarray, passes: np.ndarray, pad_token_id: Optional[int]) -> np.ndarray:
    """The reference's ``_compute_tokens_per_forward``: non-pad generated tokens / passes."""
    generated = np.asarray(generated)
    if pad_token_id is not None:
        valid = (generated != pad_token_id).sum(-1)
    else:
        valid = np.full(generated.shape[0], generated.shape[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        return valid / np.asarray(passes, dtype=np.float64)


# ---------------------------------------------------------------------------------------
# Canvas constraints: pinned tokens by offset in the generated sequence


Constraints = Mapping[int, int]  # offset in the generated tokens (0 = the first) -> token id


def check_constraints(constraints: Optional[Constraints], max_tokens: int, vocab_size: int) -> Dict[int, int]:
    """``{offset: token}`` as plain ints, each offset in [0, max_tokens) and token in the
    vocabulary (one-line errors)."""
    out: Dict[int, int] = {}
    for p, t in (constraints or {}).items():
        if isinstance(p, str) and p.strip().lstrip("-").isdigit():
            p = int(p)  # JSON object keys
        if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or not 0 <= p < max_tokens:
            raise GenerateInputError(f"constraint offset {p!r} is outside the generated tokens [0, {max_tokens})")
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab_size:
            raise GenerateInputError(f"constraint token {t!r} at offset {p} is outside the vocabulary [0, {vocab_size})")
        out[int(p)] = int(t)
    return out


def template_constraints(tokenizer, template: str, hole: str = "_") -> Dict[int, int]:
    """Constraints from a template with holes: every ``hole`` marker is one free position,
    the text between holes is tokenized and pinned at the positions it takes.

    ``'{"name": "____", "age": __}'`` pins the JSON punctuation and leaves four tokens for the
    name and two for the age. Each piece of text is tokenized on its own (with a BPE
    vocabulary a piece can tokenize differently than inside a longer text); special-token
    text such as ``<turn|>`` becomes that special token. Positions after the template stay
    free.
    """
    if not isinstance(template, str) or not template:
        raise GenerateInputError("canvas template is empty")
    if not hole:
        raise GenerateInputError("the hole marker is empty")
    out: Dict[int, int] = {}
    pos = 0
    parts = template.split(hole)
    for i, part in enumerate(parts):
        if part:
            for t in tokenizer.encode(part, add_special_tokens=False):
                out[pos] = int(t)
                pos += 1
        if i < len(parts) - 1:
            pos += 1  # the hole
    return out


# ---------------------------------------------------------------------------------------
# The token-level loop (what the server uses)


@dataclass
class Block:
    """One committed block of a :func:`generate_blocks` run (all arrays per batch row)."""

    index: int
    tokens: np.ndarray  # [B, L] int32, finalised (pad after the first EOS)
    steps: int  # denoising iterations of this block
    passes: np.ndarray  # [B] decoder passes in this block (reference counting)
    total_passes: np.ndarray  # [B] over all blocks so far
    stopped_early: np.ndarray  # [B] bool, stable-and-confident stop in this block
    finished: np.ndarray  # [B] bool, an EOS has been committed (this or an earlier block)
    tokens_per_forward: np.ndarray  # [B] over all blocks so far (reference formula)
    prompt_tokens: int  # tokens encoded before the first block (new tokens only)
    prompt_time: float  # seconds to encode them
    elapsed: float  # seconds since the prompt was encoded
    last: bool  # no further block will follow
    encoder_passes: Optional[int] = None  # constrained diffusion: encoder forwards so far (commits, repairs)
    forced: int = 0  # constrained diffusion: tokens the grammar forced so far


def _as_batch(prompt_tokens) -> mx.array:
    if isinstance(prompt_tokens, mx.array):
        a = prompt_tokens
    else:
        a = mx.array(np.asarray(prompt_tokens, dtype=np.int32))
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2:
        raise GenerateInputError(f"prompt tokens must be [T] or [B, T], got shape {tuple(a.shape)}")
    return a.astype(mx.int32)


def plan_blocks(model, new_tokens: int, cached: int, max_tokens: int) -> int:
    """How many blocks to run: ceil(max_tokens / L), capped by max_position_embeddings."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
        raise GenerateInputError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    L, ctx = model.args.canvas_length, model.args.max_position_embeddings
    used = cached + new_tokens
    fit = (ctx - used) // L
    if fit < 1:
        raise GenerateInputError(
            f"prompt of {used} tokens leaves no room for a {L}-token canvas in the model's context "
            f"of {ctx} tokens (max_position_embeddings)"
        )
    return min(math.ceil(max_tokens / L), fit)


def _events(
    model,
    prompt_tokens,
    cache=None,
    settings: Optional[DenoiseSettings] = None,
    max_tokens: int = 256,
    seeds: Union[int, Sequence[int]] = 0,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: Optional[int] = 0,
    sample_fn=None,
    constraints: Optional[Sequence[Optional[Constraints]]] = None,
    image_features: Optional[mx.array] = None,
) -> Iterator[Union[Draft, Block]]:
    tokens = _as_batch(prompt_tokens)
    B, T = tokens.shape
    seeds = [int(seeds)] * B if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]
    if len(seeds) != B:
        raise GenerateInputError(f"{len(seeds)} seeds for a batch of {B} prompts")
    if cache is None:
        if T == 0:
            raise GenerateInputError("empty prompt: nothing to generate from")
        cache = model.make_cache()
    settings = settings or DenoiseSettings()
    n_blocks = plan_blocks(model, T, cache.offset, max_tokens)
    L = model.args.canvas_length
    if constraints is not None:
        if len(constraints) != B:
            raise GenerateInputError(f"{len(constraints)} constraint rows for a batch of {B} prompts")
        constraints = [check_constraints(c, n_blocks * L, model.args.vocab_size) for c in constraints]
    finished = np.zeros(B, bool)
    total_passes = np.zeros(B, np.int64)
    generated: List[np.ndarray] = []
    pending = tokens if T else None
    prompt_time, t_start = 0.0, time.perf_counter()
    for b in range(n_blocks):
        if pending is not None:
            t0 = time.perf_counter()
            if b == 0 and image_features is not None:
                model.encode(pending, cache, image_features=image_features)
            else:
                model.encode(pending, cache)
            mx.eval([c.state for c in cache])
            if b == 0:
                prompt_time = time.perf_counter() - t0
                t_start = time.perf_counter()
        pinned = None if constraints is None else [block_constraints(c, b, L) for c in constraints]
        res: BlockResult = yield from denoise_steps(
            model, cache, settings, seeds, b, sample_fn=sample_fn, active=~finished, constraints=pinned
        )
        block, finished = finalize_block(np.array(res.tokens), finished, eos_token_ids, pad_token_id)
        total_passes = total_passes + res.passes
        generated.append(block)
        last = bool(finished.all()) or b == n_blocks - 1
        yield Block(
            index=b,
            tokens=block.astype(np.int32),
            steps=res.steps,
            passes=res.passes,
            total_passes=total_passes.copy(),
            stopped_early=res.stopped,
            finished=finished.copy(),
            tokens_per_forward=tokens_per_forward(np.concatenate(generated, -1), total_passes, pad_token_id),
            prompt_tokens=T,
            prompt_time=prompt_time,
            elapsed=time.perf_counter() - t_start,
            last=last,
        )
        if last:
            return
        pending = mx.array(block.astype(np.int32))
        assert pending.shape == (B, L)


def grammar_blocks(
    model,
    prompt_tokens,
    matcher,
    settings: Optional[DenoiseSettings] = None,
    max_tokens: int = 256,
    seed: int = 0,
    eos_token_ids: Sequence[int] = (),
    sample_fn=None,
    cache: Optional[PrefixCache] = None,
) -> Iterator[Union[Draft, Block]]:
    """Block diffusion under a grammar, for one prompt: yields each denoising step's
    :class:`Draft` and one :class:`Block` per canvas. ``prompt_tokens``: the tokens not
    yet in ``cache`` (None: a fresh cache; else one holding a prefix, continued in place).

    The run of tokens the grammar forces is committed as it stands where it fills whole
    canvases (no denoising is spent on those), and pinned at the start of the next canvas
    (:class:`~mlx_dgemma.drafter.CanvasPins`) for the rest. Each canvas continues the
    committed reply and is denoised as usual, except that at every step the decoder's logits are masked by the grammar at each
    position up to and including the first position where the previous step's draft
    stops being valid (``Matcher.canvas_process``). The canvas is committed from the left
    as far as the grammar accepts it. Where a token is invalid, the committed part is
    encoded and the encoder's greedy choice among the allowed tokens replaces it (one
    encoder forward); the next canvas starts right after. A stop token is allowed only
    where the reply is complete.

    So every committed block is a valid prefix of the grammar, and a finished reply (a
    stop token, or a grammar that admits nothing more) is a complete match. The cost: a
    canvas commits its valid prefix plus one repaired token, so a canvas that goes wrong
    early commits few tokens (on random weights, about one per masked step).
    """
    from .verify import EncoderRule, advance_tokens, constrained_choice, prefill

    ids = _as_rows(prompt_tokens)
    if len(ids) != 1 or len(ids[0]) == 0:
        raise GenerateInputError("grammar_blocks takes one non-empty prompt")
    settings = settings or DenoiseSettings()
    L, ctx, V = model.args.canvas_length, model.args.max_position_embeddings, model.args.vocab_size
    cache = model.make_cache() if cache is None else cache
    used = cache.offset + len(ids[0])
    if used + L > ctx:
        raise GenerateInputError(f"prompt of {used} tokens leaves no room for a {L}-token canvas in the "
                                 f"model's context of {ctx} tokens (max_position_embeddings)")
    eos = [int(e) for e in eos_token_ids]
    greedy = EncoderRule("greedy")
    t0 = time.perf_counter()
    logits = prefill(model, cache, ids[0][None])[0]
    prompt_time, t_start = time.perf_counter() - t0, time.perf_counter()
    generated: List[int] = []
    unencoded: List[int] = []  # committed, not yet in the cache
    passes = enc = forced = 0

    def encoder_pick(pending: List[int]) -> int:
        """Encode ``pending`` (committed, not yet in the cache), then the encoder's greedy
        choice among the tokens the grammar allows next, consumed."""
        nonlocal logits, enc
        if pending:
            logits = advance_tokens(model, cache, pending)
            enc += 1
        c = constrained_choice(logits, cache.offset, seed, greedy, matcher)
        matcher.consume([c])
        return c

    b = 0
    while True:
        res = None
        # The run the grammar forces here: whole canvases of it are committed as they stand
        # (no denoising is spent on them; the next canvas is encoded after them, in one
        # forward), the rest is pinned at the start of the next canvas, which so keeps the
        # block alignment the model was trained with.
        run = matcher.forced()[: max_tokens - len(generated)]
        new = run[: len(run) // L * L]
        matcher.consume(new)
        forced += len(new)
        unencoded += new
        pins = dict(enumerate(run[len(new):]))
        room = max_tokens - len(generated) - len(new)
        if (matcher.done and not eos) or room <= 0 or cache.offset + len(unencoded) + L > ctx:
            pass  # nothing more to write (complete without a stop token, no room)
        elif matcher.done:  # complete: only a stop token may follow, the encoder picks which
            c = encoder_pick(unencoded)
            new.append(c)
            unencoded = [c]
        else:
            if unencoded:
                logits = advance_tokens(model, cache, unencoded)
                enc += 1
                unencoded = []
            res = yield from denoise_steps(model, cache, settings, [seed], b, sample_fn=sample_fn,
                                           constraints=[pins] if pins else None,
                                           process=matcher.canvas_process(room))
            passes += int(res.passes[0])
            toks = [int(t) for t in np.array(res.tokens)[0][:room]]
            k = matcher.valid_prefix(toks)
            canvas = toks[:k]
            matcher.consume(canvas)
            forced += min(len(pins), k)
            if (canvas and canvas[-1] in eos) or k == len(toks) or matcher.done:
                unencoded = list(canvas)  # the whole canvas (as far as the room goes) stands
            else:  # repair the first invalid token through the encoder
                c = encoder_pick(canvas)
                canvas.append(c)
                unencoded = [c]
            new += canvas
        reason_stop = bool(new and new[-1] in eos) or (matcher.done and not eos)
        generated += new
        last = reason_stop or len(generated) >= max_tokens or not new or cache.offset + len(unencoded) + L > ctx
        gen = np.asarray(generated, np.int64)
        yield Block(
            index=b, tokens=np.asarray([new], np.int32).reshape(1, len(new)), steps=res.steps if res else 0,
            passes=np.array([int(res.passes[0]) if res else 0]), total_passes=np.array([passes]),
            stopped_early=np.array([bool(res.stopped[0]) if res else False]), finished=np.array([reason_stop]),
            tokens_per_forward=np.array([len(gen) / passes if passes else 0.0]),
            prompt_tokens=len(ids[0]), prompt_time=prompt_time, elapsed=time.perf_counter() - t_start, last=last,
            encoder_passes=enc, forced=forced,
        )
        if last:
            return
        b += 1


def generate_blocks(
    model,
    prompt_tokens,
    cache=None,
    settings: Optional[DenoiseSettings] = None,
    max_tokens: int = 256,
    seeds: Union[int, Sequence[int]] = 0,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: Optional[int] = 0,
    on_draft: Optional[Callable[[Draft], None]] = None,
    sample_fn=None,
    constraints: Optional[Sequence[Optional[Constraints]]] = None,
    image_features: Optional[mx.array] = None,
) -> Iterator[Block]:
    """Generate block by block from token ids; yields one :class:`Block` per committed block.

    ``prompt_tokens``: [T] or [B, T] (list or mx.array): the tokens NOT yet in ``cache``.
    ``cache``: a :class:`~mlx_dgemma.cache.PrefixCache` that may already hold a prefix
    (multi-turn); only the new tokens are encoded. ``seeds``: one per row (an int: the same
    seed for every row). Block ``b`` of the call keys the random streams with ``b``.
    ``constraints``: canvas constraints, one ``{offset: token id}`` per row (or ``None``),
    the offset counting generated tokens from 0 across blocks (block ``b`` gets the offsets
    ``b * L .. b * L + L - 1``); those tokens are pinned through every denoising step
    (``drafter.CanvasPins``). ``image_features``: the soft tokens of the images in a
    one-row prompt (``Model.encode``; :func:`mlx_dgemma.images.prepare_images` makes them).

    On return the cache holds the prefix, the prompt and every committed block except
    the LAST one yielded (the reference encodes a block at the start of the next one), each
    finalised (pad after the first EOS, all pad for rows finished earlier). To continue a
    conversation, encode the last block (or its non-pad part) yourself.
    """
    for ev in _events(model, prompt_tokens, cache, settings, max_tokens, seeds, eos_token_ids,
                      pad_token_id, sample_fn, constraints, image_features):
        if isinstance(ev, Block):
            yield ev
        elif on_draft is not None:
            on_draft(ev)


def _as_rows(prompt_tokens) -> List[np.ndarray]:
    """Prompts as one int32 array per row: [T], [B, T], or a list of lists (lengths may differ)."""
    if isinstance(prompt_tokens, mx.array):
        prompt_tokens = np.array(prompt_tokens)
    if isinstance(prompt_tokens, np.ndarray):
        if prompt_tokens.ndim not in (1, 2):
            raise GenerateInputError(f"prompt tokens must be [T], [B, T] or a list of token lists, got shape {prompt_tokens.shape}")
        return [r.astype(np.int32) for r in np.atleast_2d(prompt_tokens)]
    items = list(prompt_tokens)
    if items and all(isinstance(t, (int, np.integer)) for t in items):
        items = [items]
    try:
        return [np.asarray(r, dtype=np.int32).reshape(-1) for r in items]
    except (TypeError, ValueError):
        raise GenerateInputError("prompt tokens must be [T], [B, T] or a list of token lists") from None


def generate_steps(
    model,
    prompt_tokens,
    decode: str = "verified",
    verify: str = "greedy",
    temperature: float = 1.0,
    cache=None,
    draft_settings: Optional[DenoiseSettings] = None,
    max_tokens: int = 256,
    seeds: Union[int, Sequence[int]] = 0,
    eos_token_ids: Sequence[int] = (),
    on_draft: Optional[Callable[[Draft], None]] = None,
    draft_fn=None,
    sample_fn=None,
    matchers=None,
) -> Iterator[Step]:
    """``decode="ar"`` or ``"verified"`` from token ids; yields one
    :class:`~mlx_dgemma.verify.Step` per round (a token per row, or a verification).

    ``prompt_tokens``: [T], [B, T] or one list per row (lengths may differ): the tokens
    NOT yet in ``cache`` (None; a PrefixCache holding a prefix of one row, continued in
    place; or one cache per row). ``verify``: the encoder's rule, "greedy" or "sample"
    (at ``temperature``, noise keyed by seed and absolute position). ``draft_settings``:
    the drafter's settings for ``"verified"`` (its ``max_denoising_steps`` is the draft's
    step budget). On return each cache holds every committed token but the last.
    ``matchers``: one :class:`mlx_dgemma.grammar.Matcher` (or None) per row, whose
    tokens then follow its grammar (see :func:`mlx_dgemma.verify.decode_steps`).
    """
    for ev in _step_events(model, prompt_tokens, decode, verify, temperature, cache, draft_settings, max_tokens,
                           seeds, eos_token_ids, draft_fn, sample_fn, matchers):
        if isinstance(ev, Step):
            yield ev
        elif on_draft is not None:
            on_draft(ev)


def _step_events(model, prompt_tokens, decode, verify, temperature, cache, draft_settings, max_tokens, seeds,
                 eos_token_ids, draft_fn, sample_fn, matchers=None) -> Iterator[Union[Draft, Step]]:
    if decode not in ("ar", "verified"):
        raise GenerateInputError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    try:
        rule = EncoderRule(verify, temperature)
    except SettingsError as e:
        raise GenerateInputError(str(e)) from None
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
        raise GenerateInputError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    rows = _as_rows(prompt_tokens)
    B = len(rows)
    if B == 0 or any(len(r) == 0 for r in rows):
        raise GenerateInputError(f"empty prompt: decode={decode!r} takes the encoder's logits from the last new token")
    seeds = [int(seeds)] * B if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]
    if len(seeds) != B:
        raise GenerateInputError(f"{len(seeds)} seeds for a batch of {B} prompts")
    if matchers is not None and len(matchers) != B:
        raise GenerateInputError(f"{len(matchers)} grammar matchers for a batch of {B} prompts")
    caches = [cache] if isinstance(cache, PrefixCache) else (None if cache is None else list(cache))
    if caches is not None and len(caches) != B:
        raise GenerateInputError(f"{len(caches)} caches for a batch of {B} prompts (expected one per row)")
    L, ctx = model.args.canvas_length, model.args.max_position_embeddings
    need = L if decode == "verified" else 1
    for b, r in enumerate(rows):
        used = len(r) + (caches[b].offset if caches is not None else 0)
        if used + need > ctx:
            what = f"a {L}-token canvas" if decode == "verified" else "a generated token"
            raise GenerateInputError(f"prompt of {used} tokens leaves no room for {what} in the model's context "
                                     f"of {ctx} tokens (max_position_embeddings)")
    return (yield from decode_steps(model, rows, decode, rule, cache, draft_settings or DenoiseSettings(), max_tokens,
                                    seeds, eos_token_ids, draft_fn=draft_fn, sample_fn=sample_fn,
                                    matchers=matchers))


# ---------------------------------------------------------------------------------------
# Text APIs


@dataclass
class GenerationResponse:
    """One item of :func:`stream_generate`.

    ``kind == "block"``: ``text``/``thought`` are the NEW answer/thought text of this
    block, ``tokens`` the block's kept tokens (with ``decode="verified"``: the tokens one
    verification committed; ``"ar"``: one token). ``kind == "draft"``: ``text`` is the
    whole current canvas decoded (the argmax draft), ``step`` the denoising step.

    ``tokens_per_forward`` is the reference's figure (tokens per decoder pass; 0 for
    ``"ar"``); ``tokens_per_model_forward`` counts every model forward after the prompt:
    decoder passes and encoder passes (the commit of each block, the verifications and
    the single-token passes of ``"verified"``, every token of ``"ar"``).
    """

    kind: str
    text: str
    thought: str
    tokens: List[int]
    block: int
    step: int
    steps: int  # denoising steps of this block (so far, for drafts)
    tokens_per_forward: float
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: Optional[str]  # "stop" (EOS), "length", or None while running
    total_steps: int = 0  # denoising steps over all blocks so far
    decode: str = "diffusion"
    model_forwards: int = 0  # decoder + encoder forwards after the prompt
    tokens_per_model_forward: float = 0.0
    verifications: int = 0  # drafts verified (decode="verified")
    accepted_per_verification: float = 0.0  # draft tokens accepted per verification
    forced_tokens: int = 0  # structured output: tokens the grammar forced (no forward of their own)
    mask_seconds: float = 0.0  # structured output: time spent computing the grammar's token masks
    masks: int = 0  # structured output: token masks computed


def generation_defaults(model) -> Dict[str, Any]:
    """generation_config.json of the model's folder (``model.path``), or {}."""
    path = getattr(model, "path", None)
    return load_generation_config(path) if path is not None else {}


def resolve_ids(model, gen_cfg: Dict[str, Any]):
    """EOS ids (a list) and the pad id: generation_config first, then config.json."""
    eos = gen_cfg.get("eos_token_id")
    if eos is None:
        eos = model.args.eos_token_ids
    eos = [int(e) for e in ([eos] if isinstance(eos, (int, np.integer)) else list(eos))]
    pad = gen_cfg.get("pad_token_id", model.args.pad_token_id)
    return eos, (None if pad is None else int(pad))


def make_settings(model, settings: Optional[DenoiseSettings] = None, **overrides) -> DenoiseSettings:
    if settings is not None:
        return settings
    try:
        return DenoiseSettings.from_generation_config(generation_defaults(model), **overrides)
    except SettingsError as e:
        raise GenerateInputError(str(e)) from None


def _peak_gb() -> float:
    try:
        return mx.get_peak_memory() / 1e9
    except Exception:  # backends without memory accounting
        return 0.0


def stream_generate(
    model,
    tokenizer,
    prompt,
    max_tokens: int = 256,
    seed: int = 0,
    steps: Optional[int] = None,
    entropy_bound: Optional[float] = None,
    t_min: Optional[float] = None,
    t_max: Optional[float] = None,
    settings: Optional[DenoiseSettings] = None,
    show_drafts: bool = False,
    sc_top_k: Optional[int] = None,
    chat_template: bool = True,
    thinking: bool = False,
    system: Optional[str] = None,
    sample_fn=None,
    sampler: Optional[str] = None,
    threshold: Optional[float] = None,
    constraints: Optional[Constraints] = None,
    canvas_template: Optional[str] = None,
    hole: str = "_",
    decode: str = "diffusion",
    verify: str = "greedy",
    draft_steps: Optional[int] = None,
    temperature: float = 1.0,
    draft_fn=None,
    images: Optional[Sequence[Any]] = None,
    max_image_pixels: Optional[int] = None,
    response_format: Optional[Mapping[str, Any]] = None,
    grammar: Any = None,
) -> Iterator[GenerationResponse]:
    """Generate text; yields one :class:`GenerationResponse` per committed block (and one
    per denoising step with ``show_drafts``).

    ``prompt``: a string (sent as a user turn through the chat template unless
    ``chat_template=False``), a list of chat messages, or token ids. ``steps``,
    ``entropy_bound``, ``t_min``, ``t_max`` override generation_config.json; ``sc_top_k``
    opts into top-k self-conditioning (``DenoiseSettings.sc_top_k``).
    ``thinking`` switches Gemma 4's thinking mode (``enable_thinking``); thought text comes
    in ``thought``, apart from the answer in ``text``. ``sampler="confidence"`` with
    ``threshold`` picks the confidence-threshold acceptance rule (default: the reference's
    entropy bound).

    Canvas constraints pin output tokens: ``constraints={offset: token id}`` (offset 0 is
    the first generated token), or ``canvas_template``: text whose ``hole`` markers (one
    per free token) are left to the model (:func:`template_constraints`); both may be
    given (``constraints`` wins where they overlap). Uses: fill-in-the-middle (pin the
    prefix and the suffix, leave holes between), JSON skeletons (pin the keys and
    punctuation), forms, a forced opening (pin the first tokens), Sudoku (pin the givens).

    ``decode``: ``"diffusion"`` (block diffusion, the default), ``"ar"`` (the encoder
    alone, token by token) or ``"verified"`` (the decoder drafts, the encoder verifies:
    the same tokens as ``"ar"``). ``verify``: the encoder's rule for both, ``"greedy"``
    or ``"sample"`` (at ``temperature``). ``draft_steps``: the verified draft's step
    budget (default: ``steps``, else generation_config.json). ``draft_fn``: see
    :func:`mlx_dgemma.verify.decode_steps`. Canvas constraints apply to ``"diffusion"``
    only (the encoder's own choices cannot be pinned).

    ``images``: image file paths, encoded bytes or PIL images (``decode="diffusion"``; a
    model folder with a vision tower). With a string prompt they come before the text in
    the user turn; chat messages place them with ``{"type": "image"}`` content parts, one
    per image, in order. ``max_image_pixels``: larger images are refused before
    decoding (default: ``image_processor.DEFAULT_MAX_PIXELS``).

    Structured output, in every decode mode: ``response_format`` (OpenAI's shape:
    ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {"schema":
    ...}}``) or ``grammar`` (a Lark grammar as text, or ``{"type": "regex", "regex": ...}``,
    ``{"type": "lark", "lark": ...}``, a :class:`mlx_dgemma.grammar.GrammarSpec`). The
    reply then matches it: every committed block is a valid prefix, a reply that ends
    with ``finish_reason="stop"`` is a complete match, one cut by ``max_tokens`` ends with
    ``"length"`` (a valid prefix). ``ar``/``verified`` mask the encoder's logits (verified
    still writes exactly what ar writes); ``diffusion``: :func:`grammar_blocks`. A bad
    schema or grammar raises :class:`GenerateInputError` before any model work.
    """
    from .chat import ThoughtParser, encode_prompt

    if isinstance(prompt, str) and not prompt.strip():
        raise GenerateInputError("empty prompt")
    if decode not in DECODE_MODES:
        raise GenerateInputError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    if decode != "diffusion" and (canvas_template is not None or constraints):
        raise GenerateInputError(f"canvas constraints apply to decode='diffusion' only, not {decode!r} "
                                 "(the encoder writes its own tokens)")
    spec = None
    if response_format is not None or grammar is not None:
        from .grammar import GrammarError, as_spec

        try:
            spec = as_spec(response_format, grammar)
        except GrammarError as e:
            raise GenerateInputError(str(e)) from None
        if spec is not None and (canvas_template is not None or constraints):
            raise GenerateInputError("canvas constraints and a grammar cannot be combined (the grammar decides "
                                     "every token)")
        if spec is not None and thinking:
            raise GenerateInputError("a grammar constrains the whole reply: switch thinking off")
        if spec is not None and images:
            raise GenerateInputError("images and a grammar cannot be combined yet (the constrained loops take no "
                                     "image soft tokens)")
    if decode == "verified" and draft_steps is not None:
        steps = draft_steps
    settings = make_settings(model, settings, max_denoising_steps=steps, entropy_bound=entropy_bound,
                             t_min=t_min, t_max=t_max, sc_top_k=sc_top_k, sampler=sampler, threshold=threshold)
    eos, pad = resolve_ids(model, generation_defaults(model))
    features, image_s = None, 0.0  # the images' soft tokens; seconds spent making them
    if images:
        from .chat import has_chat_template
        from .chat_template import IMAGE_TOKEN
        from .image_processor import ImageError
        from .images import expand_image_tokens, prepare_images, with_image_parts

        if decode != "diffusion":
            raise GenerateInputError(f"images apply to decode='diffusion' only, not {decode!r}")
        if isinstance(prompt, str) and not (chat_template and has_chat_template(tokenizer)):
            prompt = f"\n\n{IMAGE_TOKEN}\n\n" * len(images) + prompt
        else:
            prompt = with_image_parts(prompt, len(images))
        try:
            t0 = time.perf_counter()
            features, counts = prepare_images(model, list(images), max_pixels=max_image_pixels)
            image_s = time.perf_counter() - t0  # part of the prompt's processing (its stats)
            ids = expand_image_tokens(
                encode_prompt(tokenizer, prompt, chat_template=chat_template, thinking=thinking, system=system),
                counts, model.args)
        except ImageError as e:
            raise GenerateInputError(str(e)) from None
    else:
        ids = encode_prompt(tokenizer, prompt, chat_template=chat_template, thinking=thinking, system=system)
    if not ids:
        raise GenerateInputError("empty prompt")
    pinned: Optional[Dict[int, int]] = None
    if canvas_template is not None or constraints:
        pinned = template_constraints(tokenizer, canvas_template, hole) if canvas_template is not None else {}
        pinned.update(constraints or {})
        pinned = check_constraints(pinned, max_tokens, model.args.vocab_size)
    matcher = None
    if spec is not None:
        from .grammar import Grammar, GrammarError

        try:
            matcher = Grammar(spec, tokenizer, model.args.vocab_size, eos).matcher()
        except GrammarError as e:
            raise GenerateInputError(str(e)) from None
    parser = ThoughtParser(tokenizer, thinking=thinking, prompt_tokens=ids, stop_tokens=eos)
    kept: List[int] = []
    total_steps = 0
    stats = dict(prompt_tps=0.0, generation_tps=0.0, tpf=0.0)
    try:
        mx.reset_peak_memory()
    except Exception:  # backends without memory accounting
        pass

    if decode != "diffusion":
        yield from _stream_steps(model, tokenizer, ids, parser, settings, max_tokens, seed, eos, show_drafts,
                                 sample_fn, decode, verify, temperature, draft_fn, matcher)
        return
    if matcher is not None:
        events = grammar_blocks(model, ids, matcher, settings, max_tokens, seed, eos, sample_fn)
    else:
        events = _events(model, [ids], None, settings, max_tokens, seed, eos, pad, sample_fn,
                         None if pinned is None else [pinned], features)
    for ev in events:
        if isinstance(ev, Draft):
            if not show_drafts:
                continue
            canvas = [int(t) for t in np.array(ev.tokens[0])]
            yield GenerationResponse(
                kind="draft", text=tokenizer.decode(canvas, skip_special_tokens=True), thought="",
                tokens=canvas, block=ev.block, step=ev.step, steps=ev.step,
                tokens_per_forward=stats["tpf"], prompt_tokens=len(ids), prompt_tps=stats["prompt_tps"],
                generation_tokens=len(kept), generation_tps=stats["generation_tps"],
                peak_memory=_peak_gb(), finish_reason=None, total_steps=total_steps + ev.step,
            )
            continue
        total_steps += ev.steps
        row = [int(t) for t in ev.tokens[0]]
        new = row[: max_tokens - len(kept)]
        first = next((i for i, t in enumerate(new) if t in eos), None)
        hit_eos = first is not None
        if hit_eos:  # keep the EOS, drop what follows (pad, as _finalize_canvas made it)
            new = new[: first + 1]
        kept.extend(new)
        parser.feed(new)
        last = ev.last or len(kept) >= max_tokens or hit_eos
        grammar_done = bool(matcher is not None and ev.finished[0])  # complete (a stop token, or none needed)
        d = parser.deltas(final=last)
        prompt_s = ev.prompt_time + image_s
        stats["prompt_tps"] = ev.prompt_tokens / prompt_s if prompt_s > 0 else 0.0
        n_gen = sum(1 for t in kept if t != pad) if pad is not None else len(kept)
        stats["generation_tps"] = n_gen / ev.elapsed if ev.elapsed > 0 else 0.0
        stats["tpf"] = float(ev.tokens_per_forward[0])
        reason = None
        if last:
            reason = "stop" if hit_eos or grammar_done else "length"
        # decoder passes + the commits of earlier blocks (and a grammar's repairs)
        forwards = int(ev.total_passes[0]) + (ev.index if ev.encoder_passes is None else ev.encoder_passes)
        extra = {}
        if matcher is not None:
            extra = dict(forced_tokens=ev.forced, mask_seconds=matcher.mask_seconds, masks=matcher.masks)
        yield GenerationResponse(
            kind="block", text=d["answer"], thought=d["thought"], tokens=new, block=ev.index,
            step=ev.steps, steps=ev.steps, tokens_per_forward=stats["tpf"], prompt_tokens=len(ids),
            prompt_tps=stats["prompt_tps"], generation_tokens=n_gen, generation_tps=stats["generation_tps"],
            peak_memory=_peak_gb(), finish_reason=reason, total_steps=total_steps,
            model_forwards=forwards, tokens_per_model_forward=n_gen / forwards if forwards else 0.0, **extra,
        )
        if last:
            return


def _stream_steps(model, tokenizer, ids, parser, settings, max_tokens, seed, eos, show_drafts, sample_fn,
                  decode, verify, temperature, draft_fn, matcher=None) -> Iterator[GenerationResponse]:
    """stream_generate for decode="ar" / "verified": one response per round."""
    n_gen, total_steps, round_steps = 0, 0, 0
    stats = dict(prompt_tps=0.0, generation_tps=0.0, tpf=0.0, tpmf=0.0)

    def response(kind, text, thought, tokens, block, step, reason, ev=None):
        extra = {}
        if ev is not None:
            extra = dict(model_forwards=int(ev.model_forwards[0]), verifications=int(ev.verifications[0]),
                         accepted_per_verification=float(ev.accepted_per_verification[0]))
            if matcher is not None:
                extra.update(forced_tokens=int(ev.forced[0]), mask_seconds=matcher.mask_seconds,
                             masks=matcher.masks)
        return GenerationResponse(
            kind=kind, text=text, thought=thought, tokens=tokens, block=block, step=step, steps=step,
            tokens_per_forward=stats["tpf"], prompt_tokens=len(ids), prompt_tps=stats["prompt_tps"],
            generation_tokens=n_gen, generation_tps=stats["generation_tps"], peak_memory=_peak_gb(),
            finish_reason=reason, total_steps=total_steps + (step if kind == "draft" else 0), decode=decode,
            tokens_per_model_forward=stats["tpmf"], **extra,
        )

    events = _step_events(model, [ids], decode, verify, temperature, None, settings, max_tokens, seed, eos,
                          draft_fn, sample_fn, None if matcher is None else [matcher])
    for ev in events:
        if isinstance(ev, Draft):
            round_steps = ev.step
            if show_drafts:
                canvas = [int(t) for t in np.array(ev.tokens[0])]
                yield response("draft", tokenizer.decode(canvas, skip_special_tokens=True), "", canvas,
                               ev.block, ev.step, None)
            continue
        total_steps += round_steps
        new = ev.tokens[0]
        n_gen += len(new)
        parser.feed(new)
        d = parser.deltas(final=ev.last)
        stats["prompt_tps"] = ev.prompt_tokens[0] / ev.prompt_time if ev.prompt_time > 0 else 0.0
        stats["generation_tps"] = n_gen / ev.elapsed if ev.elapsed > 0 else 0.0
        dec = int(ev.decoder_passes[0])
        stats["tpf"] = n_gen / dec if dec else 0.0
        stats["tpmf"] = float(ev.tokens_per_model_forward[0])
        yield response("block", d["answer"], d["thought"], list(new), ev.index, round_steps,
                       ev.finish_reason[0] if ev.last else None, ev)
        round_steps = 0
        if ev.last:
            return


def generate(model, tokenizer, prompt, max_tokens: int = 256, verbose: bool = False, **kwargs) -> str:
    """The generated reply as one string (see :func:`stream_generate` for the arguments).

    Never empty when the model wrote anything: if the answer is empty (the model used
    only a thought channel, or ran out of tokens while thinking) the thought is returned.
    """
    kwargs.pop("show_drafts", None)
    answer, thought, last = [], [], None
    for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs):
        answer.append(r.text)
        thought.append(r.thought)
        last = r
    text = "".join(answer)
    if not text.strip():
        text = "".join(thought)
    if verbose and last is not None:
        print(format_stats(last), file=sys.stderr)
    return text


def format_stats(r: GenerationResponse) -> str:
    head = (
        f"prompt {r.prompt_tokens} tok @ {r.prompt_tps:.1f} tok/s | "
        f"generated {r.generation_tokens} tok @ {r.generation_tps:.1f} tok/s | "
    )
    if r.masks:  # structured output
        head += f"grammar: {r.forced_tokens} tok forced, masks {1e3 * r.mask_seconds:.1f} ms | "
    peak = f"peak {r.peak_memory:.2f} GB"
    per_forward = f"{r.tokens_per_model_forward:.2f} tok/model forward ({r.model_forwards} forwards)"
    if r.decode == "verified":
        return head + (
            f"{r.verifications} verifications, {r.accepted_per_verification:.2f} draft tok accepted each, "
            f"{r.total_steps / max(r.verifications, 1):.1f} draft steps each | {per_forward} | {peak}"
        )
    if r.decode == "ar":
        return head + f"encoder only | {per_forward} | {peak}"
    blocks = r.block + 1
    return head + (
        f"{blocks} block{'s' if blocks != 1 else ''}, {r.total_steps / blocks:.1f} steps/block | "
        f"{r.tokens_per_forward:.2f} tok/forward | {peak}"
    )


class _CallableModule(type(sys)):
    """``mlx_dgemma.generate`` is both this module and the function: calling it generates."""

    def __call__(self, *args, **kwargs) -> str:
        return generate(*args, **kwargs)


if __name__ == "__main__":  # the command line lives in mlx_dgemma.cli
    from mlx_dgemma.cli import main

    sys.exit(main())
else:
    sys.modules[__name__].__class__ = _CallableModule
