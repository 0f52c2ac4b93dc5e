"""OpenAI request parsing and validation.

Validation is written out by hand (not pydantic models) so that every rejection names
the field and says why in one line, in OpenAI's error shape::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

Field policy (the README's table, "Fields"):

- mapped to the drafter: ``max_tokens`` / ``max_completion_tokens``, ``seed``,
  ``steps`` (= ``max_denoising_steps``), ``entropy_bound``, ``t_min``, ``t_max``,
  ``confidence_threshold``, ``stability_threshold``, ``sc_top_k``; ``stop``;
  ``sampler`` / ``threshold`` (the confidence-threshold rule);
  thinking via ``enable_thinking``, ``chat_template_kwargs.enable_thinking`` or
  ``reasoning_effort``; ``return_token_ids`` (vLLM's extension) adds the generated and
  prompt token ids to the reply; ``tools``, ``tool_choice``, ``parallel_tool_calls``;
- canvas constraints (an extension): ``canvas_constraints`` ``{"offset": token_id}``
  (offset 0 = the first generated token) and/or ``canvas_template`` (text whose
  ``canvas_hole`` markers, default ``_``, are one free token each) pin output tokens
  through every denoising step;
- sampling fields: ``temperature`` in [0, 2] scales the model's schedule (1: the
  schedule itself; 0: deterministic, see ``server.ServerState.params``); ``top_k``,
  ``top_p``, ``min_p``, ``presence_penalty``, ``frequency_penalty``,
  ``repetition_penalty`` and ``logit_bias`` are applied as the reference applies a
  logits processor (``logits_processors``); ``typical_p``, ``logprobs`` and
  ``top_logprobs`` cannot be applied to block diffusion and are ignored, logged and
  listed in the reply's ``x_ignored_fields``. Out-of-range values are 400s.
  ``strict_sampling`` (``--strict-sampling``) brings back the first server's policy:
  every sampling field other than its neutral value (what omitting it means) is a 400;
- fields that ask for a reply shape we cannot give (``n > 1``, ``best_of``, ``echo``,
  ``suffix``, legacy ``functions``, JSON response formats, audio...) are 400s unless
  neutral;
- our extension ``decode`` ("diffusion", "verified" or "ar"; see ``mlx_dgemma.verify``)
  with ``verify`` ("greedy" or "sample", the encoder sampling at temperature 1) and
  ``draft_steps``; with a decode other than "diffusion" the sampling fields are not
  applied (the encoder's rule commits: they are listed in ``x_ignored_fields``) and a
  forced ``tool_choice`` (a canvas pin) is a 400;
- benign fields (``user``, ``metadata``, ``store``, ``stream_options``,
  ``service_tier``...) are accepted; unknown fields are ignored, logged and listed in
  ``x_ignored_fields`` (clients add vendor fields freely).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..drafter import DenoiseSettings, SettingsError
from ..grammar import GrammarError, from_response_format
from ..logits_processors import LogitsProcessors
from .errors import APIError
from .tools import check_tool_choice, check_tools, history_tool_calls
from ..verify import DECODE_MODES, VERIFY_RULES


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
_NOT_WITH_STRICT = f"{_SCHEDULE}; the server runs with --strict-sampling"

# Sampling fields, with their neutral value (what omitting them means). They are applied
# (or, for IGNORED ones, reported); --strict-sampling makes any other value a 400.
SAMPLING: Dict[str, Tuple[Any, ...]] = {
    "temperature": (1, 1.0),
    "top_p": (1, 1.0),
    "top_k": (0, -1),
    "min_p": (0, 0.0),
    "typical_p": (1, 1.0),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "repetition_penalty": (1, 1.0),
    "logit_bias": ({},),
    "logprobs": (False, 0),
    "top_logprobs": (0,),
}
# Sampling fields block diffusion cannot apply: accepted, logged, listed in x_ignored_fields.
IGNORED = {
    "typical_p": "typical sampling is not applied",
    "logprobs": "logprobs are not returned (a block's tokens come from the last argmax canvas, not from one "
                "sampled distribution)",
    "top_logprobs": "logprobs are not returned",
}

# Fields asking for a reply we cannot give: 400 unless at the value that means "not used".
UNSUPPORTED: Dict[str, Tuple[Tuple[Any, ...], str]] = {
    "n": ((1,), "only one choice per request is supported (send n=1, or several requests: they are batched together)"),
    "best_of": ((1,), "best_of is not supported"),
    "echo": ((False,), "echo is not supported"),
    "suffix": (("",), "suffix (insertion) is not supported"),
    "functions": (([],), "the legacy functions field is not supported: send tools"),
    "function_call": (("none",), "the legacy function_call field is not supported: send tool_choice"),
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
    "user", "metadata", "store", "service_tier", "stream_options",
    "safety_identifier", "prompt_cache_key", "verbosity", "logprobs_mode", "ignore_eos_warning",
}

CONSTRAINT_FIELDS = ("canvas_constraints", "canvas_template", "canvas_hole")
COMMON = {"model", "stream", "max_tokens", "max_completion_tokens", "seed", "stop",
          "enable_thinking", "chat_template_kwargs", "reasoning_effort", "return_token_ids",
          *SAMPLER_FIELDS, *SAMPLING, *CONSTRAINT_FIELDS,
          "decode", "verify", "draft_steps", "response_format"}
CHAT_FIELDS = COMMON | {"messages", "tools", "tool_choice", "parallel_tool_calls"}
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
    ignored: List[str] = field(default_factory=list)  # fields not applied (x_ignored_fields)
    temperature: Optional[float] = None  # None or 1: the model's own schedule
    processors: LogitsProcessors = field(default_factory=LogitsProcessors)
    tools: List[Dict[str, Any]] = field(default_factory=list)
    tool_choice: str = "none"  # none | auto | required | function
    tool_name: Optional[str] = None  # tool_choice == "function"
    parallel_tool_calls: bool = True
    sampling_fields: List[str] = field(default_factory=list)  # the sampling fields set (not neutral)
    # canvas constraints (extension): {offset: token id}, a template with holes, its marker
    constraints: Optional[Dict[int, int]] = None
    canvas_template: Optional[str] = None
    canvas_hole: str = "_"
    decode: str = "diffusion"  # our extension: "diffusion", "verified" or "ar"
    verify: str = "greedy"
    draft_steps: Optional[int] = None
    images: List[str] = field(default_factory=list)  # image URLs of the messages, in prompt order
    processed_images: List[Any] = field(default_factory=list)  # image_processor.ProcessedImage, by the server
    response_format: Any = None  # structured output: a checked mlx_dgemma.grammar.GrammarSpec, or None


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


def parse_request(body: Any, chat: bool, strict_sampling: bool = False, log=None) -> Parsed:
    if not isinstance(body, dict):
        raise APIError(f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError("you must provide a model parameter (a string; GET /v1/models lists it)", param="model")
    known = CHAT_FIELDS if chat else COMPLETION_FIELDS
    ignored, applied = [], []
    for name, value in body.items():
        if name in SAMPLING:
            if _is_neutral(value, SAMPLING[name]):
                continue
            if strict_sampling:
                why = IGNORED.get(name, "it would change the model's own sampling")
                raise APIError(f"{name}={value!r} is not supported: {why}; {_NOT_WITH_STRICT}",
                               param=name, code="unsupported_parameter")
            (ignored if name in IGNORED else applied).append(name)
            continue
        if name in known or name in BENIGN:
            continue
        if name in UNSUPPORTED:
            neutral, why = UNSUPPORTED[name]
            if _is_neutral(value, neutral):
                continue
            raise APIError(f"{name}={value!r} is not supported: {why}", param=name, code="unsupported_parameter")
        if name == ("prompt" if chat else "messages"):
            raise APIError(f"{name} belongs to {'/v1/completions' if chat else '/v1/chat/completions'}", param=name)
        ignored.append(name)
    ignored.sort()
    if ignored and log is not None:
        log.warning("not applied: %s", ", ".join(ignored))

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
    parsed.temperature, parsed.processors = _sampling(body)
    parsed.sampling_fields = sorted(applied)
    parsed.constraints, parsed.canvas_template, parsed.canvas_hole = _constraints(body)
    if decode != "diffusion" and (parsed.constraints or parsed.canvas_template is not None):
        raise APIError(f"canvas constraints apply to decode 'diffusion' only, not {decode!r}", param="decode")
    try:
        parsed.response_format = from_response_format(body.get("response_format"))
    except GrammarError as e:
        raise APIError(str(e), param="response_format", code="invalid_response_format") from None
    if parsed.response_format is not None and (parsed.constraints or parsed.canvas_template is not None):
        raise APIError("response_format and canvas constraints cannot be combined (the grammar decides every token)",
                       param="response_format")
    if chat:
        parsed.messages = _messages(body.get("messages"))
        parsed.images = image_urls(parsed.messages)
        if parsed.images and parsed.decode != "diffusion":
            raise APIError(f"images apply to decode 'diffusion' only, not {parsed.decode!r}", param="decode")
        parsed.tools = check_tools(body.get("tools"))
        parsed.tool_choice, parsed.tool_name = check_tool_choice(body.get("tool_choice"), parsed.tools)
        ptc = body.get("parallel_tool_calls")
        if ptc is not None and not isinstance(ptc, bool):
            raise APIError(f"parallel_tool_calls must be a boolean, got {ptc!r}", param="parallel_tool_calls")
        parsed.parallel_tool_calls = ptc is not False
    else:
        parsed.prompt = _prompt(body.get("prompt"))
    forced_call = parsed.tools and parsed.tool_choice in ("required", "function")
    if parsed.thinking and (parsed.response_format is not None or forced_call):
        # a grammar holds the whole reply from its first token: no thought channel before it
        parsed.thinking = False
        asked = [k for k in ("enable_thinking", "reasoning_effort", "chat_template_kwargs") if body.get(k) is not None]
        parsed.ignored = sorted(set(parsed.ignored) | set(asked[:1]))
    return parsed


def _sampling(body: dict) -> Tuple[Optional[float], LogitsProcessors]:
    """temperature (checked to lie in [0, 2]) and the logits processing of the request."""
    t = body.get("temperature")
    if t is not None:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 2:
            raise APIError(f"temperature must be a number in [0, 2], got {t!r}", param="temperature")
        t = float(t)
    values: Dict[str, Any] = {}
    for name in ("top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        if body.get(name) is not None:
            values[name] = body[name]
    top_k = body.get("top_k")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1:
            raise APIError(f"top_k must be an integer >= -1 (-1 or 0: off), got {top_k!r}", param="top_k")
        values["top_k"] = max(top_k, 0)
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise APIError("logit_bias must be an object mapping token ids to numbers", param="logit_bias")
        try:
            values["logit_bias"] = {int(k): v for k, v in bias.items()}
        except (TypeError, ValueError):
            raise APIError(f"logit_bias keys must be token ids, got {list(bias)[:3]!r}", param="logit_bias") from None
    try:
        return t, LogitsProcessors(**values)
    except SettingsError as e:
        msg = str(e)
        raise APIError(msg, param=msg.split(" ", 1)[0].split("[", 1)[0]) from None


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


def image_url_of(part: Dict[str, Any], where: str) -> str:
    """The URL of an ``image_url`` part ({"url": ...} or a string) or of the Responses
    API's ``input_image`` part (``image_url``: a string)."""
    url = part.get("image_url")
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str) or not url:
        raise APIError(f"{where}.image_url must be a URL string (a data: URL) or an object with one",
                       param=where)
    return url


def _text_content(content: Any, i: int):
    """A message's content: its text, or, when it holds images, a list of text parts and
    ``{"type": "image", "url": ...}`` parts in their order (the chat template places them)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts, images = [], False
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if not isinstance(part, dict) or "type" not in part:
                raise APIError(f"{where} must be an object with a type", param=f"messages[{i}].content")
            if part["type"] in ("text", "input_text"):
                if not isinstance(part.get("text"), str):
                    raise APIError(f"{where}.text must be a string", param=f"messages[{i}].content")
                parts.append({"type": "text", "text": part["text"]})
            elif part["type"] in ("image_url", "input_image"):
                parts.append({"type": "image", "url": image_url_of(part, where)})
                images = True
            else:
                raise APIError(f"{where}: {part['type']!r} input is not supported (text and images only)",
                               param=f"messages[{i}].content")
        return parts if images else "".join(p["text"] for p in parts)
    raise APIError(f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}].content")


def image_urls(messages: List[Dict[str, Any]]) -> List[str]:
    """The image URLs of parsed messages, in prompt order."""
    return [part["url"] for m in messages if isinstance(m.get("content"), list)
            for part in m["content"] if part.get("type") == "image"]


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
        if m.get("function_call"):
            raise APIError(f"messages[{i}]: the legacy function_call is not supported: send tool_calls",
                           param=f"messages[{i}]")
        msg = {"role": "system" if role == "developer" else role, "content": _text_content(m.get("content"), i)}
        if role == "assistant":
            if m.get("tool_calls"):
                msg["tool_calls"] = history_tool_calls(m["tool_calls"], f"messages[{i}]")
            thought = m.get("reasoning_content")
            if isinstance(thought, str) and thought:
                msg["reasoning_content"] = thought
        elif role == "tool":
            for key in ("tool_call_id", "name"):
                if isinstance(m.get(key), str):
                    msg[key] = m[key]
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

