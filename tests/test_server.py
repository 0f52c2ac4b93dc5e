"""The OpenAI-compatible server, driven by the official ``openai`` client.

A tiny random DiffusionGemma (built by the PyTorch reference harness) with a byte-level
tokenizer is served on 127.0.0.1 (a free port) by uvicorn in a thread; the fixture
starts and stops it. Canvases are 16 tokens and blocks take at most 8 steps, so every
request runs in well under a second.
"""

from __future__ import annotations

import http.client as httplib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

openai = pytest.importorskip("openai", reason="the server tests need the openai client (pip install -e '.[test]')")
pytest.importorskip("fastapi", reason="the server needs FastAPI (pip install -e '.[server]')")
uvicorn = pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install -e '.[server]')")

import mlx.core as mx  # noqa: E402

import mlx_dgemma  # noqa: E402
from mlx_dgemma.cache import PrefixCache  # noqa: E402
from mlx_dgemma.drafter import DenoiseSettings  # noqa: E402
from mlx_dgemma.server import ServerState, create_app  # noqa: E402
from tests.fixtures import tiny  # noqa: E402

CONTEXT = 262144  # the released checkpoint's max_position_embeddings
L = 16  # canvas length of the test model
STEPS = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch

    from tests.reference.hf_reference import build_reference, save_checkpoint, tiny_config

    path = tmp_path_factory.mktemp("tiny-server-model")
    V = tiny.byte_vocab_size() + 9
    cfg = tiny_config(L, vocab_size=V, max_position_embeddings=CONTEXT, **tiny.TOKEN_IDS)
    ref = build_reference(cfg, seed=0)
    # A random self-conditioning MLP amplifies float rounding about 5x per denoising
    # step; scaled down it is contractive, as a trained model's is meant to be, so float
    # noise fades instead of growing. (The same-token tests still need the same float
    # operations on both sides: the order_free_arithmetic fixture.)
    with torch.no_grad():
        ref.model.decoder.self_conditioning.down_proj.weight.mul_(0.3)
    save_checkpoint(ref, path)
    tiny.write_byte_tokenizer(path, V)
    tiny.write_generation_config(path, max_denoising_steps=STEPS)
    return path


class Running:
    def __init__(self, state: ServerState):
        self.state = state
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        state.start()
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0, timeout=60)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.state.stop()


@pytest.fixture(scope="module")
def server(model_dir):
    model, tok = mlx_dgemma.load(model_dir)
    run = Running(ServerState(model, tok, "tiny", model_path=model_dir, cache_size_gb=1.0, max_batch=4,
                              prefill_chunk=512))
    yield run
    run.stop()


def http(server, method, path, body=None, raw: bytes = None):
    """(status, parsed JSON) of one plain HTTP request (no client library in the way)."""
    conn = httplib.HTTPConnection("127.0.0.1", server.port, timeout=60)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read() or b"null")
    conn.close()
    return out


def chat(server, messages, **kw):
    kw.setdefault("max_tokens", 3 * L)
    return server.client.chat.completions.create(model="tiny", messages=messages, **kw)


@pytest.fixture
def order_free_arithmetic(server, monkeypatch):
    """Float arithmetic that depends neither on batch mates nor on how a prompt was chunked.

    BLAS rounds a row of a product differently at other matrix sizes: with OpenBLAS, a row
    of this model's logits differs by up to ~2e-5 between a batch of four and the row
    alone, and a prompt encoded in other chunks gets other last bits in its cache. A
    near tie in a random model's sampling or acceptance then flips a token, and the
    replies part (measured: about 4% of requests; a quarter of runs of the concurrency
    test failed). Those paths are checked within float32 bounds at the model level
    (test_model_speedups, test_model). Here the encoder takes one token per pass and a
    ragged decoder batch is run row by row, so the same float operations happen whatever
    the company or the cache, and "same tokens" checks the server's own logic (seeds,
    step counters, batching, snapshots and reuse) exactly.
    """
    model = server.state.model
    run_decoder = type(model)._run_decoder

    def row_by_row(self, canvas, cache, sc_logits, sc_embeddings, head):
        if isinstance(cache, PrefixCache):  # one row's cache (itself a list of layers)
            return run_decoder(self, canvas, cache, sc_logits, sc_embeddings, head)
        rows = [
            run_decoder(self, canvas[b : b + 1], c, None if sc_logits is None else sc_logits[b : b + 1],
                        None if sc_embeddings is None else sc_embeddings[b : b + 1], head)
            for b, c in enumerate(cache)
        ]
        return mx.concatenate(rows)

    server.state.scheduler.call(server.state.store.clear)  # no cache encoded the other way
    monkeypatch.setattr(model, "prefill_chunk", 1)
    monkeypatch.setattr(type(model), "_run_decoder", row_by_row)
    yield
    server.state.scheduler.call(server.state.store.clear)


def test_models_reports_true_context_length(server, model_dir):
    models = server.client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    card = models[0].model_dump()
    for key in ("context_length", "max_model_len", "max_context_length"):
        assert card[key] == CONTEXT, key
    assert server.client.models.retrieve("tiny").model_dump()["context_length"] == CONTEXT
    status, body = http(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok"
    # --max-context lowers it, never raises it
    st = server.state
    low = ServerState(st.model, st.tokenizer, "x", max_context=5000, cache_size_gb=0)
    assert low.model_card()["context_length"] == 5000
    high = ServerState(st.model, st.tokenizer, "x", max_context=10 * CONTEXT, cache_size_gb=0)
    assert high.model_card()["max_model_len"] == CONTEXT


def test_chat_stream_and_whole_agree_one_chunk_per_block(server):
    msgs = [{"role": "user", "content": "Write something."}]
    whole = chat(server, msgs, seed=11, max_tokens=3 * L)
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens > 0
    assert whole.usage.completion_tokens <= 3 * L
    blocks = whole.model_extra["x_stats"]["blocks"]
    chunks = list(chat(server, msgs, seed=11, max_tokens=3 * L, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    body = [c for c in chunks[1:] if c.choices and c.choices[0].finish_reason is None]
    assert len(body) == blocks  # one chunk per committed block
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # a different seed gives a different reply
    assert chat(server, msgs, seed=12).choices[0].message.content != whole.choices[0].message.content


def _library_tokens(server, prompt, seed, max_tokens, constraints=None, **settings):
    """The library's block loop (mlx_dgemma.generate.generate_blocks), cold, on the
    scheduler thread (MLX streams are per thread). Tests comparing it with a server reply
    use ``order_free_arithmetic``: the server may reuse a cache encoded in other chunks."""
    from mlx_dgemma.generate import generate_blocks

    st = server.state

    def run():
        out = []
        for b in generate_blocks(st.model, prompt, settings=DenoiseSettings(max_denoising_steps=STEPS, **settings),
                                 max_tokens=max_tokens, seeds=seed, eos_token_ids=st.eos_token_ids,
                                 constraints=None if constraints is None else [constraints]):
            row = [int(t) for t in b.tokens[0]]
            out.extend(row)
            if b.finished[0]:
                out = out[: next(i for i, t in enumerate(out) if t in st.eos_token_ids)]
                break
        return out[:max_tokens]

    return st.scheduler.call(run, timeout=60)


@pytest.mark.usefixtures("order_free_arithmetic")
def test_reply_equals_library_generate(server):
    prompt = [2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 51, 52]
    r = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=4 * L, seed=5,
                                         extra_body={"return_token_ids": True})
    want = _library_tokens(server, prompt, 5, 4 * L)
    assert r.choices[0].model_extra["token_ids"] == want
    assert r.usage.completion_tokens == len(want)
    assert r.choices[0].text == server.state.tokenizer.decode(want, skip_special_tokens=True)


@pytest.mark.usefixtures("order_free_arithmetic")
def test_canvas_constraints_extension_pins_tokens_like_the_library(server):
    prompt = [2, 40, 41, 42, 43, 44, 45]
    # "ab" then two free tokens then "c": offsets 0, 1, 4; an explicit pin at offset L + 1
    # lands in the second block; the confidence sampler rides along
    a, b, c = (server.state.tokenizer.encode(ch, add_special_tokens=False)[0] for ch in "abc")
    pins = {0: a, 1: b, 4: c, L + 1: 103}
    body = {"return_token_ids": True, "canvas_template": "ab__c", "canvas_constraints": {str(L + 1): 103},
            "sampler": "confidence", "threshold": 0.5}
    r = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=2 * L, seed=3, extra_body=body)
    got = r.choices[0].model_extra["token_ids"]
    assert got[:2] == [a, b]  # (an EOS in a hole may end the reply early)
    want = _library_tokens(server, prompt, 3, 2 * L, constraints=pins, sampler="confidence", threshold=0.5)
    assert got == want and len(got) > L + 1  # this seed's reply reaches the second block
    assert all(got[i] == t for i, t in pins.items())
    for extra, word in [({"canvas_constraints": {"x": 1}}, "offset"), ({"canvas_constraints": {"0": 10 ** 6}}, "vocabulary"),
                        ({"canvas_constraints": {str(2 * L): 5}}, "outside"), ({"canvas_template": 5}, "canvas_template"),
                        ({"sampler": "greedy"}, "sampler")]:
        status, reply = http(server, "POST", "/v1/completions",
                             {"model": "tiny", "prompt": prompt, "max_tokens": 2 * L, **extra})
        assert status == 400 and word in reply["error"]["message"], reply


@pytest.mark.usefixtures("order_free_arithmetic")
def test_decode_verified_and_ar_equal_the_library(server):
    """Our extension fields: decode="verified" (drafts verified by the encoder) and "ar"
    give the library's encoder-only tokens under the same seed, alone or side by side,
    cold or continuing a cached reply."""
    from mlx_dgemma.generate import generate_steps

    st = server.state
    prompt = [2] + list(range(100, 120))

    def library(verify):
        def run():
            steps = list(generate_steps(st.model, prompt, decode="ar", verify=verify, max_tokens=3 * L, seeds=5,
                                        eos_token_ids=st.eos_token_ids))
            out = [t for s in steps for t in s.tokens[0]]
            return out[:-1] if out and out[-1] in st.eos_token_ids else out

        return st.scheduler.call(run, timeout=60)

    def ask(decode, verify, p=prompt, **kw):
        return server.client.completions.create(
            model="tiny", prompt=p, max_tokens=3 * L, seed=5,
            extra_body={"return_token_ids": True, "decode": decode, "verify": verify, "draft_steps": 2, **kw})

    for verify in ("greedy", "sample"):
        want = library(verify)
        with ThreadPoolExecutor(3) as ex:
            got = list(ex.map(lambda d: ask(d, verify), ["verified", "ar", "diffusion"]))
        for r in got[:2]:
            assert r.choices[0].model_extra["token_ids"] == want
        assert got[2].choices[0].model_extra["token_ids"] != want  # the diffusion reply is another text
        stats = got[0].model_extra["x_stats"]
        assert stats["decode"] == "verified" and stats["verifications"] >= 1 and stats["decoder_passes"] >= 2
    # a continuation reuses the verified reply's cache and answers as a cold start does
    reply = got[0].choices[0].model_extra["token_ids"]
    follow = prompt + reply + ([tiny.EOS] if got[0].choices[0].finish_reason == "stop" else []) + [91, 92]
    warm = ask("verified", "sample", follow)
    assert warm.usage.prompt_tokens_details.cached_tokens >= len(prompt) + len(reply)
    st.scheduler.call(st.store.clear)
    cold = ask("verified", "sample", follow)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert cold.choices[0].model_extra["token_ids"] == warm.choices[0].model_extra["token_ids"]
    for extra in ({"decode": "fast"}, {"decode": "ar", "canvas_template": "a_"}):
        status, body = http(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "hi", **extra})
        assert status == 400 and body["error"]["param"] == "decode", body


@pytest.mark.usefixtures("order_free_arithmetic")
def test_multi_turn_reuses_cache_and_matches_cold_start(server):
    st = server.state
    msgs = [{"role": "system", "content": "You are terse. " * 8}, {"role": "user", "content": "First question?"}]
    r1 = chat(server, msgs, seed=1)
    msgs2 = msgs + [{"role": "assistant", "content": r1.choices[0].message.content},
                    {"role": "user", "content": "And a second one?"}]
    warm = chat(server, msgs2, seed=2)
    cached = warm.usage.prompt_tokens_details.cached_tokens
    # The template prefills an empty thought channel, so turn 1's prompt is not a prefix
    # of turn 2; the snapshot at the end of turn 1's history is.
    hist1 = len(st.tokenizer.apply_chat_template(msgs, add_generation_prompt=False, enable_thinking=False,
                                                  tokenize=True))
    assert cached >= hist1 > 0
    msgs3 = msgs2 + [{"role": "assistant", "content": warm.choices[0].message.content},
                     {"role": "user", "content": "Third?"}]
    warm3 = chat(server, msgs3, seed=3)
    assert warm3.usage.prompt_tokens_details.cached_tokens > cached
    st.scheduler.call(st.store.clear)
    cold = chat(server, msgs2, seed=2)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert cold.choices[0].message.content == warm.choices[0].message.content
    st.scheduler.call(st.store.clear)
    cold3 = chat(server, msgs3, seed=3)
    assert cold3.choices[0].message.content == warm3.choices[0].message.content


@pytest.mark.usefixtures("order_free_arithmetic")
def test_exact_continuation_reuses_prompt_and_reply(server):
    """A raw completion that re-sends prompt + reply + more reuses all of it (the reply
    snapshot), and returns what a cold start returns."""
    st = server.state
    prompt = [2] + list(range(60, 90))
    r1 = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=2 * L, seed=7,
                                          extra_body={"return_token_ids": True})
    assert r1.choices[0].finish_reason in ("length", "stop")
    reply = r1.choices[0].model_extra["token_ids"]
    assert len(reply) == r1.usage.completion_tokens
    if r1.choices[0].finish_reason == "stop":
        reply = reply + [tiny.EOS]
    follow = prompt + reply + [91, 92, 93]
    warm = server.client.completions.create(model="tiny", prompt=follow, max_tokens=L, seed=8)
    assert warm.usage.prompt_tokens_details.cached_tokens == len(prompt) + len(reply)
    st.scheduler.call(st.store.clear)
    cold = server.client.completions.create(model="tiny", prompt=follow, max_tokens=L, seed=8)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert cold.choices[0].text == warm.choices[0].text


@pytest.mark.usefixtures("order_free_arithmetic")
def test_concurrent_requests_share_passes_and_match_solo(server):
    st = server.state
    # six requests for four batch rows: two wait in the queue; prompts of other lengths
    reqs = [
        dict(messages=[{"role": "user", "content": "a" * (5 + 13 * i)}], seed=100 + i, max_tokens=(2 + i % 3) * L)
        for i in range(6)
    ]
    solo = [chat(server, **r).choices[0].message.content for r in reqs]
    before = {int(k): v for k, v in st.scheduler.stats()["rows_per_pass"].items()}
    with ThreadPoolExecutor(6) as ex:
        together = list(ex.map(lambda r: chat(server, **r).choices[0].message.content, reqs))
    assert together == solo
    after = {int(k): v for k, v in st.scheduler.stats()["rows_per_pass"].items()}
    batched = sum(n for k, n in after.items() if k >= 2) - sum(n for k, n in before.items() if k >= 2)
    assert batched > 0, f"no decoder pass held two rows: {after}"
    assert max(after) <= st.scheduler.max_batch


def test_bad_requests_get_4xx_and_server_keeps_answering(server):
    url = "/v1/chat/completions"
    status, body = http(server, "POST", url, raw=b'{"model": "tiny", "messages": [')
    assert status == 400 and "JSON" in body["error"]["message"]

    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        (dict(model="nope", messages=msgs), 404, "nope"),
        (dict(model="tiny", messages=msgs, max_tokens=CONTEXT), 400, "max_tokens"),
        (dict(model="tiny", messages=[{"role": "user", "content": "x" * CONTEXT}]), 400, "context length"),
        (dict(model="tiny", messages=msgs, temperature=2.5), 400, "temperature"),
        (dict(model="tiny", messages=msgs, top_p=1.5), 400, "top_p"),
        (dict(model="tiny", messages=msgs, presence_penalty=-3), 400, "presence_penalty"),
        (dict(model="tiny", messages=msgs, logit_bias={"99999": 5}), 400, "vocabulary"),
        (dict(model="tiny", messages=msgs, n=2), 400, "n=2"),
        (dict(model="tiny", messages=msgs, response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "nonsense"}}}), 400, "invalid JSON schema 'x'"),
        (dict(model="tiny", messages=msgs, response_format={"type": "yaml"}), 400, "response_format.type"),
        (dict(model="tiny", messages=msgs, steps=0), 400, "max_denoising_steps"),
        (dict(model="tiny", messages=msgs, t_min=0.9, t_max=0.5), 400, "t_max"),
        (dict(model="tiny", messages=[{"role": "wizard", "content": "x"}]), 400, "role"),
        (dict(model="tiny"), 400, "messages"),
    ]
    for body, status, word in cases:
        got, reply = http(server, "POST", url, body)
        assert got == status, (body.keys(), reply)
        err = reply["error"]
        assert word.lower() in err["message"].lower(), err
    # benign fields and neutral values are accepted
    ok = chat(server, msgs, seed=1, max_tokens=L, n=1, user="u", temperature=1, top_p=1,
              stream_options=None, extra_body={"steps": 4, "entropy_bound": 0.2})
    assert ok.choices[0].finish_reason in ("stop", "length")
    assert http(server, "GET", "/health")[1]["status"] == "ok"
    assert http(server, "GET", "/v1/nowhere")[0] == 404


def test_agent_budget_of_64k_tokens_is_accepted(server):
    """An agent-style request: a 64K-token completion budget on a model whose context
    holds it. Read the first block, then hang up: the row must be dropped."""
    st = server.state
    conn = httplib.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"}, body=json.dumps({
        "model": "tiny", "messages": [{"role": "user", "content": "Plan the project."}],
        "max_tokens": 65536, "stream": True, "seed": 4,
    }))
    resp = conn.getresponse()
    assert resp.status == 200
    line = resp.fp.readline()
    while not line.startswith(b"data: "):
        line = resp.fp.readline()
    first = json.loads(line[6:])
    assert first["choices"][0]["delta"]["role"] == "assistant"
    line = resp.fp.readline()
    while not line.startswith(b"data: "):
        line = resp.fp.readline()
    assert json.loads(line[6:])["choices"][0]["finish_reason"] is None  # a first block arrived
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.time() + 20
    while st.scheduler.stats()["active"]:
        assert time.time() < deadline, "the hung-up request kept its row"
        time.sleep(0.05)


def test_stop_strings_cut_the_reply(server):
    msgs = [{"role": "user", "content": "Say things."}]
    full = chat(server, msgs, seed=21, max_tokens=3 * L).choices[0].message.content
    assert len(full) > 12
    stop = full[10:13]
    cut = chat(server, msgs, seed=21, max_tokens=3 * L, stop=[stop])
    assert cut.choices[0].message.content == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       chat(server, msgs, seed=21, max_tokens=3 * L, stop=stop, stream=True) if c.choices)
    assert streamed == full[: full.find(stop)]


def test_long_prompt_is_prefilled_in_chunks_with_bounded_memory(server):
    """A long prompt goes in ``prefill_chunk`` pieces (512 here) between decoder passes:
    sliding layers keep only their window, the chunked cache equals a one-shot encode,
    and peak memory stays below the one-shot's. (32K prompts: benchmarks/bench_server.py.)"""
    st = server.state
    n = 2048
    prompt = [2] + [int(t) for t in np.random.default_rng(0).integers(10, 200, n - 1)]
    r = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=L, seed=3)
    assert r.usage.prompt_tokens == n and r.usage.completion_tokens > 0
    args = st.model.args

    def check():
        from mlx_dgemma.serving.scheduler import prefill

        # MLX's SDPA materialises a pass's scores, which chunking bounds; the CPU attention
        # kernel bounds them by itself (outside MLX's allocator), so compare without it
        from mlx_dgemma import backend

        saved_attn = backend.settings(st.model)["attention"]
        backend.configure(st.model, attention=False)
        try:
            return _check()
        finally:
            backend.configure(st.model, attention=saved_attn)

    def _check():
        from mlx_dgemma.serving.scheduler import prefill

        mx.clear_cache()
        mx.reset_peak_memory()
        cache = st.model.make_cache()
        prefill(st.model, cache, prompt, chunk=256)
        chunked_peak = mx.get_peak_memory()
        lengths = [c.prefix()[0].shape[2] for c in cache]
        mx.clear_cache()
        mx.reset_peak_memory()
        one = st.model.make_cache()
        saved, st.model.prefill_chunk = st.model.prefill_chunk, 0  # a true one-shot pass
        try:
            st.model.encode(mx.array([prompt]), one)
        finally:
            st.model.prefill_chunk = saved
        one_peak = mx.get_peak_memory()
        diff = max(float(mx.abs(a.prefix()[0] - b.prefix()[0]).max()) for a, b in zip(cache, one))
        return lengths, diff, chunked_peak, one_peak

    lengths, diff, chunked_peak, one_peak = st.scheduler.call(check, timeout=120)
    for i, n_kept in enumerate(lengths):
        assert n_kept == (n if args.is_full(i) else args.sliding_window - 1)
    assert diff < 1e-4
    assert chunked_peak < one_peak / 2, (chunked_peak, one_peak)


def test_prompt_cache_store_longest_prefix_lru_and_isolation(server):
    """Longest exact prefix wins; entries are never changed by extending a lookup's
    copy; least recently used entries go first when the byte budget is exceeded."""
    from mlx_dgemma.serving.prompt_cache import PromptCacheStore

    model = server.state.model

    def run():
        toks = [2] + list(range(30, 90))
        caches = {}
        for n in (10, 40, 61):
            c = model.make_cache()
            model.encode(mx.array([toks[:n]]), c)
            caches[n] = c
        per = {n: c.nbytes for n, c in caches.items()}
        store = PromptCacheStore(per[10] + per[40] + per[61])
        for n in (10, 40, 61):
            assert store.insert(toks[:n], caches[n])
        out = {"longest": store.lookup(toks + [5])[0], "exact": store.lookup(toks[:40])[0],
               "diverged": store.lookup(toks[:20] + [7] * 30)[0], "none": store.lookup([9, 9])[0]}
        n, c = store.lookup(toks[:50])
        before = [np.array(x.prefix()[0]) for x in store._entries[1].cache]
        model.encode(mx.array([toks[40:50]]), c)  # extend the copy
        after = [np.array(x.prefix()[0]) for x in store._entries[1].cache]
        out["copy_n"] = n
        out["isolated"] = all(np.array_equal(a, b) for a, b in zip(before, after))
        out["copy_offset"] = c.offset
        store.lookup(toks[:12])  # touch the 10-token entry: the 61-token one is now oldest
        c5 = model.make_cache()
        model.encode(mx.array([[2, 3, 4, 5, 6]]), c5)
        store.insert([2, 3, 4, 5, 6], c5)
        out["lengths"] = sorted(store.entry_lengths())
        out["bytes_ok"] = store.nbytes <= store.max_bytes
        return out

    out = server.state.scheduler.call(run, timeout=60)
    assert (out["longest"], out["exact"], out["diverged"], out["none"]) == (61, 40, 10, 0)
    assert out["copy_n"] == 40 and out["copy_offset"] == 50 and out["isolated"]
    assert 61 not in out["lengths"] and 10 in out["lengths"] and 5 in out["lengths"]
    assert out["bytes_ok"]
