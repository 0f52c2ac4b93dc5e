"""OpenAI-compatible HTTP server for DiffusionGemma (FastAPI + uvicorn).

    python -m mlx_dgemma.server --model PATH_OR_ID [--host 127.0.0.1] [--port 8080]
        [--max-context N] [--cache-size-gb X] [--max-batch 4] [--api-key KEY]

Endpoints: POST /v1/chat/completions (with tool calling) and /v1/completions (streaming
by server-sent events, one chunk per committed block, or one JSON reply), POST
/v1/responses (the Responses API, ``serving.responses``), GET /v1/models (with the
context length the model really supports), GET /health. With an API key every /v1 route
needs ``Authorization: Bearer KEY``; /health stays open.

All MLX work happens on one scheduler thread (``serving.scheduler``) that batches the
in-flight requests into one decoder pass per step and reuses encoder caches across the
turns of a conversation (``serving.prompt_cache``). The HTTP side validates, tokenizes
and turns committed blocks into text.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence, Tuple

from .chat import has_chat_template
from .drafter import DenoiseSettings, SettingsError, load_generation_config
from .generate import GenerateInputError, check_constraints, template_constraints
from .image_processor import DEFAULT_MAX_PIXELS
from .logits_processors import LogitsProcessors
from .serving import completions as replies
from .serving import responses
from .serving.completions import PlainText
from .serving.errors import APIError
from .serving.prompt_cache import PromptCacheStore
from .serving.protocol import Parsed, parse_request
from .serving.scheduler import Event, GenerationParams, GenerationRequest, Scheduler
from .serving.tools import ReplyParser, ToolFormat
from .verify import EncoderRule

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError:  # pragma: no cover - the message is the point
    raise SystemExit("mlx_dgemma.server needs FastAPI and uvicorn: pip install 'mlx-dgemma[server]'") from None

log = logging.getLogger("mlx_dgemma.server")

# Field names under which clients look for the context window (OpenRouter, vLLM, LM
# Studio, llama.cpp, LiteLLM...): all report the same number.
CONTEXT_FIELDS = ("context_length", "max_model_len", "max_context_length", "context_window",
                  "max_input_tokens", "n_ctx")
API_KEY_ENV = "MLX_DGEMMA_API_KEY"


class ServerState:
    """The loaded model, its tokenizer, the limits and the scheduler."""

    def __init__(
        self,
        model,
        tokenizer,
        model_id: str,
        model_path: Optional[Path] = None,
        max_context: Optional[int] = None,
        cache_size_gb: float = 4.0,
        max_batch: int = 4,
        prefill_chunk: int = 2048,
        default_max_tokens: Optional[int] = None,
        strict_sampling: bool = False,
        aliases: Sequence[str] = (),
        api_key: Optional[str] = None,
        allow_local_images: bool = False,
        max_image_pixels: Optional[int] = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.aliases = {model_id, *aliases}
        self.model_path = model_path
        self.trained_context = int(model.args.max_position_embeddings)
        if max_context is not None and max_context < 1:
            raise ValueError(f"--max-context must be >= 1, got {max_context}")
        self.max_context = min(self.trained_context, max_context or self.trained_context)
        self.default_max_tokens = default_max_tokens
        self.strict_sampling = strict_sampling
        # Only a digest is kept: the key never sits in logs, reprs or error messages.
        self._key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self.tools = ToolFormat(tokenizer)
        self.gen_config: Dict[str, Any] = load_generation_config(model_path) if model_path else {}
        self.base_settings = DenoiseSettings.from_generation_config(self.gen_config)
        eos = set(model.args.eos_token_ids)
        g = self.gen_config.get("eos_token_id")
        eos |= set([g] if isinstance(g, int) else (g or []))
        eos |= set(getattr(tokenizer, "eos_token_ids", None) or [])
        if self.tools.supported and self.tools.response_id is not None:
            eos.add(self.tools.response_id)  # after its calls a model hands over to the tools
        self.eos_token_ids = sorted(int(t) for t in eos)
        if cache_size_gb < 0:
            raise ValueError(f"--cache-size-gb must be >= 0, got {cache_size_gb}")
        self.store = PromptCacheStore(int(cache_size_gb * (1 << 30)))
        self.scheduler = Scheduler(model, self.store, max_batch=max_batch, prefill_chunk=prefill_chunk)
        self.started = int(time.time())
        # Images: data: URLs always; local file paths (file:// or a path) only when allowed
        self.allow_local_images = allow_local_images
        self.max_image_pixels = max_image_pixels

    def start(self) -> "ServerState":
        self.scheduler.start()
        return self

    def stop(self) -> None:
        self.scheduler.stop()

    @property
    def requires_key(self) -> bool:
        return self._key_digest is not None

    def authorized(self, header: Optional[str]) -> bool:
        """``Authorization: Bearer KEY``, compared in constant time (as digests, so the
        key's length does not show either)."""
        if self._key_digest is None:
            return True
        scheme, _, given = (header or "").partition(" ")
        ok = secrets.compare_digest(hashlib.sha256(given.strip().encode()).digest(), self._key_digest)
        return ok and scheme.lower() == "bearer"

    # ---- tokenization (HTTP threads; no MLX here) -----------------------------------
    def image_inputs(self, p: Parsed) -> list:
        """The request's images, decoded and processed (NumPy; one-line 400s)."""
        if not p.images:
            return []
        from .image_processor import ImageError, process_image
        from .images import check_vision, max_soft_tokens_of

        try:
            check_vision(self.model)
        except ImageError as e:
            raise APIError(str(e), param="messages") from None
        vision = self.model.model.encoder.vision_tower.args
        budget = max_soft_tokens_of(self.model)
        out = []
        for i, url in enumerate(p.images):
            source, name = self._image_source(url, i)
            try:
                out.append(process_image(source, vision.patch_size, vision.pooling_kernel_size, budget,
                                         self.max_image_pixels or DEFAULT_MAX_PIXELS))
            except ImageError as e:
                msg = str(e)
                if isinstance(source, bytes):  # name the request's image, not "image (N bytes)"
                    msg = f"{name}{msg[msg.index(':'):]}" if ":" in msg else f"{name}: {msg}"
                raise APIError(msg, param="messages") from None
        return out

    def _image_source(self, url: str, i: int):
        """(bytes or a local path, a name for errors) of the i-th image URL."""
        name = f"image {i + 1}"
        if url.startswith("data:"):
            head, sep, data = url.partition(",")
            if not sep or ";base64" not in head:
                raise APIError(f"{name}: a data: URL must be base64 (data:image/png;base64,...)", param="messages")
            try:
                return base64.b64decode(data, validate=True), name
            except (binascii.Error, ValueError):
                raise APIError(f"{name}: the data: URL is not valid base64", param="messages") from None
        if url.startswith(("http://", "https://")):
            raise APIError(f"{name}: remote image URLs are not fetched (this server makes no network requests): "
                           "send the image as a data: URL", param="messages")
        path = url[len("file://"):] if url.startswith("file://") else url
        if not self.allow_local_images:
            raise APIError(f"{name}: local image paths are off (start the server with --allow-local-images): "
                           "send the image as a data: URL", param="messages")
        return path, name

    def chat_tokens(self, p: Parsed, image_counts: Sequence[int] = ()) -> Tuple[List[int], List[int]]:
        """(prompt ids, snapshot positions): the end of the rendered history (before the
        generation prompt) is where the next turn of this conversation will branch off.
        ``image_counts``: soft tokens per image; each image placeholder is expanded."""
        if p.images:
            from .image_processor import ImageError
            from .images import expand_image_tokens

            if not has_chat_template(self.tokenizer):
                raise APIError("images need a model folder with a chat template", param="messages")
            full, _ = self._chat_tokens(p)
            try:
                return expand_image_tokens(full, image_counts, self.model.args), []
            except ImageError as e:
                raise APIError(str(e), param="messages") from None
        return self._chat_tokens(p)

    def _chat_tokens(self, p: Parsed) -> Tuple[List[int], List[int]]:
        tok = self.tokenizer
        if p.tools and not self.tools.supported:
            raise APIError("tools were sent, but this model's chat template has no tool calling", param="tools")
        if not has_chat_template(tok):
            text = "\n".join(m["content"] for m in p.messages)
            return list(tok.encode(text)), []
        extra = {"tools": p.tools} if p.tools else {}

        def render(gen: bool) -> List[int]:
            ids = tok.apply_chat_template(p.messages, add_generation_prompt=gen, enable_thinking=p.thinking,
                                          tokenize=True, **extra, **p.template_kwargs)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return [int(t) for t in ids]

        try:
            full = render(True)
            history = render(False) if p.messages[-1]["role"] != "assistant" else []
        except Exception as e:  # jinja errors: roles out of order, bad kwargs ...
            raise APIError(f"the chat template rejected the messages: {e}".splitlines()[0], param="messages") from None
        n = 0
        for a, b in zip(history, full):
            if a != b:
                break
            n += 1
        return full, ([n] if 0 < n < len(full) else [])

    def completion_tokens(self, p: Parsed) -> List[int]:
        if isinstance(p.prompt, str):
            return [int(t) for t in self.tokenizer.encode(p.prompt)]
        V = self.model.args.vocab_size
        bad = next((t for t in p.prompt if not 0 <= t < V), None)
        if bad is not None:
            raise APIError(f"prompt token id {bad} is outside the vocabulary [0, {V})", param="prompt")
        return list(p.prompt)

    def params(self, p: Parsed, prompt: List[int], snapshot_at: Sequence[int], chat: bool) -> GenerationParams:
        n = len(prompt)
        limit = self.max_context
        if n >= limit:
            raise APIError(
                f"This model's maximum context length is {limit} tokens, but the prompt has {n} tokens "
                "(leave room for at least one generated token)",
                param="messages" if chat else "prompt", code="context_length_exceeded")
        room = limit - n
        if p.max_tokens is not None:
            if p.max_tokens > room:
                field = "max_tokens"
                raise APIError(
                    f"This model's maximum context length is {limit} tokens. However, you requested "
                    f"{n + p.max_tokens} tokens ({n} in the prompt, {p.max_tokens} for the completion). "
                    f"Please reduce the length of the prompt or of the completion (max_tokens <= {room}).",
                    param=field, code="context_length_exceeded")
            max_tokens = p.max_tokens
        else:
            max_tokens = min(room, self.default_max_tokens or room)
        overrides = dict(p.settings_overrides)
        if p.decode == "verified" and p.draft_steps is not None:
            overrides["max_denoising_steps"] = p.draft_steps
        try:
            settings = DenoiseSettings.from_generation_config(self.gen_config, **overrides)
        except SettingsError as e:
            raise APIError(str(e)) from None
        seed = p.seed if p.seed is not None else secrets.randbits(32)
        T, processors = p.temperature, p.processors
        grammar = self.grammar(p, chat)
        if p.decode != "diffusion" or grammar is not None:
            # the encoder's rule commits, or a grammar's loop runs: nothing to apply the fields to
            if p.decode != "diffusion":
                p.ignored = sorted(set(p.ignored) | set(p.sampling_fields))
            else:
                p.ignored = sorted(set(p.ignored) | (set(p.sampling_fields) - {"temperature"}))
            T, processors = (None if p.decode != "diffusion" else T), LogitsProcessors()
        if T == 0:
            # Deterministic: accepted positions take the argmax, and the only other
            # randomness (initial canvas, renoising) is drawn from a fixed seed.
            settings.greedy, seed = True, 0
        elif T is not None and T != 1:  # the schedule, scaled
            settings.t_min, settings.t_max = settings.t_min * T, settings.t_max * T
        if p.tools and p.tool_choice == "none" and self.tools.supported:
            processors = dataclasses.replace(processors, suppress=(*processors.suppress, self.tools.open_id))
        try:
            processors.check_vocabulary(self.model.args.vocab_size)
        except SettingsError as e:
            raise APIError(str(e), param="logit_bias") from None
        constraints = self.constraints(p, max_tokens)
        if p.tools and grammar is None:  # (tool_choice required / named: the call is a grammar)
            opening = {k: v for k, v in self.tools.pins(p.tool_choice, p.tool_name, p.tools).items() if k < max_tokens}
            if opening:
                constraints = {**opening, **(constraints or {})}
        images = [(im.patches, im.positions) for im in p.processed_images] if p.images else None
        return GenerationParams(
            images=images, snapshot_reply=not images,
            prompt=prompt, max_tokens=max_tokens, settings=settings, seed=seed, constraints=constraints,
            eos_token_ids=self.eos_token_ids, snapshot_at=snapshot_at, decode=p.decode, rule=EncoderRule(p.verify),
            # For chat, the history snapshot serves both the next turn and a re-sent
            # prompt (the generation prompt is a few tokens); do not store both.
            snapshot_prompt=not (chat and snapshot_at) and not images,
            processors=processors if processors.active else None, grammar=grammar,
        )

    def grammar(self, p: Parsed, chat: bool):
        """The request's structured output compiled for this model (None when free text):
        ``response_format``, or the tool call that ``tool_choice`` required / named demands."""
        from . import grammar as G

        spec = p.response_format
        forced_call = chat and p.tools and p.tool_choice in ("required", "function")
        if forced_call:
            if not self.tools.supported:
                raise APIError("tool_choice needs a chat template with tool calling", param="tool_choice")
            if spec is not None:
                raise APIError(f"tool_choice={p.tool_choice!r} and response_format cannot be combined: the reply is "
                               "a tool call", param="response_format")
        if spec is None and not forced_call:
            return None
        if p.images:
            raise APIError("images and structured output (response_format, a required tool call) cannot be "
                           "combined yet", param="tool_choice" if forced_call else "response_format")
        try:
            if forced_call:
                spec = G.tool_call_spec(p.tools, p.tool_name, self.tools.open_id, self.tools.close_id,
                                        self.tools.quote_id)
            return G.Grammar(spec, self.tokenizer, self.model.args.vocab_size, self.eos_token_ids)
        except G.GrammarError as e:
            raise APIError(str(e), param="tool_choice" if forced_call else "response_format",
                           code="invalid_response_format") from None

    def constraints(self, p: Parsed, max_tokens: int) -> Optional[Dict[int, int]]:
        """The request's canvas constraints as {offset: token id}, checked against the
        token budget and the vocabulary (``canvas_constraints`` win over the template)."""
        if p.constraints is None and p.canvas_template is None:
            return None
        try:
            pins = {}
            if p.canvas_template is not None:
                pins = template_constraints(self.tokenizer, p.canvas_template, p.canvas_hole)
            pins.update(p.constraints or {})
            return check_constraints(pins, max_tokens, self.model.args.vocab_size)
        except GenerateInputError as e:
            raise APIError(str(e), param="canvas_template" if p.constraints is None else "canvas_constraints") from None

    def check_model(self, name: str) -> None:
        if name not in self.aliases:
            raise APIError(f"The model {name!r} does not exist: this server serves {self.model_id!r}",
                           status=404, param="model", code="model_not_found")

    def model_card(self) -> Dict[str, Any]:
        card = {"id": self.model_id, "object": "model", "created": self.started, "owned_by": "mlx-dgemma"}
        for k in CONTEXT_FIELDS:
            card[k] = self.max_context
        card["max_position_embeddings"] = self.trained_context
        card["canvas_length"] = self.model.args.canvas_length
        card["meta"] = {"n_ctx_train": self.trained_context, "n_ctx": self.max_context,
                        "n_vocab": self.model.args.vocab_size}
        return card


def _delta(full: str, sent: str) -> Tuple[str, str]:
    """(new text, what counts as sent): text past ``sent``; if a decode changed earlier
    text (rare with byte-level BPE), resend from where they differ."""
    if full.startswith(sent):
        return full[len(sent):], full
    k = 0
    while k < min(len(full), len(sent)) and full[k] == sent[k]:
        k += 1
    return full[k:], sent + full[k:]


class Generation:
    """One request in flight: submits it, turns committed blocks into text and call deltas."""

    def __init__(self, state: ServerState, params: GenerationParams, text, stop: Sequence[str],
                 parallel_tool_calls: bool = True):
        self.state = state
        self.params = params
        self.text = text
        self.stop = list(stop)
        self.parallel = parallel_tool_calls
        self.loop = asyncio.get_running_loop()
        self.queue: "asyncio.Queue[Event]" = asyncio.Queue()
        self.req = GenerationRequest(params, self._on_event)
        self.tokens: List[int] = []
        self.stats: Dict[str, Any] = {}
        self.cached_tokens = 0
        self.sent = {"thought": "", "answer": ""}
        self.calls: List[Dict[str, str]] = []  # parsed calls sent so far
        self.finish_reason: Optional[str] = None
        self.done = False

    def _on_event(self, ev: Event) -> None:  # scheduler thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)

    def _deltas(self, final: bool) -> Tuple[Dict[str, Any], Optional[str]]:
        if final and hasattr(self.text, "finish"):
            self.text.finish()  # an unclosed call is parsed (or becomes text) now
        thought, answer = self.text.thought, self.text.answer
        if not final:  # hold back a trailing incomplete UTF-8 character
            thought, answer = thought.rstrip("\ufffd"), answer.rstrip("\ufffd")
        finish = None
        if self.stop:
            hits = [i for i in (answer.find(s) for s in self.stop) if i >= 0]
            if hits:
                answer, finish = answer[: min(hits)], "stop"
            elif not final:  # a stop string may be completed by the next block
                hold = max(len(s) for s in self.stop) - 1
                answer = answer[: max(len(self.sent["answer"]), len(answer) - hold)]
        out: Dict[str, Any] = {}
        for name, full in (("thought", thought), ("answer", answer)):
            out[name], self.sent[name] = _delta(full, self.sent[name])
        calls = getattr(self.text, "calls", [])
        if not self.parallel:
            calls = calls[:1]
        out["calls"] = calls[len(self.calls):]
        self.calls = list(calls)
        return out, finish

    async def run(self) -> AsyncIterator[Tuple[Dict[str, Any], Optional[str], List[int]]]:
        """Yields (deltas, None, block tokens) per committed block, then
        (deltas, finish_reason, []). deltas: new "thought" and "answer" text, new "calls"."""
        self.state.scheduler.submit(self.req)
        try:
            while True:
                ev = await self.queue.get()
                if ev.kind == "prefilled":
                    self.cached_tokens = int(ev.stats.get("cached_tokens", 0))
                elif ev.kind == "error":
                    raise APIError(ev.message, status=500)
                elif ev.kind == "cancelled":
                    self.finish_reason = self.finish_reason or "stop"
                    return
                elif ev.kind == "block":
                    self.tokens.extend(ev.tokens)
                    self.text.feed(ev.tokens)
                    d, finish = self._deltas(final=False)
                    if finish:
                        self.finish_reason = finish
                        self.req.cancel()
                        yield d, None, ev.tokens
                        yield {"thought": "", "answer": "", "calls": []}, finish, []
                        return
                    yield d, None, ev.tokens
                elif ev.kind == "done":
                    self.done = True
                    self.stats = ev.stats
                    d, finish = self._deltas(final=True)
                    self.finish_reason = finish or ev.finish_reason
                    if self.calls and self.finish_reason == "stop":
                        self.finish_reason = "tool_calls"
                    yield d, self.finish_reason, []
                    return
        finally:
            if not self.done:  # the client left, or a stop string matched: free the row
                self.req.cancel()

    def usage(self) -> Dict[str, Any]:
        n, c = len(self.params.prompt), len(self.tokens)
        return {"prompt_tokens": n, "completion_tokens": c, "total_tokens": n + c,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    async def collect(self, request: Request) -> Dict[str, Any]:
        """The whole reply: {"thought", "answer", "calls"}; a client that hangs up frees
        its batch row."""

        async def watch():
            while True:
                await asyncio.sleep(0.5)
                if await request.is_disconnected():
                    self.req.cancel()
                    return

        watcher = asyncio.create_task(watch())
        out: Dict[str, Any] = {"thought": "", "answer": "", "calls": []}
        try:
            async for d, _, _ in self.run():
                out["thought"] += d["thought"]
                out["answer"] += d["answer"]
                out["calls"] += d["calls"]
        finally:
            watcher.cancel()
        return out


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"We could not parse the JSON body of your request: {e}") from None


def _sse(obj: Any, event: Optional[str] = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="mlx-dgemma", version="0.1.0")
    app.state.server = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return _error(APIError(f"{request.method} {request.url.path}: {e.detail}", status=e.status_code,
                               type="invalid_request_error"))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("internal error")
        return _error(APIError(f"internal error: {type(e).__name__}: {e}".splitlines()[0], status=500))

    @app.middleware("http")
    async def _api_key(request: Request, call_next):
        path = request.url.path
        if state.requires_key and (path == "/v1" or path.startswith("/v1/")) \
                and not state.authorized(request.headers.get("authorization")):
            return _error(APIError("Incorrect or missing API key: send the header 'Authorization: Bearer <key>' "
                                   "with the key the server was started with", status=401,
                                   type="invalid_request_error", code="invalid_api_key"))
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state.model_id, "max_context": state.max_context,
                **state.scheduler.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [state.model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        state.check_model(name)
        return state.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        p = _parse(await _json_body(request), chat=True)
        return await _complete(request, p, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        p = _parse(await _json_body(request), chat=False)
        return await _complete(request, p, chat=False)

    @app.post("/v1/responses")
    async def create_response(request: Request):
        body = await _json_body(request)
        chat_body, ignored = responses.to_chat(body)
        p = _parse(chat_body, chat=True)
        p.ignored = sorted(set(p.ignored) | set(ignored))
        gen = await _start(p, chat=True)
        builder = responses.ResponseBuilder(body, state.model_id, p.parallel_tool_calls)
        extra = {"x_ignored_fields": p.ignored} if p.ignored else {}
        if p.stream:
            return StreamingResponse(_stream_response(gen, builder, extra), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        reply = await gen.collect(request)
        builder.add(reply)
        _, final = builder.finish(gen.finish_reason, _responses_usage(gen), **extra)
        return final

    def _parse(body: Any, chat: bool) -> Parsed:
        p = parse_request(body, chat=chat, strict_sampling=state.strict_sampling, log=log)
        state.check_model(p.model)
        return p

    async def _start(p: Parsed, chat: bool) -> Generation:
        if chat:
            p.processed_images = await asyncio.to_thread(state.image_inputs, p)
            counts = [im.num_soft_tokens for im in p.processed_images]
            prompt, snaps = await asyncio.to_thread(state.chat_tokens, p, counts)
            text = ReplyParser(state.tokenizer, state.tools if p.tools and p.tool_choice != "none" else None,
                               thinking=p.thinking, prompt_tokens=prompt, stop_tokens=state.eos_token_ids,
                               tools=p.tools)
        else:
            prompt, snaps = await asyncio.to_thread(state.completion_tokens, p), []
            text = PlainText(state.tokenizer)
        params = state.params(p, prompt, snaps, chat)
        return Generation(state, params, text, p.stop, parallel_tool_calls=p.parallel_tool_calls)

    async def _complete(request: Request, p: Parsed, chat: bool):
        gen = await _start(p, chat)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        common = {"id": rid, "created": int(time.time()), "model": state.model_id,
                  "system_fingerprint": "mlx-dgemma", "seed": gen.params.seed}
        if p.stream:
            return StreamingResponse(_stream(gen, p, chat, common), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        collected = await gen.collect(request)
        return replies.reply(p, chat, common, collected, gen.finish_reason, gen.tokens, gen.params.prompt,
                                 gen.usage(), gen.stats)

    async def _stream(gen: Generation, p: Parsed, chat: bool, common: dict):
        chunk = replies.Chunks(p, chat, common).chunk

        try:
            if chat:
                yield _sse(chunk({}, None, first=True))
            async for d, finish, tokens in gen.run():
                if finish is None:
                    yield _sse(chunk(d, None, tokens=tokens))
                else:
                    if d["answer"] or d["thought"] or d["calls"]:  # held back until the end
                        yield _sse(chunk(d, None))
                    yield _sse(chunk({}, finish))
            if p.include_usage:
                yield _sse(replies.Chunks(p, chat, common).usage(gen.usage(), gen.stats))
        except APIError as e:
            yield _sse(e.body())
        yield "data: [DONE]\n\n"

    def _responses_usage(gen: Generation) -> Dict[str, Any]:
        n, cached = len(gen.params.prompt), gen.cached_tokens
        return responses.usage(n, len(gen.tokens), cached, n - cached if state.store.enabled else 0)

    async def _stream_response(gen: Generation, builder: "responses.ResponseBuilder", extra: dict):
        def send(events):
            return "".join(_sse(ev, ev["type"]) for ev in events)

        yield send([builder.event("response.created", response=builder.response("in_progress")),
                    builder.event("response.in_progress", response=builder.response("in_progress"))])
        try:
            async for d, finish, _ in gen.run():
                events = builder.add(d)
                if finish is not None:
                    events += builder.finish(finish, _responses_usage(gen), **extra)[0]
                if events:
                    yield send(events)
        except APIError as e:
            failed = builder.response("failed", error={"code": "server_error", "message": e.message})
            yield send([builder.event("response.failed", response=failed)])

    return app


def _model_id(path_or_id: str) -> str:
    p = Path(path_or_id)
    return p.name if p.exists() else path_or_id


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mlx_dgemma.server", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model folder or hub id")
    ap.add_argument("--adapter-path", default=None, help="fine-tuned adapters (python -m mlx_dgemma.lora) to apply")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--served-model-name", default=None, help="the id clients send (default: folder name or hub id)")
    ap.add_argument("--max-context", type=int, default=None,
                    help="lower the advertised and enforced context (default: max_position_embeddings)")
    ap.add_argument("--cache-size-gb", type=float, default=4.0, help="prompt-cache budget; 0 turns reuse off")
    ap.add_argument("--max-batch", type=int, default=4, help="requests denoised together in one pass")
    ap.add_argument("--prefill-chunk", type=int, default=2048, help="prompt tokens encoded per step")
    ap.add_argument("--default-max-tokens", type=int, default=None,
                    help="when a request sets no max_tokens (default: the rest of the context)")
    ap.add_argument("--strict-sampling", action="store_true",
                    help="answer 400 to any sampling field (temperature, top_p, penalties...) other than its "
                         "neutral value, instead of applying or ignoring it")
    ap.add_argument("--ignore-sampling-params", action="store_true", help=argparse.SUPPRESS)  # the default now
    ap.add_argument("--api-key", default=None,
                    help=f"require 'Authorization: Bearer KEY' on every /v1 route (default: ${API_KEY_ENV}, "
                         "else no key)")
    ap.add_argument("--allow-local-images", action="store_true",
                    help="accept image parts that name a file on this machine (file:// or a path); "
                         "off by default: clients send data: URLs")
    ap.add_argument("--max-image-pixels", type=int, default=None,
                    help="refuse larger images before decoding them (default: 50,000,000)")
    ap.add_argument("--log-level", default="info")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvicorn
    except ImportError:
        raise SystemExit("mlx_dgemma.server needs uvicorn: pip install 'mlx-dgemma[server]'") from None
    from . import runtime
    from .cli import resolve_model  # the CLI's resolver: "demo", hub ids, unconverted checkpoints
    from .errors import ConfigError, WeightsError

    runtime.announce()  # which BLAS MLX's matmuls use (Linux), and how to get the fast one
    try:
        model, tokenizer, _ = resolve_model(args.model, log.info, args.adapter_path)
    except (ConfigError, WeightsError, OSError) as e:
        raise SystemExit(f"error: {e}".splitlines()[0]) from None
    model_id = args.served_model_name or _model_id(args.model)
    try:
        state = ServerState(
            model, tokenizer, model_id, model_path=getattr(model, "path", None),
            max_context=args.max_context, cache_size_gb=args.cache_size_gb, max_batch=args.max_batch,
            prefill_chunk=args.prefill_chunk, default_max_tokens=args.default_max_tokens,
            strict_sampling=args.strict_sampling,
            aliases=[args.model, Path(args.model).name, _model_id(args.model)],
            api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
            allow_local_images=args.allow_local_images, max_image_pixels=args.max_image_pixels,
        )
    except (ValueError, SettingsError) as e:
        raise SystemExit(f"error: {e}") from None
    state.start()
    log.info("serving %s on http://%s:%d (context %d tokens, batch %d, %s)", model_id, args.host, args.port,
             state.max_context, args.max_batch, "API key required" if state.requires_key else "no API key")
    if not state.requires_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without an API key: anyone who can reach this port can use the model "
                    "(set --api-key or $%s)", args.host, API_KEY_ENV)
    try:
        uvicorn.run(create_app(state), host=args.host, port=args.port, log_level=args.log_level.lower())
    finally:
        state.stop()


if __name__ == "__main__":
    main()
