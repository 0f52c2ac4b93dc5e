"""What agents need from the server: tool calls, the sampling fields clients send by
default, API keys, the Responses API, long conversations with tools.

Three kinds of tests:

- the parsing, streaming and translation layers on GIVEN token sequences: a scripted
  scheduler stands in for the model and replies with the tokens a test chooses, so a
  call can be made to span two blocks, be malformed, or never close (these tokens are
  the test's input, not the model's output);
- the real pipeline on the tiny random model of ``test_server`` (it writes gibberish,
  so these tests check what does not depend on the model knowing anything: rendering,
  pins, determinism, which fields apply, status codes);
- the default request bodies of well-known clients, sent with the official client.

The end-to-end agent loop needs a model that really writes Gemma 4 calls (a fine-tuned
one); ``agent_model_dir`` below is where such a folder plugs in.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai", reason="the server tests need the openai client (pip install -e '.[test]')")
pytest.importorskip("fastapi", reason="the server needs FastAPI (pip install -e '.[server]')")

import mlx.core as mx  # noqa: E402

import mlx_dgemma  # noqa: E402
from mlx_dgemma.chat_template import TOOL_CALL_OPEN  # noqa: E402
from mlx_dgemma.logits_processors import MASKED, LogitsProcessors  # noqa: E402
from mlx_dgemma.server import ServerState  # noqa: E402
from tests.fixtures import tiny  # noqa: E402
from mlx_dgemma.serving.prompt_cache import PromptCacheStore  # noqa: E402
from mlx_dgemma.serving.protocol import parse_request  # noqa: E402
from mlx_dgemma.serving.scheduler import Event  # noqa: E402
from mlx_dgemma.serving.tools import ReplyParser, ToolFormat  # noqa: E402
from tests.test_server import CONTEXT, L, Running, http, model_dir  # noqa: E402,F401

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                                    "days": {"type": "integer"}},
                   "required": ["city"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                          "parameters": {"type": "object", "properties": {}}}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def loaded(model_dir):
    return mlx_dgemma.load(model_dir)


@pytest.fixture(scope="module")
def tok(loaded):
    return loaded[1]


def enc(tok, text):
    return [int(t) for t in tok.encode(text, add_special_tokens=False)]


# --- the chat template and mlx-lm's tool parser -----------------------------------------


def test_template_renders_tools_calls_and_results_like_gemma4(tok):
    assert tok.has_tool_calling and tok.tool_call_start == TOOL_CALL_OPEN  # mlx-lm found its gemma4 parser
    msgs = [{"role": "system", "content": "Be brief. "}, *USER,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": {"days": 2, "city": "Paris"}}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "Thanks"}]
    text = tok.apply_chat_template(msgs, tools=[WEATHER, CLOCK], add_generation_prompt=True, tokenize=False,
                                   enable_thinking=False)
    q = '<|"|>'
    assert text == (
        f"<bos><|turn>system\nBe brief.<|tool>declaration:get_weather{{description:{q}Current weather of a city{q},"
        f"parameters:{{properties:{{city:{{description:{q}City name{q},type:{q}STRING{q}}},days:{{type:{q}INTEGER{q}}}}},"
        f"required:[{q}city{q}],type:{q}OBJECT{q}}}}}<tool|>"
        f"<|tool>declaration:get_time{{description:{q}The time now{q},parameters:{{type:{q}OBJECT{q}}}}}<tool|><turn|>\n"
        "<|turn>user\nWhat is the weather in Paris?<turn|>\n"
        f"<|turn>model\n<|tool_call>call:get_weather{{city:{q}Paris{q},days:2}}<tool_call|>"
        f"<|tool_response>response:get_weather{{value:{q}sunny{q}}}<tool_response|>Sunny.<turn|>\n"
        "<|turn>user\nThanks<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")
    # after a tool result the model goes on in the same turn: no new header
    pending = tok.apply_chat_template(msgs[:4], tools=[WEATHER], add_generation_prompt=True, tokenize=False,
                                      enable_thinking=False)
    assert pending.endswith("<tool_response|>")
    # every control token is one special token
    for t in ("<|tool_call>", "<tool_call|>", '<|"|>', "<|tool_response>", "<|tool>"):
        assert len(enc(tok, t)) == 1, t


# --- the reply parser on given token sequences -------------------------------------------


def parser(tok, **kw):
    return ReplyParser(tok, ToolFormat(tok), stop_tokens=[tiny.EOS, tiny.END, tiny.TOOL_RESPONSE], **kw)


def test_reply_parser_call_split_across_blocks(tok):
    ids = enc(tok, 'Let me check.<|tool_call>call:get_weather{city:<|"|>Paris, {or} Lyon<|"|>,days:2}<tool_call|>'
                   "<|tool_response>ignored")
    cut = ids.index(enc(tok, "<|tool_call>")[0]) + 6  # inside the call
    p = parser(tok)
    p.feed(ids[:cut])
    assert p.answer == "Let me check." and p.calls == []
    p.feed(ids[cut:])
    assert p.answer == "Let me check."
    [call] = p.calls
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    assert json.loads(call["arguments"]) == {"city": "Paris, {or} Lyon", "days": 2}  # <|"|> kept for the parser
    assert p.calls[0]["id"] == call["id"]  # stable: streaming and the final reply agree


def test_reply_parser_bad_unclosed_and_parallel_calls(tok):
    bad = parser(tok)
    bad.feed(enc(tok, "A<|tool_call>call:f{a:b}<tool_call|>B"))
    assert bad.calls == [] and bad.answer == "A<|tool_call>call:f{a:b}<tool_call|>B"
    cut = parser(tok)  # never closed: held back while streaming, text at the end
    cut.feed(enc(tok, 'A<|tool_call>call:f{x:<|"|>y'))
    assert cut.answer == "A" and cut.calls == []
    cut.finish()
    assert cut.answer == 'A<|tool_call>call:f{x:<|"|>y' and cut.calls == []
    whole = parser(tok)  # never closed but complete: parsed at the end (as mlx-lm's server does)
    whole.feed(enc(tok, "<|tool_call>call:f{x:1}"))
    assert whole.calls == []
    whole.finish()
    assert [(c["name"], json.loads(c["arguments"])) for c in whole.calls] == [("f", {"x": 1})]
    two = parser(tok, thinking=True)
    two.feed(enc(tok, "<|channel>thought\nplan<channel|><|tool_call>call:a{}<tool_call|><|tool_call>call:b{n:[1,2]}"
                      "<tool_call|>"))
    assert [c["name"] for c in two.calls] == ["a", "b"] and two.thought == "plan" and two.answer == ""


def test_trainer_supervises_the_calls_of_a_tool_call_reply(tok):
    """The template writes an assistant turn's calls before its content: the reply the
    trainer scores must start after the model-turn header, calls included."""
    from mlx_dgemma.tuner.datasets import chat_example

    call = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    ex = chat_example(tok, [*USER, call], [WEATHER])
    assert tok.decode(ex.response, skip_special_tokens=False) == \
        '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|><|tool_response>'
    assert tok.decode(ex.prompt, skip_special_tokens=False).endswith("<|turn>model\n<|channel>thought\n<channel|>")


# --- canvas pins for tool_choice ---------------------------------------------------------


def test_tool_choice_pins_the_calls_opening(tok):
    fmt = ToolFormat(tok)
    assert fmt.pins("auto", None, [WEATHER]) == {} and fmt.pins("none", None, [WEATHER]) == {}
    assert list(fmt.pins("required", None, [WEATHER]).values()) == enc(tok, "<|tool_call>call:")
    assert list(fmt.pins("function", "get_weather", [WEATHER]).values()) == enc(tok, "<|tool_call>call:get_weather{")
    # no parameters: nothing is left to choose, the whole call (and the hand-over) is pinned
    assert list(fmt.pins("function", "get_time", [CLOCK]).values()) == \
        enc(tok, "<|tool_call>call:get_time{}<tool_call|><|tool_response>")


# --- sampling fields: the logits processing against transformers' processors -------------


def test_logits_processors_match_transformers():
    import torch
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    rs = np.random.RandomState(0)
    V, Lc = 300, 6
    x = (rs.randn(1, Lc, V) * 3).astype(np.float32)
    prompt, generated = rs.randint(0, V, 40), rs.randint(0, V, 25)
    ids = torch.tensor(np.concatenate([prompt, generated]))[None].repeat(Lc, 1)

    def ours(**kw):
        fn = LogitsProcessors(**kw).for_context(prompt, generated, V)
        return np.array(fn(mx.array(x)))[0]

    def masked_equal(a, b):  # transformers removes with -inf, we with MASKED (finite, see the module)
        assert ((a <= MASKED / 2) == np.isneginf(b)).all()
        keep = ~np.isneginf(b)
        np.testing.assert_allclose(a[keep], b[keep], rtol=1e-6, atol=1e-6)

    t = torch.tensor(x[0])
    masked_equal(ours(top_k=7), TopKLogitsWarper(7)(ids, t.clone()).numpy())
    masked_equal(ours(top_p=0.8), TopPLogitsWarper(0.8)(ids, t.clone()).numpy())
    masked_equal(ours(min_p=0.05), MinPLogitsWarper(0.05)(ids, t.clone()).numpy())
    masked_equal(ours(repetition_penalty=1.3), RepetitionPenaltyLogitsProcessor(1.3)(ids, t.clone()).numpy())
    # OpenAI's penalties count the reply's tokens only; logit_bias adds; suppress removes
    counts = np.bincount(generated, minlength=V)
    want = x[0] - (0.5 * counts + 0.25 * (counts > 0)) + np.where(np.arange(V) == 3, 7.0, 0.0)
    got = ours(frequency_penalty=0.5, presence_penalty=0.25, logit_bias={3: 7.0}, suppress=(5,))
    np.testing.assert_allclose(np.delete(got, 5, -1), np.delete(want, 5, -1), rtol=1e-6, atol=1e-5)
    assert (got[:, 5] <= MASKED / 2).all()
    assert LogitsProcessors().for_context(prompt, generated, V) is None  # nothing to do


# --- request validation: the field policy ----------------------------------------------


def test_sampling_fields_policy_and_strict_mode():
    msgs = [{"role": "user", "content": "hi"}]
    p = parse_request({"model": "m", "messages": msgs, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.1,
                       "presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1,
                       "logit_bias": {"12": -5}, "typical_p": 0.9, "logprobs": True, "vendor_x": 1}, chat=True)
    assert p.temperature == 0.7 and p.processors.top_k == 40 and p.processors.logit_bias == {12: -5}
    assert sorted(p.ignored) == ["logprobs", "typical_p", "vendor_x"]
    for body, field in (({"temperature": 2.01}, "temperature"), ({"temperature": -0.1}, "temperature"),
                        ({"top_p": 0}, "top_p"), ({"min_p": 1.5}, "min_p"), ({"top_k": -2}, "top_k"),
                        ({"frequency_penalty": 2.5}, "frequency_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
                        ({"logit_bias": {"a": 1}}, "logit_bias"), ({"logit_bias": {"1": 101}}, "logit_bias")):
        with pytest.raises(Exception) as e:
            parse_request({"model": "m", "messages": msgs, **body}, chat=True)
        assert e.value.status == 400 and e.value.param == field, (body, e.value.message)
    strict = dict(chat=True, strict_sampling=True)
    parse_request({"model": "m", "messages": msgs, "temperature": 1, "top_p": 1, "logprobs": False}, **strict)
    for body in ({"temperature": 0}, {"top_p": 0.5}, {"typical_p": 0.5}, {"presence_penalty": 1}):
        with pytest.raises(Exception) as e:
            parse_request({"model": "m", "messages": msgs, **body}, **strict)
        assert e.value.status == 400 and "strict-sampling" in e.value.message


# --- the HTTP layers on given token sequences (scripted scheduler) -----------------------


class Scripted:
    """Stands in for the scheduler: answers every request with ``self.blocks`` (token
    lists), cut at the first stop token, as the real scheduler cuts a committed block."""

    def __init__(self, stop):
        self.stop_ids = set(stop)
        self.store = PromptCacheStore(0)
        self.blocks = []
        self.seen = []

    def start(self):
        return self

    def stop(self, timeout=None):
        pass

    def stats(self):
        return {}

    def submit(self, req):
        self.seen.append(req.params)
        req.on_event(Event("prefilled", stats={"cached_tokens": 0}))
        for block in self.blocks:
            at = next((i for i, t in enumerate(block) if t in self.stop_ids), None)
            req.on_event(Event("block", tokens=list(block if at is None else block[:at])))
            if at is not None:
                req.on_event(Event("done", finish_reason="stop", stats={}))
                return
        req.on_event(Event("done", finish_reason="length", stats={}))


@pytest.fixture(scope="module")
def scripted(loaded, model_dir):
    model, tok_ = loaded
    state = ServerState(model, tok_, "tiny", model_path=model_dir, cache_size_gb=0)
    state.scheduler = Scripted(state.eos_token_ids)
    run = Running(state)
    yield run
    run.stop()


def script(run, text, size=16):
    ids = enc(run.state.tokenizer, text)
    run.state.scheduler.blocks = [ids[i:i + size] for i in range(0, len(ids), size)]
    return ids


CALL = 'Let me check.<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2}<tool_call|><|tool_response>'


def test_chat_tool_call_whole_and_streamed_in_the_block_that_completes_it(scripted):
    ids = script(scripted, CALL)
    close_block = ids.index(enc(scripted.state.tokenizer, "<tool_call|>")[0]) // 16
    assert close_block >= 1 and ids.index(enc(scripted.state.tokenizer, "<|tool_call>")[0]) // 16 < close_block
    r = scripted.client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER])
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and m.content == "Let me check."
    [call] = m.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 2}

    chunks = list(scripted.client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER], stream=True))
    body = [c for c in chunks[1:] if c.choices and c.choices[0].finish_reason is None]
    with_calls = [i for i, c in enumerate(body) if c.choices[0].delta.tool_calls]
    assert with_calls == [close_block]  # sent with the block that closes it, once
    tc = body[close_block].choices[0].delta.tool_calls[0]
    assert (tc.index, tc.function.name, json.loads(tc.function.arguments)) == (0, "get_weather",
                                                                              {"city": "Paris", "days": 2})
    assert "".join(c.choices[0].delta.content or "" for c in body) == "Let me check."
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_chat_malformed_call_is_text_never_500_and_parallel_calls(scripted):
    script(scripted, "A<|tool_call>call:get_weather{city:Paris}<tool_call|>B<turn|>")
    r = scripted.client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER])
    assert r.choices[0].message.content == "A<|tool_call>call:get_weather{city:Paris}<tool_call|>B"
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason == "stop"
    two = '<|tool_call>call:get_weather{city:<|"|>A<|"|>}<tool_call|><|tool_call>call:get_time{}<tool_call|><|tool_response>'
    script(scripted, two)
    r = scripted.client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER, CLOCK])
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_weather", "get_time"]
    assert r.choices[0].message.content is None
    r = scripted.client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER, CLOCK],
                                                parallel_tool_calls=False)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_weather"]
    # without tools in the request nothing is parsed as a call
    script(scripted, CALL)
    r = scripted.client.chat.completions.create(model="tiny", messages=USER)
    assert not r.choices[0].message.tool_calls


def test_responses_api_items_events_and_usage(scripted):
    script(scripted, CALL)
    resp_tool = {"type": "function", "name": "get_weather", "description": "weather",
                 "parameters": WEATHER["function"]["parameters"], "strict": True}
    r = scripted.client.responses.create(model="tiny", input="What is the weather in Paris?",
                                         instructions="Be brief.", tools=[resp_tool])
    assert r.status == "completed" and r.output_text == "Let me check."
    [msg, fc] = r.output
    assert msg.type == "message" and fc.type == "function_call" and fc.name == "get_weather"
    assert json.loads(fc.arguments) == {"city": "Paris", "days": 2} and fc.call_id.startswith("call_")
    assert r.usage.input_tokens > 0 and r.usage.output_tokens == len(enc(scripted.state.tokenizer, CALL)) - 1
    # the instructions and the tools reached the chat template
    sent = scripted.state.tokenizer.decode(scripted.state.scheduler.seen[-1].prompt, skip_special_tokens=False)
    assert "<|turn>system\nBe brief.<|tool>declaration:get_weather{" in sent

    events = list(scripted.client.responses.create(model="tiny", input="Weather?", tools=[resp_tool], stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [k for k in kinds[2:-1] if k != "response.output_text.delta"] == [
        "response.output_item.added", "response.content_part.added", "response.output_text.done",
        "response.content_part.done", "response.output_item.done",  # the message, then the call
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Let me check."
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert json.loads(done.arguments) == {"city": "Paris", "days": 2}
    assert events[-1].response.usage.output_tokens > 0 and len(events[-1].response.output) == 2

    # thinking: a reasoning item before the message (chat: reasoning_content)
    script(scripted, "<|channel>thought\nhmm<channel|>Answer<turn|>")
    r = scripted.client.responses.create(model="tiny", input="Q", reasoning={"effort": "high"})
    assert [o.type for o in r.output] == ["reasoning", "message"] and r.output[0].content[0].text == "hmm"
    c = scripted.client.chat.completions.create(model="tiny", messages=USER, reasoning_effort="high")
    assert c.choices[0].message.content == "Answer" and c.choices[0].message.model_extra["reasoning_content"] == "hmm"


def test_responses_history_items_and_store_errors(scripted):
    script(scripted, "Sunny.<turn|>")
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"type": "function_call", "call_id": "c9", "name": "get_weather", "arguments": '{"city": "Paris"}',
                "id": "fc_1", "status": "completed"},
               {"type": "function_call_output", "call_id": "c9", "output": "sunny"}]
    r = scripted.client.responses.create(model="tiny", input=history, tools=[{"type": "function", "name": "get_weather",
                                                                                "parameters": {"type": "object"}}])
    assert r.output_text == "Sunny."
    sent = scripted.state.tokenizer.decode(scripted.state.scheduler.seen[-1].prompt, skip_special_tokens=False)
    assert sent.endswith('<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
                         '<|tool_response>response:get_weather{value:<|"|>sunny<|"|>}<tool_response|>')
    for extra, word in (({"previous_response_id": "resp_1"}, "store"), ({"tools": [{"type": "web_search"}]}, "function"),
                        ({"input": [{"type": "item_reference", "id": "x"}]}, "store"),
                        ({"text": {"format": {"type": "yaml"}}}, "text.format")):
        status, body = http(scripted, "POST", "/v1/responses", {"model": "tiny", "input": "hi", **extra})
        assert status == 400 and word in body["error"]["message"], body


# --- the real pipeline on the tiny model -------------------------------------------------


@pytest.fixture(scope="module")
def server(loaded, model_dir):
    model, tok_ = loaded
    run = Running(ServerState(model, tok_, "tiny", model_path=model_dir, cache_size_gb=1.0, max_batch=4,
                              prefill_chunk=512))
    yield run
    run.stop()


def ask(run, messages=USER, **kw):
    kw.setdefault("max_tokens", 2 * L)
    extra = kw.pop("extra_body", {})
    return run.client.chat.completions.create(model="tiny", messages=messages,
                                              extra_body={"return_token_ids": True, **extra}, **kw)


def token_ids(r):
    return r.choices[0].model_extra["token_ids"]


def test_tools_and_history_go_through_the_template(server):
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    r = ask(server, history, tools=[WEATHER], seed=1)
    prompt = server.state.tokenizer.decode(r.model_extra["prompt_token_ids"], skip_special_tokens=False)
    assert "<|tool>declaration:get_weather{description:" in prompt
    assert prompt.endswith('<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
                           '<|tool_response>response:get_weather{value:<|"|>sunny<|"|>}<tool_response|>')
    status, body = http(server, "POST", "/v1/chat/completions", {"model": "tiny", "messages": history[:2] + [
        {"role": "tool", "tool_call_id": "c1", "content": "x"}], "tools": [WEATHER], "tool_choice": "get_weather"})
    assert status == 400 and body["error"]["param"] == "tool_choice"
    bad_args = [*USER, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                             "function": {"name": "f", "arguments": "{oops"}}]}]
    status, body = http(server, "POST", "/v1/chat/completions", {"model": "tiny", "messages": bad_args})
    assert status == 400 and "not valid JSON" in body["error"]["message"]


def test_tool_choice_pinning_opens_the_call_and_a_parameterless_call_parses(server):
    tok_ = server.state.tokenizer
    named = ask(server, tools=[WEATHER, CLOCK], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                seed=3)
    opening = enc(tok_, "<|tool_call>call:get_weather{")
    assert token_ids(named)[:len(opening)] == opening
    m = named.choices[0].message  # a random model: a parsed call or, failing that, text; never an error
    assert (m.tool_calls and m.tool_calls[0].function.name == "get_weather") or \
        m.content.startswith("<|tool_call>call:get_weather{")
    required = ask(server, tools=[WEATHER, CLOCK], tool_choice="required", seed=3)
    assert token_ids(required)[:len(enc(tok_, "<|tool_call>call:"))] == enc(tok_, "<|tool_call>call:")
    for stream in (False, True):
        kw = dict(tools=[WEATHER, CLOCK], tool_choice={"type": "function", "function": {"name": "get_time"}}, seed=4)
        if stream:
            chunks = list(server.client.chat.completions.create(model="tiny", messages=USER, stream=True, **kw))
            calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
            finish = chunks[-1].choices[0].finish_reason
        else:
            r = ask(server, **kw)
            calls, finish = r.choices[0].message.tool_calls, r.choices[0].finish_reason
            assert token_ids(r) == enc(tok_, "<|tool_call>call:get_time{}<tool_call|>")
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_time", {})]
        assert finish == "tool_calls"
    r = server.client.responses.create(model="tiny", input="time?", tool_choice={"type": "function", "name": "get_time"},
                                       tools=[{"type": "function", "name": "get_time", "parameters": {"type": "object"}}])
    assert [(o.type, o.name) for o in r.output] == [("function_call", "get_time")]


def test_tool_choice_none_suppresses_the_call_marker(server):
    open_id = enc(server.state.tokenizer, "<|tool_call>")[0]
    push = {"logit_bias": {str(open_id): 100}}  # make the marker the likeliest token everywhere
    auto = ask(server, tools=[WEATHER], seed=5, extra_body=push)
    none = ask(server, tools=[WEATHER], tool_choice="none", seed=5, extra_body=push)
    assert open_id in token_ids(auto) and open_id not in token_ids(none)
    # the prompt (and so its cache) is the same whatever the tool choice
    assert auto.model_extra["prompt_token_ids"] == none.model_extra["prompt_token_ids"]


def test_temperature_zero_is_deterministic_and_temperature_scales_the_schedule(server):
    a, b = ask(server, temperature=0, seed=1), ask(server, temperature=0, seed=2)
    assert token_ids(a) == token_ids(b) and len(token_ids(a)) > 0
    assert token_ids(ask(server, seed=1)) != token_ids(ask(server, seed=2))  # the seed matters otherwise
    # temperature T multiplies the schedule: T=0.5 is t_min 0.2, t_max 0.4 (the model's 0.4 .. 0.8)
    half = ask(server, temperature=0.5, seed=6)
    assert token_ids(half) == token_ids(ask(server, seed=6, extra_body={"t_min": 0.2, "t_max": 0.4}))
    assert token_ids(half) != token_ids(ask(server, seed=6))
    assert "x_ignored_fields" not in half.model_extra


def test_penalties_see_earlier_blocks_and_warpers_apply(server):
    base = token_ids(ask(server, seed=8, max_tokens=3 * L))
    pen = token_ids(ask(server, seed=8, max_tokens=3 * L, frequency_penalty=2.0, presence_penalty=2.0))
    assert pen[:L] == base[:L]  # the first block has no earlier reply tokens to penalise
    assert pen[L:] != base[L:]
    for kw in (dict(top_p=0.05), dict(extra_body={"top_k": 3}), dict(extra_body={"min_p": 0.5}),
               dict(extra_body={"repetition_penalty": 1.5})):
        r = ask(server, seed=8, max_tokens=3 * L, **kw)
        assert token_ids(r) != base and "x_ignored_fields" not in r.model_extra, kw
    r = ask(server, seed=8, extra_body={"typical_p": 0.5, "some_vendor_field": 1})
    assert r.model_extra["x_ignored_fields"] == ["some_vendor_field", "typical_p"]


def test_other_decodes_report_sampling_fields_and_force_tools_too(server):
    r = ask(server, seed=2, temperature=0.5, extra_body={"decode": "ar", "top_k": 5})
    assert r.model_extra["x_ignored_fields"] == ["temperature", "top_k"]
    # tool_choice is a grammar now (tests/test_structured_server.py): every decode mode takes it
    r = ask(server, tools=[WEATHER], tool_choice="required", seed=2, extra_body={"decode": "ar"})
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_weather"]


def test_api_key(loaded, model_dir, caplog):
    model, tok_ = loaded
    key = "sk-local-1234567890"
    run = Running(ServerState(model, tok_, "tiny", model_path=model_dir, cache_size_gb=0, api_key=key))
    caplog.set_level(logging.DEBUG)
    try:
        body = {"model": "tiny", "messages": USER, "max_tokens": 4}
        status, reply = http(run, "POST", "/v1/chat/completions", body)
        assert status == 401 and reply["error"]["code"] == "invalid_api_key" \
            and reply["error"]["type"] == "invalid_request_error"
        for wrong in ("sk-local-123456789", "wrong", key + "x"):
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=run.base + "/v1", api_key=wrong, max_retries=0).models.list()
        status, _ = http(run, "GET", "/v1/models")
        assert status == 401
        ok = openai.OpenAI(base_url=run.base + "/v1", api_key=key, max_retries=0)
        assert ok.chat.completions.create(**body).choices[0].finish_reason in ("stop", "length")
        assert ok.models.list().data[0].id == "tiny"
        status, health = http(run, "GET", "/health")  # open: no key needed
        assert status == 200 and health["status"] == "ok"
        assert not run.state.authorized(f"Basic {key}") and run.state.authorized(f"Bearer {key}")
    finally:
        run.stop()
    assert key not in caplog.text and key not in repr(vars(run.state))


# --- the default request bodies of well-known clients ------------------------------------


def test_default_requests_of_well_known_clients(server):
    """Bodies as these clients build them by default (sources in the comments); each gets a 200.
    One addition everywhere: a token budget, so the random model's replies stay short
    (without one the server grants the rest of the context, as the tests of budgets show)."""
    c = server.client
    # OpenAI Agents SDK (openai-agents-python, src/agents/models/openai_responses.py,
    # _build_response_create_kwargs, with ModelSettings() defaults): Responses API, the
    # input as a list of items, instructions, include=[], function tools with strict JSON
    # schemas, and stream when run with Runner.run_streamed.
    agent_tool = {"type": "function", "name": "get_weather", "description": "Weather of a city", "strict": True,
                  "parameters": {"type": "object", "properties": {"city": {"title": "City", "type": "string"}},
                                 "required": ["city"], "title": "get_weather_args", "additionalProperties": False}}
    agents = dict(model="tiny", instructions="You are a helpful agent.", include=[], tools=[agent_tool],
                  input=[{"content": "What is the weather in Paris?", "role": "user"}], max_output_tokens=2 * L)
    r = c.responses.create(**agents)
    assert r.status in ("completed", "incomplete") and r.usage.input_tokens > 0
    events = list(c.responses.create(**agents, stream=True))
    assert events[-1].type in ("response.completed", "response.incomplete")
    # its Chat Completions model (src/agents/models/openai_chatcompletions.py) sends
    # messages, tools in the chat shape, stream and stream_options.include_usage
    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "Be an agent."}, *USER],
                                            tools=[WEATHER], stream=True, stream_options={"include_usage": True},
                                            max_tokens=2 * L))
    assert chunks[-1].usage.total_tokens > 0
    # LangChain ChatOpenAI (langchain_openai/chat_models/base.py, _default_params: model,
    # stream, and n/temperature; the 0.1-0.2 releases defaulted to temperature 0.7 and
    # n 1) with bind_tools(...) adding the tools.
    lc = c.chat.completions.create(model="tiny", messages=USER, stream=False, n=1, temperature=0.7, tools=[WEATHER],
                                   max_tokens=2 * L)
    assert lc.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # Aider, a coding assistant (aider/models.py, Model.send_completion): model,
    # messages, stream=True and temperature=0; with a function it also forces it with a
    # named tool_choice.
    ai = list(c.chat.completions.create(model="tiny", messages=USER, stream=True, temperature=0, max_tokens=2 * L))
    assert ai[-1].choices[0].finish_reason in ("stop", "length")
    forced = c.chat.completions.create(model="tiny", messages=USER, temperature=0, max_tokens=2 * L,
                                       tools=[{"type": "function", "function": CLOCK["function"]}],
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert forced.choices[0].message.tool_calls[0].function.name == "get_time"


# --- long conversations with tools -------------------------------------------------------


def test_next_turn_of_a_tool_conversation_encodes_only_the_new_messages(server):
    st = server.state
    system = {"role": "system", "content": "Reference notes. " * 120}
    turn1 = [system, *USER]
    r1 = ask(server, turn1, tools=[WEATHER], seed=2)
    history1 = len(st.tokenizer.apply_chat_template(turn1, tools=[WEATHER], add_generation_prompt=False,
                                                    enable_thinking=False, tokenize=True))
    turn2 = turn1 + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny, light wind " * 40}]
    before = st.scheduler.stats()["prefill_tokens"]
    r2 = ask(server, turn2, tools=[WEATHER], seed=2)
    encoded = st.scheduler.stats()["prefill_tokens"] - before
    assert r2.usage.prompt_tokens_details.cached_tokens == history1 > 1000
    assert encoded == r2.usage.prompt_tokens - history1  # the call and its result, nothing else
    turn3 = turn2 + [{"role": "assistant", "content": r2.choices[0].message.content or "ok"},
                     {"role": "user", "content": "And tomorrow?"}]
    r3 = ask(server, turn3, tools=[WEATHER], seed=2)
    assert r3.usage.prompt_tokens_details.cached_tokens >= r2.usage.prompt_tokens  # turn 2's prompt is a prefix
    assert r1.usage.prompt_tokens < r2.usage.prompt_tokens < r3.usage.prompt_tokens


def test_a_64k_token_conversation_with_tools_is_accepted(server):
    """Validation, the template with tools and the context check at 64K tokens (the full
    run, with time to first block, is ``benchmarks/bench_server.py agent``)."""
    st = server.state
    msgs = [{"role": "system", "content": "Project files follow. " + "def f(x): return x + 1\n" * 2850}, *USER,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny " * 100}]
    p = parse_request({"model": "tiny", "messages": msgs, "tools": [WEATHER, CLOCK], "max_tokens": 4096}, chat=True)
    prompt, snaps = st.chat_tokens(p)
    assert 65536 <= len(prompt) < CONTEXT
    params = st.params(p, prompt, snaps, chat=True)
    assert params.max_tokens == 4096 and len(params.prompt) == len(prompt)


# --- the end-to-end agent loop -----------------------------------------------------------
# A model that really writes Gemma 4 calls: ``tests/fixtures/agent-model``, a tiny model
# fine-tuned with the project's trainer on six tool conversations
# (``tests/fixtures/build_agent_model.py`` rebuilds it). Another folder with the same
# tokenizer conventions can be dropped in with MLX_DGEMMA_AGENT_MODEL.

AGENT_MODEL = Path(os.environ.get("MLX_DGEMMA_AGENT_MODEL") or Path(__file__).parent / "fixtures" / "agent-model")
AGENT_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
WEATHER_NOW = {"Paris": "sunny", "Rome": "rainy", "Oslo": "snowy"}


def get_weather(city: str) -> str:  # the tool the agent loop runs
    return WEATHER_NOW[city]


@pytest.fixture(scope="module")
def agent():
    model, tok_ = mlx_dgemma.load(AGENT_MODEL)
    run = Running(ServerState(model, tok_, "agent", model_path=AGENT_MODEL, cache_size_gb=1.0))
    yield run
    run.stop()


def _chat_turn(client, messages, stream):
    """One request; the assistant message as a client rebuilds it, and the finish reason.
    Whole replies at temperature 0; streamed ones with the model's own sampling (a seed)."""
    kw = dict(model="agent", messages=messages, tools=[AGENT_TOOL], max_tokens=64,
              **({"seed": 1} if stream else {"temperature": 0}))
    if not stream:
        r = client.chat.completions.create(**kw)
        return r.choices[0].message.model_dump(exclude_none=True), r.choices[0].finish_reason
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            c = calls.setdefault(tc.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
            c["id"] += tc.id or ""
            c["function"]["name"] += tc.function.name or ""
            c["function"]["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    msg = {"role": "assistant", "content": content or None}
    if calls:
        msg["tool_calls"] = [calls[i] for i in sorted(calls)]
    return msg, finish


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_agent_loop_chat_completions(agent, stream):
    """The openai client runs a tool loop: the model calls the tool, the test runs it and
    sends the result back, the model answers."""
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    ran = []
    for _ in range(3):
        msg, finish = _chat_turn(agent.client, messages, stream)
        messages.append(msg)
        if not msg.get("tool_calls"):
            break
        assert finish == "tool_calls"
        for call in msg["tool_calls"]:
            args = json.loads(call["function"]["arguments"])
            ran.append((call["function"]["name"], args))
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": get_weather(**args)})
    assert ran == [("get_weather", {"city": "Paris"})]
    assert finish == "stop" and "sunny" in messages[-1]["content"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_agent_loop_responses(agent, stream):
    tool = {"type": "function", "name": "get_weather", "description": "",
            "parameters": AGENT_TOOL["function"]["parameters"], "strict": True}
    items = [{"role": "user", "content": "Weather in Paris?"}]
    ran = []

    def turn():
        kw = dict(model="agent", input=items, tools=[tool], temperature=0, max_output_tokens=64)
        if not stream:
            return agent.client.responses.create(**kw)
        events = list(agent.client.responses.create(stream=True, **kw))
        assert events[-1].type == "response.completed"
        return events[-1].response

    for _ in range(3):
        r = turn()
        items += [o.model_dump(exclude_none=True) for o in r.output]  # replayed, as the Agents SDK does
        calls = [o for o in r.output if o.type == "function_call"]
        if not calls:
            break
        for c in calls:
            ran.append((c.name, json.loads(c.arguments)))
            items.append({"type": "function_call_output", "call_id": c.call_id,
                          "output": get_weather(**json.loads(c.arguments))})
    assert ran == [("get_weather", {"city": "Paris"})]
    assert r.status == "completed" and "sunny" in r.output_text
