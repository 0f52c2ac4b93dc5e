"""Chat Completions and Completions replies: the JSON objects and stream chunks the server
sends for ``POST /v1/chat/completions`` and ``POST /v1/completions`` (responses.py
shapes ``/v1/responses`` the same way). The text itself comes from the generation's
parser: ``ReplyParser`` (chat: thought, answer, tool calls) or :class:`PlainText`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from .protocol import Parsed
from .tools import chat_tool_calls


class PlainText:
    """Raw completions: the decoded tokens, special tokens dropped (no thought channel)."""

    thought = ""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens = tokenizer, []

    def feed(self, tokens: Sequence[int]) -> None:
        self.tokens.extend(int(t) for t in tokens)

    @property
    def answer(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True) if self.tokens else ""


def reply(p: Parsed, chat: bool, common: Dict[str, Any], collected: Dict[str, Any], finish_reason: Optional[str],
          tokens: List[int], prompt: List[int], usage: Dict[str, Any], stats: Dict[str, Any]) -> Dict[str, Any]:
    """The whole (non-streamed) reply; ``collected``: {"thought", "answer", "calls"}."""
    if chat:
        msg: Dict[str, Any] = {"role": "assistant",
                               "content": collected["answer"] or (None if collected["calls"] else "")}
        if collected["thought"]:
            msg["reasoning_content"] = collected["thought"]
        if collected["calls"]:
            msg["tool_calls"] = chat_tool_calls(collected["calls"])
        choice = {"index": 0, "message": msg, "finish_reason": finish_reason, "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": collected["answer"], "finish_reason": finish_reason, "logprobs": None}
        obj = "text_completion"
    if p.return_token_ids:
        choice["token_ids"] = tokens
        common = {**common, "prompt_token_ids": prompt}
    out = {**common, "object": obj, "choices": [choice], "usage": usage, "x_stats": stats}
    if p.ignored:
        out["x_ignored_fields"] = p.ignored
    return out


class Chunks:
    """The stream's chunks, numbering tool calls across them."""

    def __init__(self, p: Parsed, chat: bool, common: Dict[str, Any]):
        self.p, self.chat, self.common = p, chat, common
        self.obj = "chat.completion.chunk" if chat else "text_completion"
        self.n_calls = 0

    def chunk(self, delta: Dict[str, Any], finish: Optional[str], first: bool = False,
              tokens: Optional[List[int]] = None) -> Dict[str, Any]:
        p = self.p
        if self.chat:
            d: Dict[str, Any] = {"role": "assistant"} if first else {}
            if delta.get("thought"):
                d["reasoning_content"] = delta["thought"]
            if delta.get("answer") or first or not (finish or delta.get("calls")):
                d["content"] = delta.get("answer", "")
            if delta.get("calls"):
                d["tool_calls"] = chat_tool_calls(delta["calls"], start=self.n_calls, streaming=True)
                self.n_calls += len(delta["calls"])
            c = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
        else:
            c = {"index": 0, "text": delta.get("answer", ""), "finish_reason": finish, "logprobs": None}
        if p.return_token_ids and tokens is not None:
            c["token_ids"] = tokens
        out = {**self.common, "object": self.obj, "choices": [c]}
        if p.include_usage:
            out["usage"] = None
        if finish and p.ignored:
            out["x_ignored_fields"] = p.ignored
        return out

    def usage(self, usage: Dict[str, Any], stats: Dict[str, Any]) -> Dict[str, Any]:
        """The last chunk when the client asked for usage."""
        return {**self.common, "object": self.obj, "choices": [], "usage": usage, "x_stats": stats}
