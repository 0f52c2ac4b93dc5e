"""Structured output through the server: ``response_format`` (json_object, json_schema with
strict) on chat completions, streamed and not, in every decode mode; the Responses API's
``text.format``; ``tool_choice`` required / named as a grammar whose call arguments
validate; bad schemas as one-line 400s; a reply cut by max_tokens. The model is the tiny
random one of ``test_server`` (gibberish without the grammar)."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai", reason="the server tests need the openai client (pip install -e '.[test]')")
pytest.importorskip("fastapi", reason="the server needs FastAPI (pip install -e '.[server]')")
jsonschema = pytest.importorskip("jsonschema", reason="pip install -e '.[test]'")

import mlx_dgemma  # noqa: E402
from mlx_dgemma import grammar as G  # noqa: E402
from mlx_dgemma.server import ServerState  # noqa: E402
from tests.test_server import Running, http, model_dir  # noqa: E402,F401
from tests.test_structured import SCHEMAS  # noqa: E402

MODES = ("diffusion", "verified", "ar")
USER = [{"role": "user", "content": "Fill in the form."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                          "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def server(model_dir):
    model, tok = mlx_dgemma.load(model_dir)
    run = Running(ServerState(model, tok, "tiny", model_path=model_dir, cache_size_gb=1.0, max_batch=4))
    yield run
    run.stop()


def rf(schema):
    return {"type": "json_schema", "json_schema": {"name": "form", "schema": schema, "strict": True}}


def ask(server, stream, mode, **kw):
    """(text, finish_reason, message or None) of one chat completion."""
    kw.setdefault("max_tokens", 96)
    extra = {"decode": mode, "steps": 4, **kw.pop("extra_body", {})}
    c = server.client.chat.completions
    if not stream:
        r = c.create(model="tiny", messages=kw.pop("messages", USER), extra_body=extra, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.choices[0].message
    chunks = list(c.create(model="tiny", messages=kw.pop("messages", USER), extra_body=extra, stream=True, **kw))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    calls = {}
    for ch in chunks:
        for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            calls.setdefault(tc.index, []).append(tc)
    return text, chunks[-1].choices[0].finish_reason, calls


@pytest.mark.parametrize("mode", MODES)
def test_response_format_json_schema_streamed_and_not(server, mode):
    for i in (0, 4, 12, 18):
        schema = SCHEMAS[i]
        for stream in (False, True):
            text, finish, _ = ask(server, stream, mode, response_format=rf(schema), seed=i)
            assert finish == "stop", (i, stream, text)
            jsonschema.validate(json.loads(text), schema)


def test_json_object_and_a_reply_cut_by_max_tokens(server):
    text, finish, _ = ask(server, False, "ar", response_format={"type": "json_object"}, max_tokens=48)
    if finish == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert finish == "length" and text.startswith("{")
    schema = {"type": "object", "properties": {"x": {"type": "array", "items": {"type": "string"}}}, "required": ["x"]}
    m = G.Grammar(G.from_response_format(rf(schema)), server.state.tokenizer, server.state.model.args.vocab_size,
                  server.state.eos_token_ids).matcher()
    for stream in (False, True):
        for mode in MODES:
            text, finish, _ = ask(server, stream, mode, response_format=rf(schema), max_tokens=6)
            assert finish == "length", (mode, text)
            toks = server.state.tokenizer.encode(text, add_special_tokens=False)
            assert m.valid_prefix(toks) == len(toks), (mode, text)


def test_completions_endpoint_and_stats(server):
    schema = SCHEMAS[1]
    r = server.client.completions.create(model="tiny", prompt="Age:", max_tokens=48,  # (vLLM's extension)
                                         extra_body={"steps": 4, "response_format": rf(schema)})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].text), schema)
    stats = r.model_extra["x_stats"]
    assert stats["forced_tokens"] > 0 and stats["masks"] > 0 and stats["completion_tokens"] == r.usage.completion_tokens


def test_responses_api_text_format(server):
    schema = SCHEMAS[3]
    fmt = {"type": "json_schema", "name": "colour", "schema": schema, "strict": True}
    for stream in (False, True):
        kw = dict(model="tiny", input="Pick a colour.", text={"format": fmt}, max_output_tokens=64,
                  extra_body={"steps": 4, "decode": "verified"})
        if stream:
            events = list(server.client.responses.create(stream=True, **kw))
            r = next(e.response for e in events if e.type == "response.completed")
        else:
            r = server.client.responses.create(**kw)
        jsonschema.validate(json.loads(r.output_text), schema)
        assert r.text.format.type == "json_schema"


@pytest.mark.parametrize("mode", MODES)
def test_tool_choice_required_and_named_always_return_a_valid_call(server, mode):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    for seed in range(3):
        for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            for stream in (False, True):
                _, finish, out = ask(server, stream, mode, tools=[WEATHER, CLOCK], tool_choice=choice, seed=seed)
                if stream:
                    calls = [(parts[0].function.name, "".join(p.function.arguments or "" for p in parts))
                             for parts in out.values()]
                else:
                    calls = [(c.function.name, c.function.arguments) for c in out.tool_calls or []]
                assert finish == "tool_calls" and len(calls) == 1, (mode, choice, stream, out)
                name, args = calls[0]
                if isinstance(choice, dict):
                    assert name == "get_weather"
                jsonschema.validate(json.loads(args), schemas[name])


def test_thinking_is_off_under_a_grammar(server):
    r = server.client.chat.completions.create(model="tiny", messages=USER, max_tokens=64, reasoning_effort="high",
                                              response_format=rf(SCHEMAS[3]), extra_body={"steps": 4})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMAS[3])
    assert r.model_extra["x_ignored_fields"] == ["reasoning_effort"]


def test_bad_structured_requests_are_one_line_400s(server):
    bad = [
        ({"response_format": rf({"type": "object", "properties": {"a": {"type": "strnig"}}})}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "strict": 1}}}, "response_format"),
        ({"response_format": {"type": "json_object"}, "canvas_template": "{__}"}, "response_format"),
        ({"response_format": {"type": "json_object"}, "tools": [WEATHER], "tool_choice": "required"},
         "response_format"),
    ]
    for extra, param in bad:
        status, body = http(server, "POST", "/v1/chat/completions", {"model": "tiny", "messages": USER, **extra})
        assert status == 400 and body["error"]["param"] == param, (extra, body)
        assert "\n" not in body["error"]["message"]
    status, body = http(server, "POST", "/v1/responses", {"model": "tiny", "input": "x", "text": {"format": {
        "type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}}})
    assert status == 400 and body["error"]["param"] == "text.format" and "invalid JSON schema" in body["error"]["message"]
