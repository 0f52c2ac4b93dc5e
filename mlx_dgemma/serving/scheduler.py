"""The batch scheduler: one thread that owns every MLX call of the server.

Each in-flight request is a *row*. Every iteration of the loop:

1. admits waiting requests while fewer than ``max_batch`` rows are active, looking up
   the longest cached prefix of each prompt (``PromptCacheStore``);
2. encodes ONE chunk (``prefill_chunk`` tokens) of one row still prefilling, round
   robin, so a long prompt never stalls the rows that are denoising;
3. runs ONE decoder pass over every denoising row together: the canvases are stacked
   into a [B, L] batch and each row brings its own prefix cache (``Model.denoise``'s
   ragged list-of-caches path);
4. samples each row with its own seed, block index and step counter (the random
   streams are keyed per row by ``rng``, so a row's tokens do not depend on which
   other rows share the pass), applies the drafter's acceptance, renoising and
   adaptive stopping, and commits the rows whose block is done. A row may bring its
   own logits processing (``processors``: the request's sampling fields, applied to
   the raw logits before the step, as the reference applies a ``logits_processor``).

A committed block goes to the request's event callback at once (streaming sends one
chunk per block); unless the row is finished, it is then encoded into the row's cache
and the next block starts. Rows with ``decode="verified"`` draft the same way (the
step budget is the request's ``draft_steps``), and their commit is the encoder's
verification (``mlx_dgemma.verify``); ``decode="ar"`` rows take one encoder step per
iteration instead of a decoder pass. The per-row step mirrors ``drafter.denoise_steps`` for one
row exactly (same helpers, same order of operations); tests check that a server reply
equals the library's block loop under the same seed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .. import drafter as _drafter
from .. import rng
from ..drafter import CanvasPins, DenoiseSettings, block_constraints, initial_canvas
from ..logits_processors import LogitsProcessors
from ..sampling import temperature
from ..model import image_runs_end
from ..verify import EncoderRule, advance, encoder_choice, verify_draft
from .prompt_cache import PromptCacheStore

log = logging.getLogger("mlx_dgemma.server")


@dataclass
class GenerationParams:
    prompt: List[int]
    max_tokens: int
    settings: DenoiseSettings
    seed: int
    eos_token_ids: Sequence[int]
    # Extra prompt positions worth a cache snapshot (e.g. the end of the rendered chat
    # history, before the generation prompt): the next turn of the conversation is
    # likely to extend exactly that prefix.
    snapshot_at: Sequence[int] = ()
    snapshot_prompt: bool = True  # snapshot the whole prompt too
    snapshot_reply: bool = True  # snapshot prompt + reply (+ EOS) when done
    # Canvas constraints: {offset in the generated tokens: token id}, pinned through every
    # denoising step of the block holding that offset (drafter.CanvasPins).
    constraints: Optional[Dict[int, int]] = None
    processors: Optional[LogitsProcessors] = None  # applied to the raw logits of every step
    decode: str = "diffusion"  # or "verified" / "ar" (mlx_dgemma.verify)
    rule: EncoderRule = field(default_factory=EncoderRule)  # the encoder's rule for verified / ar
    # Images of the prompt, in order: (patches, positions) from image_processor. Their
    # soft tokens are computed in one step, then the prompt is encoded in chunks that
    # never split an image; such a row neither reads nor writes the prompt cache (its
    # keys are tokens, which do not tell images apart).
    images: Optional[List[Tuple[np.ndarray, np.ndarray]]] = None
    # Structured output (mlx_dgemma.grammar.Grammar): the reply follows it, in any decode
    # mode, through the library's constrained loops (the row runs on its own: not batched).
    grammar: Optional[object] = None


@dataclass
class Event:
    """What the scheduler tells a request. ``kind``: "prefilled", "block", "done",
    "cancelled" (the row was dropped after ``cancel()``) or "error"."""

    kind: str
    tokens: List[int] = field(default_factory=list)  # the block's new output tokens
    finish_reason: Optional[str] = None  # "stop" (EOS) or "length"
    message: str = ""
    stats: Dict[str, float] = field(default_factory=dict)


class GenerationRequest:
    """One request handed to the scheduler. ``on_event`` is called from the scheduler
    thread (it must be thread-safe and quick); ``cancel()`` drops the row at the next
    iteration (client gone, a stop string matched)."""

    def __init__(self, params: GenerationParams, on_event: Callable[[Event], None]):
        self.params = params
        self.on_event = on_event
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled.set()


class Row:
    """A request's state inside the scheduler."""

    def __init__(self, req: GenerationRequest, cache, cached: int):
        p = req.params
        self.req = req
        self.prompt = np.asarray(p.prompt, dtype=np.int32)
        self.cache = cache  # this row's own PrefixCache (never shared)
        self.cached = cached  # prompt tokens taken from the prompt cache
        self.pos = cached  # prompt tokens encoded so far
        self.settings = p.settings
        self.seed = int(p.seed)
        self.eos = set(int(t) for t in p.eos_token_ids)
        stops = {len(self.prompt)} if p.snapshot_prompt else set()
        self.snapshots = sorted(s for s in set(p.snapshot_at) | stops if cached < s <= len(self.prompt))
        self.generated: List[int] = []
        self.decode, self.rule = p.decode, p.rule
        self.pending = None  # verified / ar: the encoder's logits for the next position
        self.image_features = None  # the prompt's images' soft tokens while it is prefilled
        self.images_used = 0  # how many of them are encoded
        self.verifications = self.accepted = 0
        self.block = 0
        self.passes = 0
        self.prefill_s = 0.0
        self.t_first_block: Optional[float] = None
        self.processors = p.processors if p.processors is not None and p.processors.active else None
        self.gen = None  # a grammar row: the library's constrained event stream
        self.matcher = None
        self._new_block_state()

    def _new_block_state(self) -> None:
        self.process = None  # this block's logits processing (penalties see the committed tokens)
        self.canvas = None
        self.pins: Optional[CanvasPins] = None
        self.argmax: Optional[np.ndarray] = None
        self.sc = None
        self.n = self.settings.max_denoising_steps  # counts down, as in the reference
        S = self.settings.stability_threshold or 0
        self.history: Deque[np.ndarray] = deque(maxlen=max(S, 1))

    @property
    def prefilling(self) -> bool:
        return self.pos < len(self.prompt)


class Scheduler:
    def __init__(
        self,
        model,
        store: Optional[PromptCacheStore] = None,
        max_batch: int = 4,
        prefill_chunk: int = 2048,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model = model
        self.store = store if store is not None else PromptCacheStore(0)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.L = model.args.canvas_length
        self.V = model.args.vocab_size
        self._incoming: "queue.Queue[Optional[GenerationRequest]]" = queue.Queue()
        self._jobs: "queue.Queue" = queue.Queue()
        self._rows: List[Row] = []
        self._waiting: Deque[GenerationRequest] = deque()
        self._rr = 0  # round-robin index over prefilling rows
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self.batch_sizes: Counter = Counter()  # rows per decoder pass -> passes
        self._stats_lock = threading.Lock()  # /health reads while the loop counts
        self.completed = 0
        self.prefill_tokens = 0
        self.generated_tokens = 0
        _materialize(model)

    # ---- control (any thread) -------------------------------------------------------
    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._run, name="mlx-dgemma-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._incoming.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, req: GenerationRequest) -> None:
        if self._stop.is_set():
            raise RuntimeError("scheduler is stopped")
        self._incoming.put(req)

    def call(self, fn: Callable, timeout: Optional[float] = None):
        """Run ``fn()`` on the scheduler thread (MLX streams are per thread) and return
        its result; used by tests and benchmarks to touch the model or the store."""
        done = threading.Event()
        box: dict = {}

        def job():
            try:
                box["value"] = fn()
            except BaseException as e:  # handed back to the caller
                box["error"] = e
            done.set()

        self._jobs.put(job)
        self._incoming.put(None)  # wake the loop
        if not done.wait(timeout):
            raise TimeoutError("scheduler did not run the job in time")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def stats(self) -> dict:
        with self._stats_lock:
            sizes = dict(self.batch_sizes)
        return {
            "active": len(self._rows),
            "waiting": len(self._waiting) + self._incoming.qsize(),
            "max_batch": self.max_batch,
            "completed": self.completed,
            "decoder_passes": sum(sizes.values()),
            "rows_per_pass": {str(k): v for k, v in sorted(sizes.items())},
            "max_rows_per_pass": max(sizes, default=0),
            "prefill_tokens": self.prefill_tokens,
            "generated_tokens": self.generated_tokens,
            "prompt_cache": self.store.stats(),
        }

    # ---- the loop (scheduler thread) ------------------------------------------------
    def _run(self) -> None:
        mx.set_default_stream(mx.new_stream(mx.default_device()))
        while not self._stop.is_set():
            busy = bool(self._rows or self._waiting)
            try:  # sleep only when idle
                item = self._incoming.get_nowait() if busy else self._incoming.get(timeout=0.5)
            except queue.Empty:
                item = None
            while True:
                if item is not None:
                    self._waiting.append(item)
                try:
                    item = self._incoming.get_nowait()
                except queue.Empty:
                    break
            while not self._jobs.empty():
                self._jobs.get_nowait()()
            try:
                self._iteration()
            except Exception as e:  # never let one bad step kill the server
                log.error("scheduler step failed: %s\n%s", e, traceback.format_exc())
                for row in self._rows:
                    self._emit(row.req, Event("error", message=f"generation failed: {type(e).__name__}: {e}"))
                self._rows = []
        for row in self._rows:
            self._emit(row.req, Event("error", message="server shutting down"))
        for req in self._waiting:
            self._emit(req, Event("error", message="server shutting down"))

    def _emit(self, req: GenerationRequest, ev: Event) -> None:
        try:
            req.on_event(ev)
        except Exception:  # a broken consumer must not stop the loop
            log.exception("event callback failed")

    def _iteration(self) -> None:
        for r in [r for r in self._rows if r.req.cancelled.is_set()]:
            self._rows.remove(r)
            self._emit(r.req, Event("cancelled"))
        while self._waiting and len(self._rows) < self.max_batch:
            req = self._waiting.popleft()
            if req.cancelled.is_set():
                self._emit(req, Event("cancelled"))
            else:
                self._admit(req)
        prefilling = [r for r in self._rows if r.prefilling]
        if prefilling:
            self._rr %= len(prefilling)
            row = prefilling[self._rr]
            self._rr += 1
            try:
                self._prefill_chunk(row)
            except Exception as e:  # e.g. out of memory on one huge prompt: fail that one only
                log.error("prefill failed: %s", e)
                self._rows.remove(row)
                self._emit(row.req, Event("error", message=f"prefill failed: {type(e).__name__}: {e}"))
        denoising = [r for r in self._rows if not r.prefilling and r.decode != "ar" and r.gen is None]
        if denoising:
            self._denoise_step(denoising)
        for r in [r for r in self._rows if r.gen is not None]:
            self._grammar_step(r)
        for r in [r for r in self._rows if not r.prefilling and r.decode == "ar" and r.gen is None]:
            tok = encoder_choice(r.pending[None], [r.cache.offset], r.seed, r.rule)[0]
            self._commit(r, [int(tok)])

    def _admit(self, req: GenerationRequest) -> None:
        p = req.params
        if p.grammar is not None:
            return self._admit_grammar(req)
        # verified / ar need the encoder's logits after the prompt: encode at least its last token
        if p.images:
            n, cache = 0, None
        else:
            n, cache = self.store.lookup(p.prompt if p.decode == "diffusion" else p.prompt[:-1])
        if cache is None:
            cache = self.model.make_cache()
        row = Row(req, cache, n)
        self._rows.append(row)
        if not row.prefilling:
            self._prefilled(row)

    def _admit_grammar(self, req: GenerationRequest) -> None:
        """A structured-output row: the library's constrained loop (``generate.grammar_blocks``
        for diffusion, ``verify.decode_steps`` with a matcher for ar / verified) runs on the
        row's cache, one event (a denoising step, a verification, a token) per iteration."""
        from ..generate import _step_events, grammar_blocks

        p = req.params
        n, cache = self.store.lookup(p.prompt[:-1])  # the loops encode at least the last token
        if cache is None:
            cache = self.model.make_cache()
        row = Row(req, cache, n)
        row.pos = len(row.prompt)  # the loop prefills the rest itself
        row.matcher = p.grammar.matcher()
        new = row.prompt[n:]
        eos = sorted(row.eos)
        if row.decode == "diffusion":
            row.gen = grammar_blocks(self.model, new, row.matcher, row.settings, p.max_tokens, row.seed, eos,
                                     cache=cache)
        else:
            row.gen = _step_events(self.model, [new], row.decode, row.rule.verify, row.rule.temperature, cache,
                                   row.settings, p.max_tokens, row.seed, eos, None, None, [row.matcher])
        self._rows.append(row)
        self._prefilled(row)

    def _grammar_step(self, row: Row) -> None:
        from ..drafter import Draft

        ev = next(row.gen)
        if isinstance(ev, Draft):
            row.passes += 1
            return
        block = [int(t) for t in (ev.tokens[0] if row.decode != "diffusion" else np.asarray(ev.tokens)[0])]
        if row.decode == "diffusion":
            finished = bool(ev.finished[0])
        else:
            finished = ev.finish_reason[0] == "stop"
            row.verifications = int(ev.verifications[0])
            row.accepted = int(ev.accepted_total[0])
        eos_at = next((i for i, t in enumerate(block) if t in row.eos), None)
        out = block[:eos_at] if eos_at is not None else block
        now = time.perf_counter()
        if row.t_first_block is None:
            row.t_first_block = now
        row.generated.extend(out)
        self.generated_tokens += len(out)
        self._emit(row.req, Event("block", tokens=out, stats={"block": row.block, "passes": row.passes}))
        if not ev.last:
            row.block += 1
        else:
            self._rows.remove(row)
            self.completed += 1
            stats = self._final_stats(row, now)
            stats.update(forced_tokens=int(getattr(ev, "forced", 0) if row.decode == "diffusion" else ev.forced[0]),
                         mask_seconds=row.matcher.mask_seconds, masks=row.matcher.masks)
            self._emit(row.req, Event("done", finish_reason="stop" if finished else "length", stats=stats))

    def _prefill_chunk(self, row: Row) -> None:
        t0 = time.perf_counter()
        images = row.req.params.images
        if images:
            self._prefill_images_chunk(row, images, t0)
            return
        end = min(row.pos + self.prefill_chunk, len(row.prompt))
        while row.snapshots and row.snapshots[0] <= row.pos:
            row.snapshots.pop(0)
        if row.snapshots and row.snapshots[0] < end:
            end = row.snapshots[0]  # cut the chunk where a snapshot is wanted
        last = row.decode != "diffusion" and end == len(row.prompt)
        if last and end - row.pos > 1:
            end -= 1  # the last token alone, with logits (the rest need none)
        logits = self.model.encode(mx.array(row.prompt[None, row.pos:end]), row.cache,
                                   return_logits=last and end - row.pos == 1)
        mx.eval([c.state for c in row.cache])  # this chunk now, not with the row's first step
        if logits is not None:
            row.pending = logits[0, -1]
        self.prefill_tokens += end - row.pos
        row.pos = end
        if row.snapshots and row.snapshots[0] == end:
            row.snapshots.pop(0)
            self.store.insert(row.prompt[:end], row.cache)
        row.prefill_s += time.perf_counter() - t0
        if not row.prefilling:
            self._prefilled(row)

    def _prefill_images_chunk(self, row: Row, images, t0: float) -> None:
        """A prompt with images: the vision tower in one step (all images), then chunks
        of the prompt that never end inside an image, each with its images' soft tokens."""
        if row.image_features is None:
            row.image_features = mx.concatenate([self.model.image_features(p, pos) for p, pos in images])
            row.prefill_s += time.perf_counter() - t0
            return
        image_id = self.model.args.image_token_id
        end = image_runs_end(row.prompt, image_id, min(row.pos + self.prefill_chunk, len(row.prompt)))
        n = int((row.prompt[row.pos:end] == image_id).sum())
        self.model.encode(mx.array(row.prompt[None, row.pos:end]), row.cache,
                          image_features=row.image_features[row.images_used:row.images_used + n])
        mx.eval([c.state for c in row.cache])  # this chunk now, not with the row's first step
        self.prefill_tokens += end - row.pos
        row.pos, row.images_used = end, row.images_used + n
        row.prefill_s += time.perf_counter() - t0
        if not row.prefilling:
            row.image_features = None
            self._prefilled(row)

    def _prefilled(self, row: Row) -> None:
        self._emit(row.req, Event("prefilled", stats={"cached_tokens": row.cached, "prefill_s": row.prefill_s}))

    def _denoise_step(self, rows: List[Row]) -> None:
        model, L, V = self.model, self.L, self.V
        for r in rows:
            if r.canvas is None:
                r.canvas = initial_canvas([r.seed], r.block, L, V)
                if r.processors is not None:
                    r.process = r.processors.for_context(r.prompt, r.generated, V)
                pinned = r.req.params.constraints
                if pinned:
                    r.pins = CanvasPins.from_rows([block_constraints(pinned, r.block, L)], L, V)
                    if r.pins is not None:
                        r.canvas = r.pins.canvas(r.canvas)
        B = len(rows)
        canvas = rows[0].canvas if B == 1 else mx.concatenate([r.canvas for r in rows])
        scs = [r.sc for r in rows]
        if all(s is None for s in scs):
            sc = None
        else:
            # A zero signal is exactly the "no self-conditioning" input (the MLP of zeros
            # is zero, there are no biases), so rows on their first step can share a pass.
            z = next(s for s in scs if s is not None)
            sc = mx.concatenate([mx.zeros_like(z) if s is None else s for s in scs]) if B > 1 else scs[0]
        cache = rows[0].cache if B == 1 else [r.cache for r in rows]
        logits = model.denoise(canvas, cache, self_conditioning_embeddings=sc)
        sample_fn = _drafter._sample_step  # the drafter's choice (MLX ops or fused kernels)
        outs = []
        for i, r in enumerate(rows):
            st = r.settings
            lg = logits if B == 1 else logits[i : i + 1]
            if r.process is not None:
                lg = r.process(lg)
            t = temperature(r.n, st.max_denoising_steps, st.t_min, st.t_max)
            s = sample_fn(lg, t, rng.position_keys([r.seed], rng.SAMPLE, r.block, r.n, L))
            renoise = rng.random_tokens(rng.position_keys([r.seed], rng.RENOISE, r.block, r.n, L), V)
            u = _drafter.update(model, lg, t, s, renoise, st, r.pins)
            outs.append((u.canvas, u.argmax, u.self_conditioning, u.mean_entropy))
        mx.eval(outs)
        with self._stats_lock:
            self.batch_sizes[B] += 1
        for r, (new_canvas, argmax, new_sc, ent) in zip(rows, outs):
            st = r.settings
            r.passes += 1
            a = np.array(argmax)[0]
            done = False
            if st.adaptive_stopping:
                S = st.stability_threshold
                stable = S == 0 or (len(r.history) == S and all(np.array_equal(h, a) for h in r.history))
                if S:
                    r.history.append(a)
                done = bool(stable and np.array(ent)[0] < st.confidence_threshold)
            r.canvas, r.argmax, r.sc = new_canvas, a, new_sc
            r.n -= 1
            if done or r.n == 0:
                self._commit(r)

    def _commit(self, row: Row, tokens: Optional[List[int]] = None) -> None:
        """The row's block is done (or, for "ar", its next token chosen): hand its tokens
        out, then finish or go on."""
        p = row.req.params
        room = p.max_tokens - len(row.generated)
        if row.decode == "verified":  # the cache then holds every committed token but the last
            v = verify_draft(self.model, row.cache, row.argmax, row.pending, row.seed, row.rule, room, row.eos)
            block = v.tokens
            row.verifications += 1
            row.accepted += v.accepted
        else:
            block = tokens if tokens is not None else [int(t) for t in row.argmax]
        eos_at = next((i for i, t in enumerate(block) if t in row.eos), None)
        finish = None
        keep = block
        if eos_at is not None and eos_at < room:
            out, keep, finish = block[:eos_at], block[: eos_at + 1], "stop"
        elif len(block) >= room:
            out, keep, finish = block[:room], block[:room], "length"
        else:
            out = block
        now = time.perf_counter()
        if row.t_first_block is None:
            row.t_first_block = now
        row.generated.extend(out)
        self.generated_tokens += len(out)
        stats = {"block": row.block, "passes": row.passes}
        self._emit(row.req, Event("block", tokens=out, stats=stats))
        if finish is not None:
            self._rows.remove(row)
            self.completed += 1
            req = row.req
            wanted = not req.cancelled.is_set()  # read before "done": consumers may cancel after it
            self._emit(req, Event("done", finish_reason=finish, stats=self._final_stats(row, now)))
            if p.snapshot_reply and self.store.enabled and keep and wanted:
                # The next turn most likely re-sends prompt + reply (+ EOS): keep it.
                # (verified / ar: the cache already holds all of it but the last token)
                self.model.encode(mx.array([keep if row.decode == "diffusion" else keep[-1:]]), row.cache)
                mx.eval([c.state for c in row.cache])
                self.store.insert(np.concatenate([row.prompt, np.asarray(row.generated[: len(row.generated) - len(out)] + keep, np.int32)]), row.cache)
            return
        if row.decode == "diffusion":
            self.model.encode(mx.array([block]), row.cache)
            mx.eval([c.state for c in row.cache])
        else:
            row.pending = advance(self.model, row.cache, block[-1])
        row.block += 1
        row._new_block_state()

    def _final_stats(self, row: Row, now: float) -> Dict[str, float]:
        t0 = row.req.submitted
        n = len(row.generated)
        return {
            "cached_tokens": row.cached,
            "prompt_tokens": int(len(row.prompt)),
            "completion_tokens": n,
            "blocks": row.block + 1,
            "decode": row.decode,
            "verifications": row.verifications,
            "accepted_per_verification": row.accepted / row.verifications if row.verifications else 0.0,
            "decoder_passes": row.passes,
            "tokens_per_forward": n / row.passes if row.passes else 0.0,
            "prefill_s": row.prefill_s,
            "time_to_first_block_s": (row.t_first_block or now) - t0,
            "total_s": now - t0,
        }


def prefill(model, cache, tokens: Sequence[int], chunk: int = 2048) -> None:
    """Encode ``tokens`` into ``cache`` ``chunk`` tokens at a time. Memory stays bounded
    by the chunk: sliding layers keep only their window, and attention scores are
    [chunk, cached + chunk] per head instead of [T, T]."""
    toks = np.asarray(tokens, dtype=np.int32)
    for i in range(0, len(toks), chunk):
        model.encode(mx.array(toks[None, i : i + chunk]), cache)
        mx.eval([c.state for c in cache])  # one chunk at a time: memory bounded by the chunk


def _materialize(model) -> None:
    """Evaluate every array the model holds, private ones too (rope frequencies): MLX
    streams are per thread, and a lazy array made on the loading thread cannot be
    evaluated on the scheduler thread."""
    arrays = []
    for _, mod in model.named_modules():
        for v in list(mod.values()) + list(vars(mod).values()):
            if isinstance(v, mx.array):
                arrays.append(v)
    mx.eval(arrays)
