"""The Responses API (``POST /v1/responses``) on top of the chat pipeline.

A request is translated into a Chat Completions body (:func:`to_chat`), validated and
run like any chat request; the reply is built back as a Response object
(:class:`ResponseBuilder`), or streamed as Responses events. What is translated:

- ``input``: a string (one user message) or a list of items: messages (``role`` with
  string content or ``input_text``/``output_text`` parts), ``function_call`` items
  (merged into the assistant turn they belong to), ``function_call_output`` items
  (tool results), ``reasoning`` items (skipped: the template drops old thoughts);
- ``instructions`` -> a system message first; ``tools`` (function tools, flat Responses
  shape or the chat shape) and ``tool_choice``; ``max_output_tokens`` -> ``max_tokens``;
  ``reasoning.effort`` -> thinking; ``text.format``: text, json_object or json_schema (structured output);
- sampling and drafter fields pass through with the chat policy.

There is no response store: ``previous_response_id``, ``conversation`` and
``item_reference`` items get a 400 that says so; ``store`` is accepted and ignored
(replies say ``"store": false``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

from ..grammar import GrammarError, from_response_format
from .errors import APIError
from .protocol import image_url_of

# Accepted Responses fields that do not change what is generated.
BENIGN = {"store", "metadata", "user", "service_tier", "safety_identifier", "prompt_cache_key",
          "prompt_cache_retention", "truncation", "stream_options"}
# Responses fields with a chat counterpart of the same name.
PASSED = {"model", "stream", "temperature", "top_p", "parallel_tool_calls", "seed"}
_NO_STORE = "this server keeps no response store: send the whole conversation in input"


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _text(content: Any, where: str):
    """The text of a content list, or, when it holds ``input_image`` parts, chat parts
    (text and ``image_url``) in their order."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(f"{where}.content must be a string or a list of parts", param=where)
    parts, images = [], False
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "refusal", "summary_text", "reasoning_text"):
            text = part.get("text", part.get("refusal"))
            if not isinstance(text, str):
                raise APIError(f"{where}.content[{j}] has no text", param=where)
            parts.append({"type": "text", "text": text})
        elif kind == "input_image":
            if part.get("file_id") and not part.get("image_url"):
                raise APIError(f"{where}.content[{j}]: file_id images are not supported (no file store): "
                               "send image_url as a data: URL", param=where)
            parts.append({"type": "image_url", "image_url": {"url": image_url_of(part, f"{where}.content[{j}]")}})
            images = True
        else:
            raise APIError(f"{where}.content[{j}]: {kind!r} input is not supported (text and images only)",
                           param=where)
    return parts if images else "".join(p["text"] for p in parts)


def _messages(body: Dict[str, Any]) -> List[Dict[str, Any]]:
    msgs: List[Dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise APIError("instructions must be a string", param="instructions")
        if instructions:
            msgs.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise APIError("input must be a non-empty string or a non-empty list of items", param="input")
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise APIError(f"{where} must be an object", param=where)
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise APIError(f"{where}.role must be user, assistant, system or developer; got {role!r}", param=where)
            msgs.append({"role": role, "content": _text(item.get("content"), where)})
        elif kind == "function_call":
            for key in ("call_id", "name"):
                if not isinstance(item.get(key), str):
                    raise APIError(f"{where}: a function_call item needs {key}", param=where)
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"}}
            last = msgs[-1] if msgs else None
            if last is not None and last["role"] == "assistant":  # calls belong to the turn before them
                last.setdefault("tool_calls", []).append(call)
            else:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise APIError(f"{where}: a function_call_output item needs call_id", param=where)
            output = item.get("output")
            msgs.append({"role": "tool", "tool_call_id": item["call_id"],
                         "content": output if isinstance(output, str) else _text(output, where)})
        elif kind == "reasoning":
            continue  # the template keeps no thoughts of finished turns
        elif kind == "item_reference":
            raise APIError(f"{where}: item_reference needs stored items; {_NO_STORE}", param=where)
        else:
            raise APIError(f"{where}: items of type {kind!r} are not supported (messages, function_call, "
                           "function_call_output)", param=where)
    return msgs


def _tools(tools: Any) -> Any:
    if not isinstance(tools, list):
        return tools  # check_tools answers
    out = []
    for i, t in enumerate(tools):
        if isinstance(t, dict) and t.get("type") == "function" and "function" not in t:
            out.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")
                                                         if k in t}})
        else:
            out.append(t)  # chat shape, or a hosted tool that check_tools turns away
    return out


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function" and "function" not in choice:
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def to_chat(body: Any) -> Tuple[Dict[str, Any], List[str]]:
    """(a Chat Completions body, Responses fields not applied)."""
    if not isinstance(body, dict):
        raise APIError(f"the request body must be a JSON object, got {type(body).__name__}")
    for name in ("previous_response_id", "conversation"):
        if body.get(name):
            raise APIError(f"{name} is not supported: {_NO_STORE}", param=name)
    if body.get("prompt"):
        raise APIError("stored prompts (prompt) are not supported: send input and instructions", param="prompt")
    if body.get("background"):
        raise APIError("background responses are not supported: stream instead", param="background")
    chat: Dict[str, Any] = {"messages": _messages(body)}
    ignored = []
    for name, value in body.items():
        if name in ("input", "instructions", "previous_response_id", "conversation", "prompt", "background"):
            continue
        if name in PASSED:
            chat[name] = value
        elif name == "tools":
            chat["tools"] = _tools(value)
        elif name == "tool_choice":
            chat["tool_choice"] = _tool_choice(value)
        elif name == "max_output_tokens":
            chat["max_tokens"] = value
        elif name == "reasoning":
            if value is not None and not isinstance(value, dict):
                raise APIError("reasoning must be an object", param="reasoning")
            if (value or {}).get("effort") is not None:
                chat["reasoning_effort"] = value["effort"]
        elif name == "text":
            fmt = (value or {}).get("format") if isinstance(value, dict) else None
            try:  # json_object, or json_schema with name / schema / strict at the top level
                if from_response_format(fmt, "text.format") is not None:
                    chat["response_format"] = fmt
            except GrammarError as e:
                raise APIError(str(e), param="text.format", code="invalid_response_format") from None
        elif name == "include":
            if value:
                ignored.append(name)
        elif name in BENIGN:
            continue
        else:
            chat[name] = value  # drafter fields, extensions; unknown ones are reported by the chat parser
    return chat, ignored


def _text_format(body: Dict[str, Any]) -> Dict[str, Any]:
    text = body.get("text") if isinstance(body.get("text"), dict) else {}
    fmt = text.get("format")
    return dict(fmt) if isinstance(fmt, dict) else {"type": "text"}


class ResponseBuilder:
    """A Response object, and the stream events that build it block by block."""

    def __init__(self, body: Dict[str, Any], model: str, parallel_tool_calls: bool):
        self.id = _id("resp")
        self.created = int(time.time())
        self.body = body
        self.model = model
        self.parallel = parallel_tool_calls
        self.output: List[Dict[str, Any]] = []
        self.seq = 0
        self.open: Optional[Dict[str, Any]] = None  # the message or reasoning item being written

    def response(self, status: str, usage: Optional[Dict[str, Any]] = None, **extra) -> Dict[str, Any]:
        b = self.body
        reasoning = b.get("reasoning") if isinstance(b.get("reasoning"), dict) else None
        out = {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": self.model, "output": [dict(item) for item in self.output] if status != "in_progress" else [],
            "error": None, "incomplete_details": None, "instructions": b.get("instructions"),
            "max_output_tokens": b.get("max_output_tokens"), "metadata": b.get("metadata") or {},
            "parallel_tool_calls": self.parallel, "previous_response_id": None, "reasoning": reasoning,
            "store": False, "temperature": b.get("temperature"), "text": {"format": _text_format(b)},
            "tool_choice": b.get("tool_choice") or "auto", "tools": b.get("tools") or [],
            "top_p": b.get("top_p"), "truncation": "disabled", "usage": usage,
        }
        out.update(extra)
        return out

    def event(self, kind: str, **fields) -> Dict[str, Any]:
        ev = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return ev

    # ---- items ------------------------------------------------------------------------
    def _close(self) -> List[Dict[str, Any]]:
        item, self.open = self.open, None
        if item is None:
            return []
        i = self.output.index(item)
        item["status"] = "completed"
        part = item["content"][0]
        if item["type"] == "message":
            done = [self.event("response.output_text.done", item_id=item["id"], output_index=i, content_index=0,
                               text=part["text"], logprobs=[]),
                    self.event("response.content_part.done", item_id=item["id"], output_index=i, content_index=0,
                               part=dict(part))]
        else:
            done = [self.event("response.reasoning_text.done", item_id=item["id"], output_index=i, content_index=0,
                               text=part["text"])]
        return done + [self.event("response.output_item.done", output_index=i, item=_copy(item))]

    def _text(self, kind: str, delta: str) -> List[Dict[str, Any]]:
        if not delta:
            return []
        events = []
        if self.open is None or self.open["type"] != kind:
            events += self._close()
            if kind == "message":
                item = {"id": _id("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                        "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]}
            else:
                item = {"id": _id("rs"), "type": "reasoning", "status": "in_progress", "summary": [],
                        "content": [{"type": "reasoning_text", "text": ""}]}
            self.output.append(item)
            self.open = item
            i = len(self.output) - 1
            events.append(self.event("response.output_item.added", output_index=i, item=_copy(item, empty=True)))
            if kind == "message":
                events.append(self.event("response.content_part.added", item_id=item["id"], output_index=i,
                                         content_index=0, part=dict(item["content"][0], text="")))
        item = self.open
        i = self.output.index(item)
        item["content"][0]["text"] += delta
        if kind == "message":
            events.append(self.event("response.output_text.delta", item_id=item["id"], output_index=i,
                                     content_index=0, delta=delta, logprobs=[]))
        else:
            events.append(self.event("response.reasoning_text.delta", item_id=item["id"], output_index=i,
                                     content_index=0, delta=delta))
        return events

    def _call(self, call: Dict[str, str]) -> List[Dict[str, Any]]:
        events = self._close()  # items are written one after the other
        item = {"id": _id("fc"), "type": "function_call", "status": "completed", "call_id": call["id"],
                "name": call["name"], "arguments": call["arguments"]}
        self.output.append(item)
        i = len(self.output) - 1
        return events + [
            self.event("response.output_item.added", output_index=i,
                       item=dict(item, status="in_progress", arguments="")),
            self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=i,
                       delta=call["arguments"]),
            self.event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                       name=call["name"], arguments=call["arguments"]),
            self.event("response.output_item.done", output_index=i, item=dict(item)),
        ]

    def add(self, deltas: Dict[str, Any]) -> List[Dict[str, Any]]:
        """Events for one block's new thought, text and calls (in that order)."""
        return (self._text("reasoning", deltas.get("thought", "")) + self._text("message", deltas.get("answer", ""))
                + [ev for c in deltas.get("calls", []) for ev in self._call(c)])

    def finish(self, finish_reason: Optional[str], usage: Dict[str, Any], **extra) -> Tuple[List[Dict[str, Any]], Dict]:
        """The closing events and the final Response."""
        events = self._close()
        if finish_reason == "length":
            final = self.response("incomplete", usage, incomplete_details={"reason": "max_output_tokens"}, **extra)
            return events + [self.event("response.incomplete", response=final)], final
        final = self.response("completed", usage, **extra)
        return events + [self.event("response.completed", response=final)], final


def _copy(item: Dict[str, Any], empty: bool = False) -> Dict[str, Any]:
    return dict(item, content=[dict(p, text="" if empty else p["text"]) for p in item["content"]])


def usage(prompt_tokens: int, completion_tokens: int, cached: int, written: int) -> Dict[str, Any]:
    return {"input_tokens": prompt_tokens,
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written},
            "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens}

