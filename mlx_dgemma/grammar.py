"""Structured output: the one module that talks to the grammar engine (llguidance).

llguidance (the engine of vLLM, llama.cpp and mlx-vlm's autoregressive path) compiles a
JSON schema, ``json_object``, a regex or a Lark grammar against the tokenizer's vocabulary
and then, per decoding step, gives the set of tokens that keep the text a valid prefix
(a bitmask, computed lazily and cheaply), the tokens the grammar forces next ("fast
forward") and whether the text so far is a complete match.

Here:

- :class:`GrammarSpec` is what a user asked for (``response_format``, ``grammar=``, a
  file, ``tool_choice``), checked and compiled up front: a bad schema or grammar raises
  :class:`GrammarError` (one line) before any model work;
- :class:`Grammar` binds a spec to a tokenizer, the model's vocabulary and its stop
  tokens; :meth:`Grammar.matcher` starts one reply;
- :class:`Matcher` follows one reply: :meth:`~Matcher.allowed` (boolean [V]),
  :meth:`~Matcher.mask` (additive MLX mask: 0 or ``MASKED``), :meth:`~Matcher.forced`,
  :meth:`~Matcher.valid_prefix`, :meth:`~Matcher.consume`, :attr:`~Matcher.accepting`.

Stop tokens (EOS, ``<turn|>`` ...) are the runtime's, not the engine's: a stop token is
allowed exactly when the text so far is a complete match, and it ends the reply (it is
never fed to the engine). JSON is compiled compact (no free whitespace): a model cannot
pad a reply with blanks forever, and every token carries content.
"""

from __future__ import annotations

import json
import re
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from .logits_processors import MASKED

try:
    import llguidance
    import llguidance.hf
    import llguidance.numpy as _llg_np
except ImportError:  # pragma: no cover - a pinned dependency
    llguidance = None

KINDS = ("json_schema", "json_object", "regex", "lark")
# Compact JSON: the separators a model is trained on, and no unbounded whitespace.
JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


class GrammarError(ValueError):
    """An invalid schema, grammar or response_format (one-line message)."""


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())[:400]


def _need_engine() -> None:
    if llguidance is None:
        raise GrammarError("structured output needs llguidance: pip install llguidance==1.9.1")


@dataclass(frozen=True)
class GrammarSpec:
    """What the reply must match: ``kind`` in :data:`KINDS`, ``source`` the schema (a
    dict), the regex or the Lark text (None for json_object); ``name`` for messages."""

    kind: str
    source: Any = None
    name: str = ""

    def engine_grammar(self) -> str:
        """The llguidance grammar (its JSON form)."""
        _need_engine()
        M = llguidance.LLMatcher
        if self.kind == "json_schema":
            return M.grammar_from_json_schema(self.source, overrides=JSON_OPTIONS)
        if self.kind == "json_object":
            return M.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
        if self.kind == "regex":
            return M.grammar_from_regex(self.source)
        return M.grammar_from_lark(self.source)

    def check(self) -> "GrammarSpec":
        """Compile without a tokenizer: raises :class:`GrammarError` when invalid."""
        _need_engine()
        try:
            err = llguidance.LLMatcher.validate_grammar(self.engine_grammar())
        except (ValueError, TypeError) as e:
            err = str(e)
        if err:
            raise GrammarError(f"invalid {self.what}: {_one_line(err)}")
        return self

    @property
    def what(self) -> str:
        label = {"json_schema": "JSON schema", "json_object": "json_object", "regex": "regex", "lark": "Lark grammar"}
        return label[self.kind] + (f" {self.name!r}" if self.name else "")


def from_response_format(rf: Any, param: str = "response_format") -> Optional[GrammarSpec]:
    """The OpenAI ``response_format`` (Chat Completions) or ``text.format`` (Responses):
    ``{"type": "text"}`` -> None, ``{"type": "json_object"}``, ``{"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}}`` (Responses: the fields sit at the top
    level). Checked and compiled (:class:`GrammarError`)."""
    if rf is None:
        return None
    if not isinstance(rf, Mapping):
        raise GrammarError(f"{param} must be an object with a type, got {type(rf).__name__}")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object").check()
    if kind == "json_schema":
        body = rf.get("json_schema", rf)  # chat: nested; responses: flat
        if not isinstance(body, Mapping):
            raise GrammarError(f"{param}.json_schema must be an object with a schema")
        schema = body.get("schema")
        if not isinstance(schema, Mapping):
            raise GrammarError(f"{param}.json_schema.schema must be a JSON schema object, got {schema!r}"[:300])
        strict = body.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise GrammarError(f"{param}.json_schema.strict must be true or false, got {strict!r}")
        name = body.get("name", "")
        return GrammarSpec("json_schema", dict(schema), name if isinstance(name, str) else "").check()
    if kind in ("regex", "lark", "grammar"):
        return from_grammar(dict(rf), param)
    raise GrammarError(f"{param}.type must be text, json_object or json_schema, got {kind!r}")


def from_grammar(grammar: Any, param: str = "grammar") -> GrammarSpec:
    """``grammar=``: a :class:`GrammarSpec`, a Lark grammar (str), or a dict
    ``{"type": "regex", "regex": ...}`` / ``{"type": "lark", "lark": ...}`` /
    ``{"type": "json_schema", "schema": ...}`` / ``{"type": "json_object"}``."""
    if isinstance(grammar, GrammarSpec):
        return grammar.check()
    if isinstance(grammar, str):
        if not grammar.strip():
            raise GrammarError(f"{param} is empty")
        return GrammarSpec("lark", grammar).check()
    if isinstance(grammar, Mapping):
        kind = grammar.get("type")
        if kind in ("regex", "lark"):
            src = grammar.get(kind)
            if not isinstance(src, str) or not src:
                raise GrammarError(f"{param}: a {kind} grammar needs a non-empty {kind!r} string")
            return GrammarSpec(kind, src).check()
        if kind in ("json_schema", "json_object", "text"):
            spec = from_response_format(grammar, param)
            if spec is None:
                raise GrammarError(f"{param}: type 'text' is no grammar")
            return spec
        raise GrammarError(f"{param}.type must be regex, lark, json_schema or json_object, got {kind!r}")
    raise GrammarError(f"{param} must be a Lark grammar (str) or an object with a type, got {type(grammar).__name__}")


def from_file(path: Union[str, Path], kind: Optional[str] = None) -> GrammarSpec:
    """A grammar file: ``kind="json_schema"`` (a JSON schema file), else by extension:
    ``.lark`` is Lark, ``.json`` a JSON schema, anything else ONE regex (the file's text,
    without its final newline)."""
    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise GrammarError(f"{p}: cannot read it ({e.__class__.__name__}: {e})".splitlines()[0]) from None
    if kind is None:
        kind = {".lark": "lark", ".json": "json_schema"}.get(p.suffix.lower(), "regex")
    if kind == "json_schema":
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as e:
            raise GrammarError(f"{p}: not valid JSON ({e})") from None
        if not isinstance(schema, dict):
            raise GrammarError(f"{p}: a JSON schema must be an object, got {type(schema).__name__}")
        spec = GrammarSpec("json_schema", schema, p.name)
    elif kind == "lark":
        spec = GrammarSpec("lark", text, p.name)
    else:
        spec = GrammarSpec("regex", text[:-1] if text.endswith("\n") else text, p.name)
    if spec.kind != "json_schema" and not spec.source.strip():
        raise GrammarError(f"{p}: the file is empty")
    try:
        return spec.check()
    except GrammarError as e:
        raise GrammarError(f"{p}: {e}") from None


def _lark_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


class _Unsupported(Exception):
    """A schema feature the Gemma-syntax translation does not cover (JSON is used then)."""


class GemmaArgs:
    """Lark rules for a tool call's arguments in Gemma 4's own syntax, from the tool's
    parameter schema: ``{city:<|"|>Paris<|"|>,days:3}``: bare keys, no spaces, strings
    between ``<|"|>`` tokens (raw text inside), numbers, booleans and null as in JSON
    (compiled by llguidance's ``%json``, ranges included). Covers objects (properties in
    the declared order, required or optional; no extra keys), strings (length limits,
    an anchored pattern, enum, const), numbers, integers, booleans, null, arrays (item
    schema, minItems / maxItems) and anyOf / oneOf / type lists; anything else raises
    :class:`_Unsupported`."""

    MAX_ITEMS = 64  # longer bounds are written as an open repetition

    def __init__(self, quote_id: int, prefix: str = "a"):
        self.q = f"<[{int(quote_id)}]>"
        self.prefix = prefix  # rule names: prefix0, prefix1 ...
        self.rules: List[str] = []

    def rule(self, body: str) -> str:
        name = f"{self.prefix}{len(self.rules)}"
        self.rules.append(f"{name}: {body}")
        return name

    def value(self, schema: Any) -> str:
        if schema is True or schema == {}:
            raise _Unsupported("any value")
        if not isinstance(schema, Mapping):
            raise _Unsupported("schema")
        for alt in ("anyOf", "oneOf"):
            if alt in schema:
                rest = {k: v for k, v in schema.items() if k not in (alt, "description", "title")}
                return self.rule(" | ".join(self.value({**rest, **sub}) for sub in schema[alt]))
        if "$ref" in schema or "allOf" in schema or "not" in schema:
            raise _Unsupported("$ref / allOf / not")
        if "const" in schema:
            return self.literal(schema["const"])
        if "enum" in schema:
            return self.rule(" | ".join(self.literal(v) for v in schema["enum"]))
        kind = schema.get("type")
        if isinstance(kind, list):
            return self.rule(" | ".join(self.value({**schema, "type": k}) for k in kind))
        if kind == "object":
            return self.obj(schema)
        if kind == "array":
            return self.array(schema)
        if kind == "string":
            return self.string(schema)
        if kind in ("integer", "number", "boolean", "null"):
            keep = {k: v for k, v in schema.items() if k in ("type", "minimum", "maximum", "exclusiveMinimum",
                                                               "exclusiveMaximum", "multipleOf")}
            return self.rule(f"%json {json.dumps(keep)}")
        raise _Unsupported(f"type {kind!r}")

    def literal(self, v: Any) -> str:
        if isinstance(v, str):
            return f"{self.q} {_lark_literal(v)} {self.q}" if v else f"{self.q} {self.q}"
        return _lark_literal(json.dumps(v, separators=(",", ":")))

    def string(self, schema: Mapping[str, Any]) -> str:
        pattern = schema.get("pattern")
        lo, hi = int(schema.get("minLength", 0)), schema.get("maxLength")
        if pattern is not None:
            if not (pattern.startswith("^") and pattern.endswith("$")) or lo or hi is not None:
                raise _Unsupported("unanchored pattern, or a pattern with length limits")
            body = f"/{pattern[1:-1]}/"
        elif lo or hi is not None:  # no "<" at all: the text "<|\"|>" would end the string for the parser
            body = f"/[^<]{{{lo},{'' if hi is None else int(hi)}}}/"
        else:  # a "<" is never followed by "|"
            body = "/([^<]|<[^|<])*/"
        return self.rule(f"{self.q} {body} {self.q}")

    def array(self, schema: Mapping[str, Any]) -> str:
        item = self.value(schema.get("items", {}))
        lo, hi = int(schema.get("minItems", 0)), schema.get("maxItems")
        if hi is not None and int(hi) > self.MAX_ITEMS:
            hi = None
        more = f'("," {item})*' if hi is None else f'("," {item}){{{max(lo - 1, 0)},{int(hi) - 1}}}'
        if hi is None and lo > 1:
            more = f'("," {item}){{{lo - 1},}}'
        if hi is not None and int(hi) == 0:
            return self.rule('"[]"')
        inner = f"{item} {more}"
        return self.rule(f'"[" {inner} "]"' if lo >= 1 else f'"[" ({inner})? "]"')

    def obj(self, schema: Mapping[str, Any]) -> str:
        props = schema.get("properties") or {}
        required = set(schema.get("required") or [])
        if required - set(props) or "patternProperties" in schema:
            raise _Unsupported("required keys without a schema, patternProperties")
        names = list(props)
        for n in names:
            if not re.fullmatch(r"\w+", n):
                raise _Unsupported(f"key {n!r}")  # Gemma 4 writes keys bare
        pairs = [f'"{n}:" {self.value(props[n])}' for n in names]
        if not names:
            return self.rule('"{}"')
        # first: the keys from i on, at least one written; after: the keys from i on after
        # a written one (maybe none). Optional keys may be skipped, the order is kept.
        first = after = None
        for i in range(len(names) - 1, -1, -1):
            tail = f" {after}" if after else ""
            if names[i] in required:
                first, after = self.rule(f"{pairs[i]}{tail}"), self.rule(f'"," {pairs[i]}{tail}')
            else:
                alt = f" | {first}" if first else ""
                first, after = self.rule(f"{pairs[i]}{tail}{alt}"), self.rule(f'("," {pairs[i]})?{tail}')
        return self.rule(f'"{{" {first} "}}"' if required else f'"{{" {first}? "}}"')


def tool_call_spec(tools: Sequence[Mapping[str, Any]], name: Optional[str], open_id: int, close_id: int,
                   quote_id: Optional[int] = None) -> GrammarSpec:
    """One Gemma 4 tool call, ``<|tool_call>call:NAME{...}<tool_call|>``, of the named
    function (or of any of ``tools`` when ``name`` is None: ``tool_choice: "required"``),
    its arguments constrained to the function's parameter schema: in Gemma 4's own syntax
    (:class:`GemmaArgs`, strings between ``quote_id`` tokens, ``<|"|>``) where the schema
    allows, else as JSON (which Gemma 4's call parser reads too)."""
    alts, rules = [], []
    for t in tools:
        fn = t["function"]
        if name is not None and fn["name"] != name:
            continue
        schema = dict(fn.get("parameters") or {"type": "object", "properties": {}})
        schema.setdefault("type", "object")
        head = _lark_literal("call:" + fn["name"])
        if quote_id is not None:
            g = GemmaArgs(quote_id, prefix=f"t{len(alts)}_")
            try:
                alts.append(f"{head} {g.value(schema)}")
                rules += g.rules
                continue
            except _Unsupported:
                pass
        if not schema.get("properties") and "additionalProperties" not in schema:
            schema["additionalProperties"] = False  # nothing to choose: {}
        schema["x-guidance"] = JSON_OPTIONS  # compact, as response_format's JSON
        alts.append(f"{head} %json {json.dumps(schema)}")
    if not alts:
        raise GrammarError(f"tool_choice: no tool is named {name!r}")
    body = "\n    | ".join(alts)
    lark = f"%llguidance {{}}\nstart: <[{int(open_id)}]> call <[{int(close_id)}]>\ncall: {body}\n"
    lark += "".join(r + "\n" for r in rules)
    return GrammarSpec("lark", lark, f"tool call {name}" if name else "tool call").check()


# ---------------------------------------------------------------------------------------
# Bound to a tokenizer


_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def engine_tokenizer(tokenizer, vocab_size: int):
    """llguidance's view of the tokenizer (built once per tokenizer: ~1 s for a large
    vocabulary)."""
    _need_engine()
    hf = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's TokenizerWrapper
    key = hf
    try:
        cached = _TOKENIZERS.get(key)
    except TypeError:
        cached, key = None, None
    if cached is not None and cached[0] == vocab_size:
        return cached[1]
    try:
        lt = llguidance.hf.from_tokenizer(hf, n_vocab=vocab_size)
    except Exception as e:
        raise GrammarError(f"structured output: llguidance cannot read this tokenizer ({_one_line(e)})") from None
    if key is not None:
        _TOKENIZERS[key] = (vocab_size, lt)
    return lt


class Grammar:
    """A spec compiled for one tokenizer and model: the factory of per-reply matchers."""

    def __init__(self, spec: GrammarSpec, tokenizer, vocab_size: int, stop_ids: Sequence[int] = ()):
        self.spec = spec
        self.vocab_size = int(vocab_size)
        self.stop_ids = sorted({int(t) for t in stop_ids if 0 <= int(t) < vocab_size})
        self.tok = engine_tokenizer(tokenizer, self.vocab_size)
        self.grammar = spec.engine_grammar()
        err = llguidance.LLMatcher.validate_grammar(self.grammar, self.tok)
        if err:
            raise GrammarError(f"invalid {spec.what}: {_one_line(err)}")

    def matcher(self) -> "Matcher":
        return Matcher(self)


class Matcher:
    """One reply's position in the grammar. Counts the time spent computing masks
    (``mask_seconds`` over ``masks``) and the tokens the grammar forced (``forced_tokens``,
    counted by the decoders that skip their forwards)."""

    def __init__(self, grammar: Grammar):
        self.g = grammar
        self.m = llguidance.LLMatcher(grammar.tok, grammar.grammar)
        if self.m.is_error():
            raise GrammarError(f"invalid {grammar.spec.what}: {_one_line(self.m.get_error())}")
        V = grammar.vocab_size
        self._bits = _llg_np.allocate_token_bitmask(1, grammar.tok.vocab_size)
        self._V = V
        self._stop = np.asarray(grammar.stop_ids, np.int64)
        self._engine_eos = int(grammar.tok.eos_token) if grammar.tok.eos_token is not None else None
        self.tokens: List[int] = []  # consumed (never a stop token)
        self.ended = False  # a stop token was consumed
        self.mask_seconds = 0.0
        self.masks = 0
        self.forced_tokens = 0

    # ---- queries ---------------------------------------------------------------------
    @property
    def accepting(self) -> bool:
        """The text so far is a complete match (a stop token may follow)."""
        return bool(self.m.is_accepting())

    @property
    def done(self) -> bool:
        """Nothing but a stop token can follow (or a stop token was consumed)."""
        return self.ended or bool(self.m.is_stopped())

    def allowed(self) -> np.ndarray:
        """bool [V]: the tokens that keep the reply valid (stop tokens iff accepting)."""
        t0 = time.perf_counter()
        if self.m.is_stopped():
            ok = np.zeros(self._V, bool)
        else:
            _llg_np.fill_next_token_bitmask(self.m, self._bits, 0)
            ok = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self._V].astype(bool)
            if len(ok) < self._V:
                ok = np.concatenate([ok, np.zeros(self._V - len(ok), bool)])
            if self._engine_eos is not None and self._engine_eos < self._V:
                ok[self._engine_eos] = False  # the runtime's stop tokens decide the end
        if self._stop.size and self.m.is_accepting():
            ok[self._stop] = True
        self.mask_seconds += time.perf_counter() - t0
        self.masks += 1
        return ok

    def mask(self) -> mx.array:
        """[V] float32 additive mask: 0 where allowed, ``MASKED`` elsewhere."""
        return mx.array(np.where(self.allowed(), 0.0, MASKED).astype(np.float32))

    def forced(self) -> List[int]:
        """The tokens the grammar forces next (none when a stop token is possible)."""
        if self.done or self.m.is_accepting():
            return []
        return [int(t) for t in self.m.compute_ff_tokens()]

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many of ``tokens`` form a valid continuation; a stop token counts (and ends
        the count) where the text before it is a complete match."""
        toks = [int(t) for t in tokens]
        stop = set(self.g.stop_ids)
        cut = next((i for i, t in enumerate(toks) if t in stop or t == self._engine_eos), len(toks))
        if self.ended:
            return 0
        n = int(self.m.validate_tokens(toks[:cut])) if cut else 0
        if n < cut or cut == len(toks) or toks[cut] not in stop:
            return n
        if n and not self.m.consume_tokens(toks[:n]):  # pragma: no cover - validated above
            raise RuntimeError(self.m.get_error())
        ok = self.m.is_accepting()
        if n:
            self.m.rollback(n)
        return n + 1 if ok else n

    # ---- moves -----------------------------------------------------------------------
    def consume(self, tokens: Sequence[int]) -> None:
        """Advance over committed tokens (each one valid: a stop token ends the reply)."""
        for t in tokens:
            t = int(t)
            if self.ended:
                raise ValueError("grammar: a token after the stop token")
            if t in self.g.stop_ids:
                if not self.m.is_accepting():
                    raise ValueError(f"grammar: stop token {t} before the reply is complete")
                self.ended = True
                continue
            if not self.m.consume_token(t):
                raise ValueError(f"grammar: token {t} is not allowed here ({_one_line(self.m.get_error())})")
            self.tokens.append(t)

    # Canvas positions masked per denoising step, at most: the first invalid one and those
    # just before it (a mask is O(vocabulary): 32 rows of Gemma's 262K are ~8M booleans).
    CANVAS_ROWS = 32

    def canvas_mask(self, canvas: Sequence[int], limit: int) -> Tuple[int, np.ndarray]:
        """``(start, allowed)`` for a diffusion canvas that continues the reply:
        ``allowed[j - start]`` (bool [V]) holds the tokens allowed after the canvas's first
        ``j`` tokens, for ``j = start .. k``, where ``k`` is the canvas's valid prefix
        (capped at ``limit - 1``) and ``start = max(0, k + 1 - CANVAS_ROWS)``; the other
        positions are unconstrained. The matcher is left where it was."""
        toks = [int(t) for t in canvas]
        k = min(self.valid_prefix(toks), limit - 1, len(toks) - 1)
        start = max(0, k + 1 - self.CANVAS_ROWS)
        stop = set(self.g.stop_ids)
        if start and not self.m.consume_tokens(toks[:start]):  # pragma: no cover - validated above
            raise RuntimeError(self.m.get_error())
        rows, consumed = [], start
        for j in range(start, k + 1):
            rows.append(self.allowed())
            if j == k or toks[j] in stop or self.m.is_stopped():
                break
            self.m.consume_token(toks[j])
            consumed += 1
        if consumed:
            self.m.rollback(consumed)
        return start, np.stack(rows)

    def canvas_process(self, limit: int):
        """The drafter's ``process`` hook (one row): each step's logits masked at the
        canvas positions the grammar decides (see :meth:`canvas_mask`)."""

        def process(logits: mx.array, draft: mx.array) -> mx.array:
            start, rows = self.canvas_mask(np.array(draft)[0].tolist(), limit)
            end = start + len(rows)
            head = mx.where(mx.array(rows)[None], logits[:, start:end], MASKED)
            return mx.concatenate([logits[:, :start], head, logits[:, end:]], axis=1)

        return process


def as_spec(response_format: Any = None, grammar: Any = None) -> Optional[GrammarSpec]:
    """The spec of a generate call's ``response_format=`` / ``grammar=`` (at most one)."""
    if response_format is not None and grammar is not None:
        raise GrammarError("give response_format or grammar, not both")
    if grammar is not None:
        return from_grammar(grammar)
    return from_response_format(response_format)
