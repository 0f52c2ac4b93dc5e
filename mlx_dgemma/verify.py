"""Decoding with the encoder: autoregressive (``decode="ar"``) and self-speculative
(``decode="verified"``: the decoder drafts a block, the encoder verifies it).

The encoder is a causal language model over the same weights (training gives it a
next-token loss), so it can write text on its own, one token per forward:
``decode="ar"``. ``decode="verified"`` writes exactly the same tokens, several per
encoder pass wherever the diffusion draft agrees with the encoder.

The encoder's choice at sequence position p, from its logits for p (``encoder_choice``):
``greedy``: the argmax; ``sample``: ``argmax(logits / T + g)`` with Gumbel noise ``g``
from ``rng.ENCODER`` keyed by the seed and p itself (a draw from softmax(logits / T)).
Keying by the absolute position, not by a block or a pass, makes the choice a function
of the tokens before p alone, whichever pass computes it.

One verification (one row; its cache holds the P tokens before position P, and
``pending`` holds the encoder's logits for position P from the pass that wrote P - 1):

1. the decoder drafts ``d_0 .. d_{L-1}`` for positions P .. P+L-1 (``draft_steps``
   denoising steps, with the drafter's usual semantics);
2. ``c_0`` = the encoder's choice at P, from ``pending``. If ``d_0 != c_0`` nothing of
   the draft can survive, so the commit pass is skipped: ``c_0`` is committed;
3. otherwise the commit pass encodes the draft and returns the encoder's logits; those
   at P+i give ``c_{i+1}``. ``m`` is the first i with ``d_i != c_i`` (L if none):
   ``d_0 .. d_{m-1}`` are accepted and ``c_m`` follows them (the encoder's own token at
   the first rejection, or the bonus token when the whole block was accepted);
4. the cache is trimmed to hold the accepted tokens (no trace of the rejected tail) and
   ``c_m`` is encoded (one token), which gives the logits for the next verification.
   The next canvas starts right after ``c_m``.

By induction every committed token is the encoder's choice given the committed tokens
before it: the output IS ``decode="ar"``'s, for any draft. The draft only decides how
many tokens one pass commits.

Standard speculative sampling (accept with min(1, p/q)) is not used: its guarantee
assumes each draft token was drawn given the draft tokens before it, and a diffusion
draft is drawn in any order. Exact match against the encoder's own position-keyed choice
keeps the guarantee for sampling as well as for greedy decoding.

A committed EOS ends the row (as a committed block with an EOS does in the block loop);
so does the ``max_tokens`` budget, or a context too full for another canvas (verified)
or token (ar). The cache then holds every committed token but the last, as in the block
loop, where the last block is never encoded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, NamedTuple, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from . import rng
from .cache import PrefixCache
from .drafter import DenoiseSettings, Draft, SettingsError, denoise_steps

DECODE_MODES = ("diffusion", "verified", "ar")
VERIFY_RULES = ("greedy", "sample")


@dataclass
class EncoderRule:
    """How the encoder picks a token (and so what a draft must match)."""

    verify: str = "greedy"  # "greedy" (argmax) or "sample" (position-keyed Gumbel-max)
    temperature: float = 1.0  # for "sample": a draw from softmax(logits / temperature)

    def __post_init__(self):
        if self.verify not in VERIFY_RULES:
            raise SettingsError(f"verify must be one of {', '.join(VERIFY_RULES)}, got {self.verify!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not np.isfinite(t) or t <= 0:
            raise SettingsError(f"temperature must be a finite number > 0, got {t!r}")
        self.temperature = float(t)


def encoder_choice(logits: mx.array, positions, seeds, rule: EncoderRule) -> np.ndarray:
    """The encoder's tokens [n] from its logits [n, V] for absolute ``positions`` [n]
    (``seeds``: one for all positions, or one per position)."""
    x = logits.astype(mx.float32)
    if rule.verify == "sample":
        keys = rng.sequence_keys(seeds, rng.ENCODER, positions)
        x = x / rule.temperature + rng.gumbel(keys, x.shape[-1])
    return np.array(mx.argmax(x, axis=-1)).astype(np.int64)


def prefill(model, cache: PrefixCache, tokens: np.ndarray) -> mx.array:
    """Encode new tokens [B, T] (T >= 1); return the encoder's logits [B, V] for the
    position after them. Only the last token's logits are computed."""
    if tokens.shape[1] > 1:
        model.encode(mx.array(tokens[:, :-1]), cache)
    return model.encode(mx.array(tokens[:, -1:]), cache, return_logits=True)[:, -1]


def advance(model, cache: PrefixCache, token: int) -> mx.array:
    """Encode one committed token; return the logits [V] for the next position."""
    return model.encode(mx.array([[int(token)]], dtype=mx.int32), cache, return_logits=True)[0, -1]


class Verdict(NamedTuple):
    tokens: List[int]  # committed: accepted draft tokens, then the encoder's own token
    accepted: int  # draft tokens among ``tokens``
    encoded: bool  # the commit pass ran (False: the first draft token was rejected)


def verify_draft(model, cache: PrefixCache, draft: Sequence[int], pending: mx.array, seed: int,
                 rule: EncoderRule, room: int, eos: Sequence[int] = ()) -> Verdict:
    """Verify one row's draft (steps 2-4 of the module doc, without encoding the last
    committed token). ``room``: tokens the row may still commit (>= 1); a committed EOS
    ends the tokens. On return the cache holds every committed token but the last."""
    draft = [int(t) for t in draft]
    L, P = len(draft), cache.offset
    choices = [int(encoder_choice(pending[None], [P], seed, rule)[0])]
    encoded = draft[0] == choices[0]
    if encoded:
        cache.reserve_trim(L)
        logits = model.encode(mx.array([draft], dtype=mx.int32), cache, return_logits=True)[0]
        choices += encoder_choice(logits, P + 1 + np.arange(L), seed, rule).tolist()
    m = next((i for i in range(L) if draft[i] != choices[i]), L)
    tokens = draft[:m] + [choices[m]]
    eos = set(int(e) for e in eos)
    end = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
    tokens = tokens[: min(end, room)]
    if encoded:
        cache.trim(L - (len(tokens) - 1))
    return Verdict(tokens, min(m, len(tokens)), encoded)


def advance_tokens(model, cache: PrefixCache, tokens: Sequence[int]) -> mx.array:
    """Encode committed tokens (one forward however many); return the logits [V] for
    the position after them."""
    return model.encode(mx.array([[int(t) for t in tokens]], dtype=mx.int32), cache, return_logits=True)[0, -1]


def constrained_choice(logits: mx.array, position: int, seed: int, rule: EncoderRule, matcher) -> int:
    """The encoder's choice among the tokens the grammar allows (its logits masked)."""
    x = logits.astype(mx.float32) + matcher.mask()
    return int(encoder_choice(x[None], [position], seed, rule)[0])


class ConstrainedVerdict(NamedTuple):
    tokens: List[int]  # committed this round
    accepted: int  # draft tokens among them that the encoder checked
    encoded: bool  # the commit pass ran
    in_cache: int  # leading ``tokens`` already in the cache (the rest must be encoded)
    forced: int  # tokens the grammar forced (no choice, no forward of their own)


def verify_constrained(model, cache: PrefixCache, draft: Sequence[int], pending: mx.array, seed: int,
                       rule: EncoderRule, room: int, matcher, eos: Sequence[int] = ()) -> ConstrainedVerdict:
    """:func:`verify_draft` under a grammar. The tokens are exactly constrained ``ar``'s:
    at each position either the run of tokens the grammar forces (committed as a whole,
    as ``ar`` commits it) or the encoder's choice among the allowed tokens; a draft token
    is accepted only where it equals that token. ``matcher`` is at the committed state
    (forcing only at the reply's start: later forced runs are taken at the end of each
    round) and advances over the committed tokens. On return the cache holds
    ``tokens[:in_cache]`` (never the last token)."""
    draft = [int(t) for t in draft]
    L, P = len(draft), cache.offset
    stop = set(int(e) for e in eos)
    forced = 0
    out = matcher.forced()[:room]  # the reply's forced opening (the drafter pins it), as ar commits it
    if out:
        forced = len(out)
    else:
        out = [constrained_choice(pending, P, seed, rule, matcher)]
    matcher.consume(out)
    a = next((i for i in range(min(len(out), L)) if draft[i] != out[i]), min(len(out), L))
    encoded = a == len(out) and out[-1] not in stop and len(out) < room and not matcher.done
    logits = None
    if encoded:
        cache.reserve_trim(L)
        logits = model.encode(mx.array([draft], dtype=mx.int32), cache, return_logits=True)[0]
    while encoded and a == len(out) and len(out) < room and not matcher.ended and not (matcher.done and not stop):
        k = len(out)
        run = matcher.forced()[: room - k]
        if run:  # ar commits the run whole; the draft survives while it agrees
            out += run
            matcher.consume(run)
            forced += len(run)
            j = 0
            while j < len(run) and k + j < L and draft[k + j] == run[j]:
                j += 1
            a = k + j
            continue
        c = constrained_choice(logits[k - 1], P + k, seed, rule, matcher)  # logits[k-1]: position P+k
        out.append(c)
        matcher.consume([c])
        if k < L and draft[k] == c:
            a = k + 1
        if c in stop:
            break
    in_cache = min(a, len(out) - 1) if encoded else 0
    if encoded:
        cache.trim(L - in_cache)
    return ConstrainedVerdict(out, min(a, len(out)), encoded, in_cache, forced)


def _no_draft(matcher, L: int) -> bool:
    """A grammar row needs no draft this round: the reply is complete (only a stop token
    can follow, the encoder picks it from the logits it has), or the grammar forces at
    least a canvas of tokens."""
    return matcher is not None and (matcher.done or len(matcher.forced()) >= L)


def _constrained_round(model, cache, decode, draft, pending, seed, rule, room, matcher, eos):
    """One round of a grammar row: ``(tokens, accepted, encoder passes run, tokens of
    them already in the cache, forced tokens, whether a draft was verified)``.

    A round is the run the grammar forces at the reply's start (ar, or verified when the
    run fills a canvas), or one constrained choice (ar; verified when only a stop token
    can follow), or one constrained verification; it closes with the run forced after its
    tokens. Forced tokens are committed without a forward of their own: the next advance
    encodes them together with the round's last token."""
    if (matcher.done and not eos) or room <= 0:  # complete with no stop token to write, or no room
        return [], 0, 0, 0, 0, False
    lead = matcher.forced()[:room] if decode == "ar" or draft is None else []
    if lead:  # the forced opening (e.g. '{"' of a JSON object): no choice to make
        matcher.consume(lead)
        return lead, 0, 0, 0, len(lead), False
    checked = False  # a draft was verified
    if decode == "ar" or draft is None:  # (verified, no draft: only a stop token can follow)
        toks = [constrained_choice(pending, cache.offset, seed, rule, matcher)]
        matcher.consume(toks)
        accepted, ran, in_cache, nf = 0, 0, 0, 0
    else:
        v = verify_constrained(model, cache, draft, pending, seed, rule, room, matcher, eos)
        toks, accepted, ran, in_cache, nf = list(v.tokens), v.accepted, int(v.encoded), v.in_cache, v.forced
        checked = True
    if toks[-1] not in set(eos) and len(toks) < room and not matcher.done:
        tail = matcher.forced()[: room - len(toks)]
        matcher.consume(tail)
        toks += tail
        nf += len(tail)
    return toks, accepted, ran, in_cache, nf, checked


class DraftInput(NamedTuple):
    """What a draft function gets (``decode_steps(draft_fn=...)``): the rows to draft."""

    rows: List[int]  # batch rows still generating
    caches: List[PrefixCache]  # their caches (read only)
    seeds: List[int]
    cycle: int  # verification round (keys the drafter's random streams)
    generated: List[List[int]]  # each of these rows' committed tokens so far


@dataclass
class Step:
    """One round of :func:`decode_steps`: one token per live row (ar) or one
    verification per live row (verified). Counters are per batch row, totals so far;
    encoder passes exclude the prompt's."""

    index: int
    tokens: List[List[int]]  # per row, the tokens committed in this round (EOS kept)
    accepted: np.ndarray  # [B] draft tokens accepted in this round
    finished: np.ndarray  # [B] bool
    finish_reason: List[Optional[str]]  # per row: "stop" (EOS), "length" or None
    generated: np.ndarray  # [B] tokens committed so far
    decoder_passes: np.ndarray  # [B] denoising passes of the drafts
    encoder_passes: np.ndarray  # [B] commit passes + single-token passes
    verifications: np.ndarray  # [B] drafts verified (commit pass run or not)
    accepted_total: np.ndarray  # [B] draft tokens accepted
    prompt_tokens: List[int]  # per row, tokens encoded before the first round
    prompt_time: float
    elapsed: float  # seconds since the prompts were encoded
    last: bool
    forced: Optional[np.ndarray] = None  # [B] tokens a grammar forced (committed without a forward)

    @property
    def model_forwards(self) -> np.ndarray:
        return self.decoder_passes + self.encoder_passes

    @property
    def tokens_per_model_forward(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.model_forwards > 0, self.generated / np.maximum(self.model_forwards, 1), 0.0)

    @property
    def accepted_per_verification(self) -> np.ndarray:
        return np.where(self.verifications > 0, self.accepted_total / np.maximum(self.verifications, 1), 0.0)


def _prefill_rows(model, rows: List[np.ndarray], cache):
    """(one batch-1 cache per row, pending logits per row)."""
    B = len(rows)
    if isinstance(cache, PrefixCache):
        if B != 1:
            raise ValueError(f"one PrefixCache for {B} prompts: pass a list of caches, one per row")
        return [cache], [prefill(model, cache, rows[0][None])[0]]
    if cache is not None:
        caches = list(cache)
        if len(caches) != B:
            raise ValueError(f"{len(caches)} caches for {B} prompts (expected one per row)")
        return caches, [prefill(model, c, r[None])[0] for c, r in zip(caches, rows)]
    if B > 1 and len({len(r) for r in rows}) == 1:  # one batched prefill, then a cache per row
        shared = model.make_cache()
        logits = prefill(model, shared, np.stack(rows))
        return shared.split_rows(), [logits[b] for b in range(B)]
    caches = [model.make_cache() for _ in rows]
    return caches, [prefill(model, c, r[None])[0] for c, r in zip(caches, rows)]


def decode_steps(
    model,
    prompts: Sequence[Sequence[int]],
    decode: str,
    rule: EncoderRule,
    cache: Union[None, PrefixCache, Sequence[PrefixCache]] = None,
    draft_settings: Optional[DenoiseSettings] = None,
    max_tokens: int = 256,
    seeds: Sequence[int] = (0,),
    eos_token_ids: Sequence[int] = (),
    draft_fn: Optional[Callable[[DraftInput], np.ndarray]] = None,
    sample_fn=None,
    matchers: Optional[Sequence[Optional[Any]]] = None,
) -> Iterator[Union[Draft, Step]]:
    """Decode ``prompts`` (one token list per row, lengths may differ) with ``decode``
    "ar" or "verified"; yields each draft's denoising :class:`~mlx_dgemma.drafter.Draft`
    steps and one :class:`Step` per round. Inputs are assumed checked
    (``generate.generate_steps`` checks them).

    ``cache``: None, a PrefixCache holding a prefix for one row (continued in place), or
    one per row. ``draft_fn`` replaces the decoder's draft (tests, other drafters): it
    gets a :class:`DraftInput` and returns tokens [rows, canvas_length] (its passes are
    not counted), or None to let the decoder draft this round.

    ``matchers``: one :class:`mlx_dgemma.grammar.Matcher` (or None) per row: that row's
    tokens follow the grammar (:func:`_constrained_round`); a row without one decodes
    exactly as before.
    """
    if decode not in ("ar", "verified"):
        raise SettingsError(f"decode_steps: decode must be 'ar' or 'verified', got {decode!r}")
    rows = [np.asarray(p, dtype=np.int32).reshape(-1) for p in prompts]
    B, L, ctx = len(rows), model.args.canvas_length, model.args.max_position_embeddings
    seeds = [int(s) for s in seeds]
    settings = draft_settings or DenoiseSettings()
    eos = [int(e) for e in eos_token_ids]
    t0 = time.perf_counter()
    caches, pending = _prefill_rows(model, rows, cache)
    prompt_time = time.perf_counter() - t0
    t_start = time.perf_counter()

    live = np.ones(B, bool)
    reasons: List[Optional[str]] = [None] * B
    generated: List[List[int]] = [[] for _ in range(B)]
    dec, enc, ver, acc_total, forced = (np.zeros(B, np.int64) for _ in range(5))
    matchers = list(matchers) if matchers is not None else [None] * B
    need = L if decode == "verified" else 1  # positions the next round needs after the last token
    index = 0
    while live.any():
        idx = [int(b) for b in np.flatnonzero(live)]
        drafts = None
        if decode == "verified" and all(_no_draft(matchers[b], L) for b in idx):
            pass  # grammar rows with nothing to draft this round (below: a forced run, or the stop token)
        elif decode == "verified":
            if draft_fn is not None:
                inp = DraftInput(idx, [caches[b] for b in idx], [seeds[b] for b in idx], index,
                                 [list(generated[b]) for b in idx])
                drafts = draft_fn(inp)
            if drafts is not None:
                drafts = np.asarray(drafts).reshape(len(idx), L)
            else:
                cs = [caches[b] for b in idx]
                # a grammar's forced opening (only ever at the reply's start) is pinned in the draft
                pins = [dict(enumerate(matchers[b].forced()[:L])) if matchers[b] is not None else None for b in idx]
                res = yield from denoise_steps(model, cs[0] if len(cs) == 1 else cs, settings,
                                               [seeds[b] for b in idx], index, sample_fn=sample_fn,
                                               constraints=pins if any(pins) else None)
                drafts = np.array(res.tokens)
                dec[idx] += res.passes
        else:  # ar: every live row's next token at once (grammar rows choose in _constrained_round)
            free = [b for b in idx if matchers[b] is None]
            choice = np.zeros(len(idx), np.int64)
            if free:
                picked = encoder_choice(mx.stack([pending[b] for b in free]), [caches[b].offset for b in free],
                                        [seeds[b] for b in free], rule)
                choice[[idx.index(b) for b in free]] = picked
        new: List[List[int]] = [[] for _ in range(B)]
        accepted = np.zeros(B, np.int64)
        for j, b in enumerate(idx):
            room = max_tokens - len(generated[b])
            if matchers[b] is not None:
                toks, accepted[b], ran, in_cache, nf, checked = _constrained_round(
                    model, caches[b], decode, drafts[j] if drafts is not None else None, pending[b], seeds[b],
                    rule, room, matchers[b], eos)
                enc[b] += ran
                ver[b] += checked
                forced[b] += nf
                generated[b] += toks
                new[b] = toks
                m = matchers[b]
                if toks and toks[-1] in eos or m.done and not eos:
                    reasons[b] = "stop"
                elif len(generated[b]) >= max_tokens or caches[b].offset + len(toks) - in_cache + need > ctx:
                    reasons[b] = "length"
                if reasons[b] is not None:
                    live[b] = False
                    continue
                pending[b] = advance_tokens(model, caches[b], toks[in_cache:])
                enc[b] += 1
                continue
            if decode == "ar":
                toks = [int(choice[j])]
            else:
                v = verify_draft(model, caches[b], drafts[j], pending[b], seeds[b], rule, room, eos)
                toks, accepted[b] = v.tokens, v.accepted
                enc[b] += v.encoded
                ver[b] += 1
            generated[b] += toks
            new[b] = toks
            if toks[-1] in eos:
                reasons[b] = "stop"
            elif len(generated[b]) >= max_tokens or caches[b].offset + 1 + need > ctx:
                reasons[b] = "length"  # budget spent, or no room for the next round's positions
            if reasons[b] is not None:
                live[b] = False
                continue
            pending[b] = advance(model, caches[b], toks[-1])
            enc[b] += 1
        acc_total += accepted
        yield Step(
            index=index, tokens=new, accepted=accepted, finished=~live, finish_reason=list(reasons),
            generated=np.array([len(g) for g in generated]), decoder_passes=dec.copy(),
            encoder_passes=enc.copy(), verifications=ver.copy(), accepted_total=acc_total.copy(),
            prompt_tokens=[len(r) for r in rows], prompt_time=prompt_time,
            elapsed=time.perf_counter() - t_start, last=not live.any(), forced=forced.copy(),
        )
        index += 1
