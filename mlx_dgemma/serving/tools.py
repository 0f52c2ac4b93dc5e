"""Tool calling: OpenAI ``tools`` in, Gemma 4 calls out.

Requests: ``tools`` (function tools) go to the chat template, which declares them in the
system turn; history messages carry ``tool_calls`` (arguments as JSON text, turned into
objects for the template) and ``tool`` results. ``tool_choice``:

- ``auto``: the model decides;
- ``none``: the tools stay in the prompt (the prompt, and so its cache, is the same as
  on the other turns) and the call marker ``<|tool_call>`` is suppressed in the canvas,
  so the model writes text;
- ``required`` / a named function: the reply IS one call, in any decode mode: a grammar
  (:func:`mlx_dgemma.grammar.tool_call_spec`) holds it to ``<|tool_call>call:NAME{...}
  <tool_call|>`` with NAME one of the tools (or the named one) and the arguments valid
  under that tool's parameter schema, in Gemma 4's syntax (``{city:<|"|>Paris<|"|>}``;
  as JSON for schemas that syntax's translation does not cover). (:meth:`ToolFormat.pins`, the older
  canvas pinning of the call's opening, is kept for callers of the library.)

Replies: :class:`ReplyParser` splits the generated tokens into thought, text and calls.
It works on the COMMITTED tokens, so a call that starts in one block and ends in the
next is parsed once, when its ``<tool_call|>`` arrives (the server sends it in the
chunk of the block that completes it); the tokens are decoded with special tokens kept
(``<|"|>`` is one) and parsed by mlx-lm's Gemma 4 parser (``tokenizer.tool_parser``).
A call that does not parse, or never closes, comes back as text.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..chat import ThoughtParser, _vocab
from ..chat_template import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, TOOL_RESPONSE_OPEN
from .errors import APIError

# The Gemma 4 parser reads names as [\w-]+; OpenAI allows a-z, A-Z, 0-9, _ and -, 64 long.
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def check_tools(tools: Any, param: str = "tools") -> List[Dict[str, Any]]:
    """Function tools in the Chat Completions shape ``{"type": "function", "function":
    {"name", "description", "parameters"}}``, checked field by field."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise APIError(f"{param} must be a list of tools", param=param)
    out = []
    for i, tool in enumerate(tools):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise APIError(f"{where}: only function tools are supported, got {kind!r}", param=where)
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise APIError(f"{where}.function must be an object with a name", param=where)
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise APIError(f"{where}.function.name must match ^[a-zA-Z0-9_-]{{1,64}}$, got {name!r}", param=where)
        desc = fn.get("description", "")
        if desc is not None and not isinstance(desc, str):
            raise APIError(f"{where}.function.description must be a string", param=where)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise APIError(f"{where}.function.parameters must be a JSON schema object", param=where)
        out.append({"type": "function", "function": {"name": name, "description": desc or "",
                                                     **({"parameters": params} if params else {})}})
    names = [t["function"]["name"] for t in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise APIError(f"{param}: the function name {dup!r} is declared twice", param=param)
    return out


def check_tool_choice(choice: Any, tools: List[Dict[str, Any]], param: str = "tool_choice") -> Tuple[str, Optional[str]]:
    """(mode, function name): mode is "none", "auto", "required" or "function"."""
    if choice is None:
        return ("auto" if tools else "none"), None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise APIError(f"{param} must be none, auto, required or a function, got {choice!r}", param=param)
        mode, name = choice, None
    elif isinstance(choice, dict) and choice.get("type") == "function":
        fn = choice.get("function") if isinstance(choice.get("function"), dict) else choice  # chat | responses
        name = fn.get("name")
        if not isinstance(name, str):
            raise APIError(f"{param}: a named tool choice needs function.name", param=param)
        mode = "function"
    else:
        raise APIError(f"{param} must be none, auto, required or {{\"type\": \"function\", ...}}, got {choice!r}",
                       param=param)
    if mode in ("required", "function") and not tools:
        raise APIError(f"{param}={choice!r} needs tools", param=param)
    if mode == "function" and name not in {t["function"]["name"] for t in tools}:
        raise APIError(f"{param}: no tool is named {name!r}", param=param)
    return mode, name


def history_tool_calls(calls: Any, where: str) -> List[Dict[str, Any]]:
    """An assistant message's ``tool_calls`` for the template: arguments as objects."""
    if not isinstance(calls, list):
        raise APIError(f"{where}.tool_calls must be a list", param=where)
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError(f"{where}.tool_calls[{j}] must have function.name", param=where)
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise APIError(f"{where}.tool_calls[{j}].function.arguments is not valid JSON: {e}",
                               param=where) from None
        out.append({"id": call.get("id") or call_id(), "type": "function",
                    "function": {"name": fn["name"], "arguments": args}})
    return out


class ToolFormat:
    """The tokenizer's tool-call markers (single special tokens, as in Gemma 4)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        vocab = _vocab(tokenizer)
        self.parser = getattr(tokenizer, "tool_parser", None) if getattr(tokenizer, "has_tool_calling", False) else None
        start, end = getattr(tokenizer, "tool_call_start", None), getattr(tokenizer, "tool_call_end", None)
        self.open_id, self.close_id = vocab.get(start or TOOL_CALL_OPEN), vocab.get(end or TOOL_CALL_CLOSE)
        self.open_text, self.close_text = start or TOOL_CALL_OPEN, end or TOOL_CALL_CLOSE
        self.response_id = vocab.get(TOOL_RESPONSE_OPEN)  # what a model writes after its calls
        self.quote_id = vocab.get('<|"|>')  # Gemma 4's string delimiter in call arguments

    @property
    def supported(self) -> bool:
        return self.parser is not None and self.open_id is not None and self.close_id is not None

    def encode(self, text: str) -> List[int]:
        return [int(t) for t in self.tokenizer.encode(text, add_special_tokens=False)]

    def pins(self, mode: str, name: Optional[str], tools: List[Dict[str, Any]]) -> Dict[int, int]:
        """Reply position -> token for ``tool_choice`` required / named function."""
        if mode == "required":
            opening = self.encode(self.open_text + "call:")
        elif mode == "function":
            fn = next(t["function"] for t in tools if t["function"]["name"] == name)
            if not ((fn.get("parameters") or {}).get("properties")):  # nothing left to choose
                opening = self.encode(f"{self.open_text}call:{name}{{}}{self.close_text}")
                if self.response_id is not None:
                    opening.append(self.response_id)
            else:
                opening = self.encode(f"{self.open_text}call:{name}{{")
        else:
            return {}
        return dict(enumerate(opening))


class ReplyParser(ThoughtParser):
    """Thought, text and tool calls of a reply, from its committed tokens.

    Tokens between ``<|tool_call>`` and ``<tool_call|>`` form a call segment. A closed
    segment is parsed at once; one still open waits for more tokens, or for
    :meth:`finish` (the end of the reply), when it is parsed as it is. A segment that
    does not parse is text: ``<|tool_call>...`` as the model wrote it. ``calls`` lists
    the parsed calls in order, each with a stable id.
    """

    def __init__(self, tokenizer, tools_format: Optional[ToolFormat], thinking: bool = False,
                 prompt_tokens: Sequence[int] = (), stop_tokens: Sequence[int] = (), tools=None):
        super().__init__(tokenizer, thinking=thinking, prompt_tokens=prompt_tokens, stop_tokens=stop_tokens)
        self.fmt = tools_format if tools_format is not None and tools_format.supported else None
        self.tools = tools
        self.in_call = False
        self.final = False

    def _feed_token(self, t: int) -> None:
        if self.fmt is None:
            return super()._feed_token(t)
        if self.in_call:
            seg = self._segments[-1]
            if t == self.fmt.close_id:
                seg[2] = True  # closed
                self.in_call = False
                self._segments.append(["thought" if self.in_channel else "answer", []])
            else:
                seg[1].append(t)
        elif t == self.fmt.open_id:
            self.in_call = True
            self._segments.append(["call", [], False, None])  # kind, tokens, closed, parsed calls
        else:
            super()._feed_token(t)

    def finish(self) -> None:
        """The reply is complete: an unclosed call is parsed as it stands."""
        self.final = True

    def _parse(self, seg: list) -> Optional[List[Dict[str, str]]]:
        if seg[3] is None and (seg[2] or self.final):
            text = self.tokenizer.decode(seg[1], skip_special_tokens=False) if seg[1] else ""
            seg[3] = _parse_calls(self.fmt.parser, text, self.tools) or False
        return seg[3] or None

    def _segment_texts(self):
        for seg in self._segments:
            if seg[0] != "call":
                yield seg[0], self._decode(seg[1])
            elif self._parse(seg) is None and (seg[2] or self.final):  # did not parse: text
                raw = self.tokenizer.decode(seg[1], skip_special_tokens=False) if seg[1] else ""
                yield "answer", self.fmt.open_text + raw + (self.fmt.close_text if seg[2] else "")

    @property
    def calls(self) -> List[Dict[str, str]]:
        """Parsed calls so far: ``{"id", "name", "arguments"}`` (arguments as JSON text)."""
        if self.fmt is None:
            return []
        return [c for seg in self._segments if seg[0] == "call" for c in (self._parse(seg) or [])]


# A call whose arguments are JSON (what a tool_choice grammar writes: mlx_dgemma.grammar.tool_call_spec).
_JSON_CALL = re.compile(r"\s*call:([\w-]+)(\{.*\})\s*", re.DOTALL)


def _json_call(text: str) -> Optional[Dict[str, Any]]:
    """``call:NAME{JSON}`` read as JSON (Gemma's own parser would misread JSON strings
    holding braces, ``<`` or ``word:``)."""
    m = _JSON_CALL.fullmatch(text)
    if m is None:
        return None
    try:
        args = json.loads(m.group(2))
    except json.JSONDecodeError:
        return None
    return {"name": m.group(1), "arguments": args} if isinstance(args, dict) else None


def _parse_calls(parser, text: str, tools) -> Optional[List[Dict[str, str]]]:
    try:
        out = _json_call(text) or parser(text, tools)
    except Exception:  # whatever the model wrote, a bad call is text, never an error
        return None
    out = out if isinstance(out, list) else [out]
    calls = []
    for c in out:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not isinstance(c.get("arguments"), dict):
            return None
        calls.append({"id": call_id(), "name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)})
    return calls or None


def chat_tool_calls(calls: Sequence[Dict[str, str]], start: int = 0, streaming: bool = False) -> List[Dict[str, Any]]:
    """Calls in the Chat Completions shape (``index`` when streaming)."""
    out = []
    for i, c in enumerate(calls):
        d = {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        if streaming:
            d = {"index": start + i, **d}
        out.append(d)
    return out
