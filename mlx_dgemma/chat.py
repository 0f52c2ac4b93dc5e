"""Chat template and Gemma 4 thinking mode.

Gemma 4 conventions (its chat template): thinking is switched on by ``<|think|>`` in the
system turn (template kwarg ``enable_thinking``); the model then writes
``<|channel>thought\\n...reasoning...<channel|>`` before the answer. With thinking off the
26B/31B templates prefill an EMPTY channel ``<|channel>thought\\n<channel|>`` (and the
model may still emit one). Tools that auto-enable thinking, or that take the text after
the channel as the whole reply, end up with empty replies. Here thinking is always passed
explicitly, and :class:`ThoughtParser` splits the generated TOKENS (not text, so it does
not depend on how special tokens decode) into thought and answer:

- thinking on: channel contents are the thought, the rest is the answer;
- thinking off: channel markers and the channel name are dropped and anything inside a
  channel counts as answer, so the reply is never empty when the model wrote something.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Union

CHANNEL_OPEN = "<|channel>"
CHANNEL_CLOSE = "<channel|>"
_NAMES = ("thought", "thinking", "analysis")
_CHANNEL_NAME = re.compile(r"^(%s)[ \t]*\n?" % "|".join(_NAMES))

Prompt = Union[str, Sequence[Dict[str, str]], Sequence[int]]


def _vocab(tokenizer) -> Dict[str, int]:
    try:
        return tokenizer.get_vocab()
    except Exception:  # tokenizers without get_vocab
        return {}


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "has_chat_template", False) or getattr(tokenizer, "chat_template", None))


def encode_prompt(
    tokenizer,
    prompt: Prompt,
    chat_template: bool = True,
    thinking: bool = False,
    system: Optional[str] = None,
) -> List[int]:
    """Token ids for a prompt: a string (a user turn), a list of chat messages, or ids.

    With ``chat_template`` (and a tokenizer that has one) the template is applied with
    ``add_generation_prompt`` and ``enable_thinking`` passed explicitly.
    """
    if not isinstance(prompt, str) and len(prompt) > 0 and not isinstance(prompt[0], dict):
        return [int(t) for t in prompt]
    if isinstance(prompt, str) and not (chat_template and has_chat_template(tokenizer)):
        return list(tokenizer.encode(prompt))
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system:
        messages = [{"role": "system", "content": system}] + messages
    if not has_chat_template(tokenizer):
        text = "\n".join(m["content"] for m in messages)
        return list(tokenizer.encode(text))
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, enable_thinking=bool(thinking), tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


class ThoughtParser:
    """Routes generated tokens to the thought or the answer (Gemma 4 channels).

    ``prompt_tokens`` tells whether generation starts inside an open channel (a template
    that prefills ``<|channel>thought\\n``). Feed token lists with :meth:`feed`; read the
    decoded ``thought`` and ``answer`` at any time (deltas via :meth:`deltas`).
    """

    def __init__(self, tokenizer, thinking: bool = False, prompt_tokens: Sequence[int] = (),
                 stop_tokens: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.thinking = thinking
        vocab = _vocab(tokenizer)
        self.open_id = vocab.get(CHANNEL_OPEN)
        self.close_id = vocab.get(CHANNEL_CLOSE)
        self.stop = set(int(t) for t in stop_tokens)
        self.in_channel = False
        if self.open_id is not None:
            last_open = max((i for i, t in enumerate(prompt_tokens) if t == self.open_id), default=-1)
            last_close = max((i for i, t in enumerate(prompt_tokens) if t == self.close_id), default=-1)
            self.in_channel = last_open > last_close
        # Ordered segments [kind, tokens], kind "thought" (inside a channel) or "answer".
        self._segments: List[list] = [["thought" if self.in_channel else "answer", []]]
        self.done = False
        self._sent = {"thought": "", "answer": ""}

    def feed(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            t = int(t)
            if self.done:
                return
            if t in self.stop:
                self.done = True
                return
            self._feed_token(t)

    def _feed_token(self, t: int) -> None:
        if t == self.open_id:
            self.in_channel = True
            self._segments.append(["thought", []])
        elif t == self.close_id and self.in_channel:
            self.in_channel = False
            self._segments.append(["answer", []])
        elif t != self.close_id:
            self._segments[-1][1].append(t)

    def _decode(self, ids: List[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _segment_texts(self):
        """(kind, decoded text) of each segment (subclasses add kinds of their own)."""
        for kind, ids, *_ in self._segments:
            yield kind, self._decode(ids)

    def _texts(self, final: bool = True):
        for kind, text in self._segment_texts():
            if kind == "thought":
                if not final and text and any(n.startswith(text) and n != text for n in _NAMES):
                    text = ""  # maybe the start of the channel's name: wait for more tokens
                text = _CHANNEL_NAME.sub("", text, count=1)
            yield kind, text

    def _thought(self, final: bool = True) -> str:
        if not self.thinking:
            return ""
        return "\n".join(t for k, t in self._texts(final) if k == "thought" and t.strip())

    def _answer(self, final: bool = True) -> str:
        if self.thinking:
            return "".join(t for k, t in self._texts(final) if k == "answer")
        return "".join(t for k, t in self._texts(final) if k == "answer" or t.strip())

    @property
    def thought(self) -> str:
        """The thought text (thinking on); empty thought channels are dropped."""
        return self._thought()

    @property
    def answer(self) -> str:
        """The reply. Thinking off: everything the model wrote, minus channel syntax."""
        return self._answer()

    def deltas(self, final: bool = False) -> Dict[str, str]:
        """New thought/answer text since the last call. A trailing incomplete UTF-8
        character (decoded as U+FFFD) is held back until more tokens arrive."""
        out = {}
        for name, text in (("thought", self._thought(final)), ("answer", self._answer(final))):
            if not final:
                text = text.rstrip("\ufffd")
            prev = self._sent[name]
            if text.startswith(prev):
                out[name] = text[len(prev):]
            else:  # a decode changed earlier text (rare with byte-level BPE): resend the rest
                k = 0
                while k < min(len(text), len(prev)) and text[k] == prev[k]:
                    k += 1
                out[name] = text[k:]
            self._sent[name] = text if text.startswith(prev) else prev + out[name]
        return out
