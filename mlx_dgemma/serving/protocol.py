"""OpenAI request parsing and validation, and OpenAI-shaped errors.

Validation is written out by hand (not pydantic models) so that every rejection names
the field and says why in one line, in OpenAI's error shape::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

Field policy (documented in the README (Serving)):

- mapped to the drafter: ``max_tokens`` / ``max_completion_tokens``, ``seed``,
  ``steps`` (= ``max_denoising_steps``), ``entropy_bound``, ``t_min``, ``t_max``,
  ``confidence_threshold``, ``stability_threshold``, ``sc_top_k``; ``stop``;
  ``sampler`` / ``threshold`` (the confidence-threshold rule);
  thinking via ``enable_thinking``, ``chat_template_kwargs.enable_thinking`` or
  ``reasoning_effort``; ``return_token_ids`` (vLLM's extension) adds the generated and
  prompt token ids to the reply;
- canvas constraints (an extension): ``canvas_constraints`` ``{"offset": token_id}``
  (offset 0 = the first generated token) and/or ``canvas_template`` (text whose
  ``canvas_hole`` markers, default ``_``, are one free token each) pin output tokens
  through every denoising step;
- our extension ``decode`` ("diffusion", "verified" or "ar"; see ``mlx_dgemma.verify``)
  with ``verify`` ("greedy" or "sample", the encoder sampling at temperature 1) and
  ``draft_steps``;
- OpenAI sampling fields that would change the output (``temperature``, ``top_p``,
  penalties, ``logit_bias``, ``logprobs``, ``n > 1``, tools, JSON modes...) are accepted
  only at their neutral value (what omitting them means) and otherwise get a 400 saying
  why; ``--ignore-sampling-params`` turns that 400 into a logged warning;
- benign fields (``user``, ``metadata``, ``store``, ``stream_options``,
  ``parallel_tool_calls``, ``service_tier``...) are accepted; unknown fields are ignored
  with a log line (clients add vendor fields freely).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..drafter import DenoiseSettings, SettingsError
from ..verify import DECODE_MODES, VERIFY_RULES


class APIError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None,
                 code: Optional[str] = None, type: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# Sampler settings a request may set (request name -> DenoiseSettings field).
SAMPLER_FIELDS = {
    "steps": "max_denoising_steps",
    "max_denoising_steps": "max_denoising_steps",
    "entropy_bound": "entropy_bound",
    "t_min": "t_min",
    "t_max": "t_max",
    "confidence_threshold": "confidence_threshold",
    "stability_threshold": "stability_threshold",
    "sc_top_k": "sc_top_k",
    "sampler": "sampler",
    "threshold": "threshold",
}

_SCHEDULE = (
    "DiffusionGemma samples with its own temperature schedule (t_max down to t_min over the "
    "denoising steps) and entropy-bound acceptance"
)

# Fields that would change the output, with the value that means "not used".
NEUTRAL: Dict[str, Tuple[Tuple[Any, ...], str]] = {
    "temperature": ((1, 1.0), f"{_SCHEDULE}; set t_min/t_max instead (or omit temperature, or send 1)"),
    "top_p": ((1, 1.0), f"{_SCHEDULE}; nucleus sampling is not applied (omit top_p, or send 1)"),
    "top_k": ((0, -1), f"{_SCHEDULE}; top-k sampling is not applied"),
    "min_p": ((0, 0.0), f"{_SCHEDULE}; min-p sampling is not applied"),
    "typical_p": ((1, 1.0), f"{_SCHEDULE}; typical sampling is not applied"),
    "presence_penalty": ((0, 0.0), "penalties are not supported by block diffusion (every block is denoised at once)"),
    "frequency_penalty": ((0, 0.0), "penalties are not supported by block diffusion (every block is denoised at once)"),
    "repetition_penalty": ((1, 1.0), "penalties are not supported by block diffusion (every block is denoised at once)"),
    "logit_bias": (({},), "logit_bias is not supported"),
    "logprobs": ((False, 0), "logprobs are not supported (a block's tokens come from the last argmax canvas, not from one sampled distribution)"),
    "top_logprobs": ((0,), "logprobs are not supported"),
    "n": ((1,), "only one choice per request is supported (send n=1, or several requests: they are batched together)"),
    "best_of": ((1,), "best_of is not supported"),
    "echo": ((False,), "echo is not supported"),
    "suffix": (("",), "suffix (insertion) is not supported"),
    "tools": (([],), "tool calling is not supported by this server"),
    "functions": (([],), "function calling is not supported by this server"),
    "function_call": (("none",), "function calling is not supported by this server"),
    "tool_choice": (("none", "auto"), "tool calling is not supported by this server"),
    "response_format": (({"type": "text"},), "only response_format {\"type\": \"text\"} is supported (no JSON mode or schemas)"),
    "modalities": ((["text"],), "only text output is supported"),
    "audio": ((), "audio output is not supported"),
    "prediction": ((), "predicted outputs are not supported"),
    "web_search_options": ((), "web search is not supported"),
    "guided_json": ((), "guided decoding is not supported"),
    "guided_regex": ((), "guided decoding is not supported"),
    "guided_choice": ((), "guided decoding is not supported"),
    "use_beam_search": ((False,), "beam search is not supported"),
}

# Accepted and ignored: they do not change what is generated.
BENIGN = {
    "user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options",
    "safety_identifier", "prompt_cache_key", "verbosity", "logprobs_mode", "ignore_eos_warning",
}

CONSTRAINT_FIELDS = ("canvas_constraints", "canvas_template", "canvas_hole")
COMMON = {"model", "stream", "max_tokens", "max_completion_tokens", "seed", "stop",
          "enable_thinking", "chat_template_kwargs", "reasoning_effort", "return_token_ids", *SAMPLER_FIELDS,
          *CONSTRAINT_FIELDS, "decode", "verify", "draft_steps"}
CHAT_FIELDS = COMMON | {"messages"}
COMPLETION_FIELDS = COMMON | {"prompt"}


@dataclass
class Parsed:
    """A validated request, before tokenization."""

    model: str
    stream: bool
    include_usage: bool
    max_tokens: Optional[int]
    seed: Optional[int]
    stop: List[str]
    settings_overrides: Dict[str, Any]
    thinking: bool
    template_kwargs: Dict[str, Any]
    messages: Optional[List[Dict[str, Any]]] = None
    prompt: Any = None  # completions: str or list of token ids
    return_token_ids: bool = False  # vLLM's extension: token ids in the reply
    ignored: List[str] = field(default_factory=list)
    # canvas constraints (extension): {offset: token id}, a template with holes, its marker
    constraints: Optional[Dict[int, int]] = None
    canvas_template: Optional[str] = None
    canvas_hole: str = "_"
    decode: str = "diffusion"  # our extension: "diffusion", "verified" or "ar"
    verify: str = "greedy"
    draft_steps: Optional[int] = None


def _is_neutral(value: Any, neutral: Tuple[Any, ...]) -> bool:
    if value is None:
        return True
    for n in neutral:
        if isinstance(n, bool) or isinstance(value, bool):
            if value is n:
                return True
        elif value == n:
            return True
    return False


def _int(body: dict, name: str, lo: Optional[int] = None) -> Optional[int]:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
        raise APIError(f"{name} must be an integer, got {v!r}", param=name)
    v = int(v)
    if lo is not None and v < lo:
        raise APIError(f"{name} must be >= {lo}, got {v}", param=name)
    return v


def parse_request(body: Any, chat: bool, ignore_sampling: bool = False, log=None) -> Parsed:
    if not isinstance(body, dict):
        raise APIError(f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError("you must provide a model parameter (a string; GET /v1/models lists it)", param="model")
    known = CHAT_FIELDS if chat else COMPLETION_FIELDS
    ignored = []
    for name, value in body.items():
        if name in known or name in BENIGN:
            continue
        if name in NEUTRAL:
            neutral, why = NEUTRAL[name]
            if _is_neutral(value, neutral):
                continue
            if ignore_sampling:
                ignored.append(name)
                continue
            raise APIError(f"{name}={value!r} is not supported: {why}", param=name, code="unsupported_parameter")
        if name == ("prompt" if chat else "messages"):
            raise APIError(f"{name} belongs to {'/v1/completions' if chat else '/v1/chat/completions'}", param=name)
        ignored.append(name)
    if ignored and log is not None:
        log.warning("ignoring request fields: %s", ", ".join(sorted(ignored)))

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise APIError(f"stream must be a boolean, got {stream!r}", param="stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise APIError("stream_options must be an object", param="stream_options")
    include_usage = bool(opts.get("include_usage", False))

    mt, mct = _int(body, "max_tokens", 1), _int(body, "max_completion_tokens", 1)
    if mt is not None and mct is not None and mt != mct:
        raise APIError(f"max_tokens ({mt}) and max_completion_tokens ({mct}) disagree; send one", param="max_tokens")
    max_tokens = mct if mct is not None else mt

    seed = _int(body, "seed")
    if seed is not None:
        seed &= (1 << 64) - 1  # any integer is a seed; the RNG hashes 64 bits

    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError("stop must be a string or a list of strings", param="stop")
    if len(stop) > 4:
        raise APIError(f"stop takes at most 4 sequences, got {len(stop)}", param="stop")
    stop = [s for s in stop if s]

    overrides: Dict[str, Any] = {}
    for name, target in SAMPLER_FIELDS.items():
        if body.get(name) is None:
            continue
        if target in overrides and overrides[target] != body[name]:
            raise APIError("steps and max_denoising_steps disagree; send one", param=name)
        overrides[target] = body[name]
    try:
        DenoiseSettings.from_generation_config({}, **overrides)  # range checks, one line each
    except SettingsError as e:
        msg = str(e)
        param = next((k for k, t in SAMPLER_FIELDS.items() if msg.startswith(t) and k in body), None)
        raise APIError(msg, param=param or next(iter(overrides), None)) from None

    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise APIError("chat_template_kwargs must be an object", param="chat_template_kwargs")
    kwargs = dict(kwargs)
    thinking = kwargs.pop("enable_thinking", None)
    if body.get("enable_thinking") is not None:
        thinking = body["enable_thinking"]
    effort = body.get("reasoning_effort")
    if thinking is None and effort is not None:
        if effort not in ("none", "minimal", "low", "medium", "high"):
            raise APIError(f"reasoning_effort must be one of none, minimal, low, medium, high; got {effort!r}",
                           param="reasoning_effort")
        thinking = effort not in ("none", "minimal")
    if thinking is not None and not isinstance(thinking, bool):
        raise APIError(f"enable_thinking must be a boolean, got {thinking!r}", param="enable_thinking")

    rti = body.get("return_token_ids", False)
    if not isinstance(rti, bool) and rti is not None:
        raise APIError(f"return_token_ids must be a boolean, got {rti!r}", param="return_token_ids")
    decode, verify = body.get("decode") or "diffusion", body.get("verify") or "greedy"
    if decode not in DECODE_MODES:
        raise APIError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}", param="decode")
    if verify not in VERIFY_RULES:
        raise APIError(f"verify must be one of {', '.join(VERIFY_RULES)}, got {verify!r}", param="verify")
    parsed = Parsed(model, stream, include_usage, max_tokens, seed, stop, overrides, bool(thinking),
                    kwargs, return_token_ids=bool(rti), ignored=ignored, decode=decode, verify=verify,
                    draft_steps=_int(body, "draft_steps", 1))
    parsed.constraints, parsed.canvas_template, parsed.canvas_hole = _constraints(body)
    if decode != "diffusion" and (parsed.constraints or parsed.canvas_template is not None):
        raise APIError(f"canvas constraints apply to decode 'diffusion' only, not {decode!r}", param="decode")
    if chat:
        parsed.messages = _messages(body.get("messages"))
    else:
        parsed.prompt = _prompt(body.get("prompt"))
    return parsed


def _constraints(body: dict) -> Tuple[Optional[Dict[int, int]], Optional[str], str]:
    """The canvas-constraint extension fields, type-checked (ranges are checked against the
    model and the token budget later)."""
    raw, template, hole = body.get("canvas_constraints"), body.get("canvas_template"), body.get("canvas_hole")
    pins = None
    if raw is not None:
        if not isinstance(raw, dict):
            raise APIError('canvas_constraints must be an object {"offset": token_id}', param="canvas_constraints")
        pins = {}
        for k, v in raw.items():
            if not (isinstance(k, str) and k.isdigit()):
                raise APIError(f"canvas_constraints: key {k!r} is not a token offset (0, 1, 2 ...)",
                               param="canvas_constraints")
            if isinstance(v, bool) or not isinstance(v, int):
                raise APIError(f"canvas_constraints[{k!r}] must be a token id, got {v!r}", param="canvas_constraints")
            pins[int(k)] = v
    if template is not None and (not isinstance(template, str) or not template):
        raise APIError("canvas_template must be a non-empty string", param="canvas_template")
    if hole is None:
        hole = "_"
    if not isinstance(hole, str) or not hole:
        raise APIError("canvas_hole must be a non-empty string", param="canvas_hole")
    return pins, template, hole


def _text_content(content: Any, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or "type" not in part:
                raise APIError(f"messages[{i}].content[{j}] must be an object with a type", param=f"messages[{i}].content")
            if part["type"] in ("text", "input_text"):
                if not isinstance(part.get("text"), str):
                    raise APIError(f"messages[{i}].content[{j}].text must be a string", param=f"messages[{i}].content")
                parts.append(part["text"])
            else:
                raise APIError(f"messages[{i}].content[{j}]: {part['type']!r} input is not supported (text only)",
                               param=f"messages[{i}].content")
        return "".join(parts)
    raise APIError(f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}].content")


def _messages(messages: Any) -> List[Dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise APIError("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(f"messages[{i}] must be an object with role and content", param="messages")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise APIError(f"messages[{i}].role must be system, developer, user, assistant or tool; got {role!r}",
                           param=f"messages[{i}].role")
        if m.get("tool_calls") or m.get("function_call"):
            raise APIError(f"messages[{i}]: tool calls are not supported by this server", param=f"messages[{i}]")
        msg = {"role": "system" if role == "developer" else role, "content": _text_content(m.get("content"), i)}
        out.append(msg)
    return out


def _prompt(prompt: Any):
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise APIError("prompt must not be empty", param="prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise APIError("one prompt per request (send several requests: they are batched together)", param="prompt")
    raise APIError("prompt must be a non-empty string or a list of token ids", param="prompt")

