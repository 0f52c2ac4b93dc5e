"""Server benchmarks: multi-turn cache reuse, concurrent throughput, long-prompt prefill.

    python benchmarks/bench_server.py reuse       [--model DIR] [--system-tokens 4096]
    python benchmarks/bench_server.py throughput  [--model DIR] [--max-tokens 512]
    python benchmarks/bench_server.py passes      [--levels 1 2 4]
    python benchmarks/bench_server.py prefill     [--lengths 1024 8192 32768] [--chunk 2048]
    python benchmarks/bench_server.py agent       [--model DIR] [--context-tokens 65536]
    python benchmarks/bench_server.py all

``agent``: a conversation with tools of ``--context-tokens`` tokens (tool declarations,
a long system prompt, a user turn); turn 2 adds the model's tool call and the tool's
result. It reports, with and without the prompt cache, the prompt, the cached and
re-encoded tokens and the time to first block of each turn.

``reuse``, ``throughput`` and ``agent`` start ``python -m mlx_dgemma.server`` in a subprocess (so
the client does not share the server's interpreter) and talk to it with the ``openai``
client. Without ``--model`` they build a small random model (``--config small``: 4
layers, hidden 256, 16 experts, vocab 4096, canvas 256; weights random, so no early
stopping and every block runs ``--steps`` passes). ``prefill`` runs in this process on
the ``tiny`` config (hidden 64, 4 layers, sliding window 8) and reports tokens/s, peak
MLX memory and the cache's size.

Results print as JSON lines and a Markdown table (the README (Serving) quotes them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"

_SMALL = dict(
    vocab_size=4096, hidden_size=256, intermediate_size=256, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64, global_head_dim=128,
    num_global_key_value_heads=1, sliding_window=128, num_experts=16, top_k_experts=4,
    moe_intermediate_size=128, max_position_embeddings=262144,
    layer_types=["sliding_attention"] * 3 + ["full_attention"],
)
_TINY = dict(
    vocab_size=272, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
    num_global_key_value_heads=1, sliding_window=8, num_experts=8, top_k_experts=2,
    moe_intermediate_size=32, max_position_embeddings=262144,
    layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention"],
)
CONFIGS = {"small": (_SMALL, 256), "tiny": (_TINY, 16)}


def env() -> Dict[str, str]:
    e = dict(os.environ)
    if sys.platform == "linux" and os.path.exists(OPENBLAS) and OPENBLAS not in e.get("LD_PRELOAD", ""):
        from mlx_dgemma.runtime import preload_env

        e.update(preload_env(OPENBLAS))  # float32 matmuls through OpenBLAS (30x on this CPU)
    return e


def build_model(path: Path, config: str, steps: int) -> Path:
    from tests.fixtures import tiny

    text, canvas = CONFIGS[config]
    if not (path / "config.json").exists():
        tiny.write_random_model(path, text, canvas_length=canvas)
        tiny.write_byte_tokenizer(path, text["vocab_size"])
    tiny.write_generation_config(path, max_denoising_steps=steps)
    return path


class Server:
    """``python -m mlx_dgemma.server`` in a subprocess on a free port."""

    def __init__(self, model: Path, *extra: str):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        cmd = [sys.executable, "-m", "mlx_dgemma.server", "--model", str(model), "--port", str(self.port),
               "--served-model-name", "bench", "--log-level", "warning", *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env())
        import openai

        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="-", max_retries=0,
                                    timeout=3600)
        deadline = time.time() + 300
        while True:
            try:
                self.client.models.list()
                break
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"server did not start: {cmd}")
                time.sleep(0.3)

    def health(self) -> dict:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health") as r:
            return json.loads(r.read())

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def text_of_tokens(n: int, seed: int = 0) -> str:
    """ASCII text of exactly ``n`` tokens for the byte-level tokenizer."""
    import random

    r = random.Random(seed)
    words = [w for w in "the model denoises a whole block of text at once and commits it".split()]
    out = []
    while sum(len(w) + 1 for w in out) < n:
        out.append(r.choice(words))
    return " ".join(out)[:n]


def ttfb(client, messages, max_tokens: int, seed: int):
    """(seconds to the first committed block, reply text, usage, server stats) of a
    streamed chat request."""
    t0 = time.perf_counter()
    first, text, usage, stats = None, [], None, {}
    for ch in client.chat.completions.create(model="bench", messages=messages, max_tokens=max_tokens, seed=seed,
                                             stream=True, stream_options={"include_usage": True}):
        if ch.choices and ch.choices[0].delta.content is not None and ch.choices[0].delta.role is None:
            if first is None:
                first = time.perf_counter() - t0
            text.append(ch.choices[0].delta.content)
        if ch.usage:
            usage = ch.usage
            stats = (ch.model_extra or {}).get("x_stats") or {}
    return first, "".join(text), usage, stats


def bench_reuse(model: Path, system_tokens: int, canvas: int, repeats: int) -> List[dict]:
    rows = []
    for label, extra in (("reuse", []), ("no reuse", ["--cache-size-gb", "0"])):
        srv = Server(model, *extra)
        try:
            times, cached, prefill = [], [], []
            for rep in range(repeats):
                msgs = [{"role": "system", "content": text_of_tokens(system_tokens, rep)}]
                for turn in range(3):
                    msgs.append({"role": "user", "content": f"Question {turn + 1} of run {rep}?"})
                    t, reply, usage, stats = ttfb(srv.client, msgs, canvas, seed=turn)
                    msgs.append({"role": "assistant", "content": reply})
                times.append(t)
                cached.append(usage.prompt_tokens_details.cached_tokens)
                prefill.append(stats.get("prefill_s", float("nan")))
            rows.append({"bench": "turn3_ttfb", "mode": label, "prompt_tokens": usage.prompt_tokens,
                         "cached_tokens": cached[-1], "ttfb_s": sorted(times)[len(times) // 2], "all_s": times,
                         "prefill_s": sorted(prefill)[len(prefill) // 2]})
            print(json.dumps(rows[-1]), flush=True)
        finally:
            srv.close()
    return rows


AGENT_TOOLS = [
    {"type": "function", "function": {"name": name, "description": desc, "parameters": {
        "type": "object", "properties": {arg: {"type": "string", "description": f"the {arg}"}}, "required": [arg]}}}
    for name, desc, arg in (("read_file", "Read a file of the repository", "path"),
                            ("run_tests", "Run the test suite and return its output", "selector"),
                            ("search", "Search the repository for a string", "query"))
]


def bench_agent(model: Path, context_tokens: int, canvas: int, modes: List[str]) -> List[dict]:
    """Turn 1 and turn 2 of a tool-using conversation of ``context_tokens`` tokens."""
    rows = []
    for label in modes:
        srv = Server(model, *([] if label == "reuse" else ["--cache-size-gb", "0"]))
        try:
            system = {"role": "system", "content": text_of_tokens(context_tokens - 600, 1)}
            msgs = [system, {"role": "user", "content": "Why does the build fail? Look at src/main.py."}]
            for turn in (1, 2):
                if turn == 2:
                    msgs += [{"role": "assistant", "content": None, "tool_calls": [
                        {"id": "call_1", "type": "function",
                         "function": {"name": "read_file", "arguments": json.dumps({"path": "src/main.py"})}}]},
                        {"role": "tool", "tool_call_id": "call_1", "content": text_of_tokens(200, 2)}]
                t0 = time.perf_counter()
                first, usage, stats = None, None, {}
                for ch in srv.client.chat.completions.create(
                        model="bench", messages=msgs, tools=AGENT_TOOLS, max_tokens=canvas, seed=turn, stream=True,
                        stream_options={"include_usage": True}):
                    if first is None and ch.choices and ch.choices[0].delta.role is None:
                        first = time.perf_counter() - t0
                    if ch.usage:
                        usage, stats = ch.usage, (ch.model_extra or {}).get("x_stats") or {}
                cached = usage.prompt_tokens_details.cached_tokens
                rows.append({"bench": "agent", "mode": label, "turn": turn, "prompt_tokens": usage.prompt_tokens,
                             "cached_tokens": cached, "encoded_tokens": usage.prompt_tokens - cached,
                             "prefill_s": stats.get("prefill_s"), "ttfb_s": first,
                             "passes": stats.get("decoder_passes")})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            srv.close()
    return rows


def bench_throughput(model: Path, max_tokens: int, levels: List[int], total: int) -> List[dict]:
    rows = []
    srv = Server(model, "--max-batch", str(max(levels)), "--cache-size-gb", "0")
    try:
        # warm-up (compiles, allocates)
        srv.client.completions.create(model="bench", prompt=[2, 10, 11], max_tokens=8, seed=0)
        for c in levels:
            before = srv.health()["rows_per_pass"]
            results = [None] * total

            def one(i):
                prompt = [2] + [20 + (i * 7 + j) % 200 for j in range(64 + 16 * i)]
                r = srv.client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, seed=i)
                results[i] = r.usage.completion_tokens

            t0 = time.perf_counter()
            for wave in range(0, total, c):
                ths = [threading.Thread(target=one, args=(i,)) for i in range(wave, min(wave + c, total))]
                for th in ths:
                    th.start()
                for th in ths:
                    th.join()
            wall = time.perf_counter() - t0
            after = srv.health()["rows_per_pass"]
            passes = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            rows.append({"bench": "throughput", "concurrency": c, "requests": total, "tokens": sum(results),
                         "wall_s": wall, "tok_s": sum(results) / wall,
                         "rows_per_pass": {k: v for k, v in passes.items() if v}})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        srv.close()
    return rows


def bench_prefill(lengths: List[int], chunk: int, config: str) -> List[dict]:
    import mlx.core as mx
    import numpy as np

    from mlx_dgemma.config import ModelArgs
    from mlx_dgemma import backend
    from mlx_dgemma.model import Model
    from mlx_dgemma.serving.scheduler import prefill

    text, canvas = CONFIGS[config]
    model = Model(ModelArgs.from_config({"model_type": "diffusion_gemma", "canvas_length": canvas,
                                         "text_config": {"model_type": "diffusion_gemma_text", **text}}))
    mx.eval(model.parameters())
    backend.defaults(model)
    rows = []
    prefill(model, model.make_cache(), np.arange(3, 3 + min(chunk, 256)) % text["vocab_size"], chunk)  # warm-up
    for n in lengths:
        toks = np.random.default_rng(n).integers(3, text["vocab_size"], n)
        cache = model.make_cache()
        mx.clear_cache()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        prefill(model, cache, toks, chunk)
        dt = time.perf_counter() - t0
        kept = {"full": [], "sliding": []}
        for i, c in enumerate(cache):
            kept["full" if model.args.is_full(i) else "sliding"].append(c.prefix()[0].shape[2])
        rows.append({"bench": "prefill", "config": config, "tokens": n, "chunk": chunk, "s": dt, "tok_s": n / dt,
                     "peak_mb": mx.get_peak_memory() / 2**20, "cache_mb": cache.nbytes / 2**20,
                     "kept_full": kept["full"][0], "kept_sliding": kept["sliding"][0]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_passes(config: str, levels: List[int], repeats: int = 3) -> List[dict]:
    """One decoder pass (and one whole scheduler step: pass + per-row sampling) for B
    rows with ragged prefixes, in this process: does a batched pass cost less than B
    single ones on this machine?"""
    import mlx.core as mx
    import numpy as np

    from mlx_dgemma.config import ModelArgs
    from mlx_dgemma import backend
    from mlx_dgemma.model import Model

    text, canvas = CONFIGS[config]
    model = Model(ModelArgs.from_config({"model_type": "diffusion_gemma", "canvas_length": canvas,
                                         "text_config": {"model_type": "diffusion_gemma_text", **text}}))
    mx.eval(model.parameters())
    backend.defaults(model)
    V = text["vocab_size"]
    caches = []
    for i in range(max(levels)):
        c = model.make_cache()
        model.encode(mx.array(np.random.default_rng(i).integers(3, V, (1, 200 + 100 * i)).astype(np.int32)), c)
        mx.eval([x.state for x in c])
        caches.append(c)
    rows = []
    for B in levels:
        canvas_ = mx.array(np.random.default_rng(9).integers(0, V, (B, canvas)).astype(np.int32))
        cache = caches[0] if B == 1 else caches[:B]
        mx.eval(model.denoise(canvas_, cache))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            mx.eval(model.denoise(canvas_, cache))
            times.append(time.perf_counter() - t0)
        t = sorted(times)[len(times) // 2]
        rows.append({"bench": "pass", "config": config, "rows": B, "pass_s": t, "per_row_s": t / B})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: List[dict]) -> str:
    out = []
    for r in rows:
        if r["bench"] == "agent":
            out.append(f"| {r['mode']} | turn {r['turn']} | {r['prompt_tokens']:,} | {r['cached_tokens']:,} "
                       f"| {r['encoded_tokens']:,} | {r['prefill_s']:.2f} s | {r['ttfb_s']:.1f} s |")
        elif r["bench"] == "turn3_ttfb":
            out.append(f"| turn 3, {r['mode']} | {r['prompt_tokens']} prompt tokens, {r['cached_tokens']} cached "
                       f"| prefill {r['prefill_s']:.2f} s | time to first block {r['ttfb_s']:.2f} s |")
        elif r["bench"] == "throughput":
            out.append(f"| {r['concurrency']} concurrent | {r['tokens']} tokens in {r['wall_s']:.1f} s "
                       f"| {r['tok_s']:.1f} tok/s | rows per pass {r['rows_per_pass']} |")
        elif r["bench"] == "pass":
            out.append(f"| decoder pass, {r['rows']} rows ({r['config']}) | {r['pass_s'] * 1000:.0f} ms "
                       f"| {r['per_row_s'] * 1000:.0f} ms per row |")
        elif r["bench"] == "prefill":
            out.append(f"| prefill {r['tokens']} ({r['config']}, chunk {r['chunk']}) | {r['tok_s']:.0f} tok/s "
                       f"| peak {r['peak_mb']:.0f} MiB | cache {r['cache_mb']:.1f} MiB "
                       f"(full layers {r['kept_full']} tokens, sliding {r['kept_sliding']}) |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["reuse", "throughput", "passes", "prefill", "agent", "all"])
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: build a random one)")
    ap.add_argument("--config", default="small", choices=sorted(CONFIGS))
    ap.add_argument("--steps", type=int, default=16, help="denoising steps per block for the built model")
    ap.add_argument("--system-tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--prefill-config", default="tiny", choices=sorted(CONFIGS))
    ap.add_argument("--context-tokens", type=int, default=65536)
    ap.add_argument("--modes", nargs="+", default=["reuse", "no reuse"], choices=["reuse", "no reuse"])
    ap.add_argument("--out", type=Path, default=None, help="also write the rows here (JSON)")
    args = ap.parse_args(argv)
    if args.what in ("prefill", "passes", "all"):
        if OPENBLAS not in os.environ.get("LD_PRELOAD", "") and os.path.exists(OPENBLAS):
            os.execve(sys.executable, [sys.executable, *sys.argv], env())
    rows: List[dict] = []
    tmp = None
    model = args.model
    canvas = CONFIGS[args.config][1]
    if args.what in ("reuse", "throughput", "agent", "all") and model is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench-server-"))
        model = build_model(tmp / args.config, args.config, args.steps)
    if model is not None and (Path(model) / "config.json").exists():
        canvas = json.loads((Path(model) / "config.json").read_text()).get("canvas_length", canvas)
    if args.what in ("reuse", "all"):
        rows += bench_reuse(model, args.system_tokens, canvas, args.repeats)
    if args.what in ("throughput", "all"):
        rows += bench_throughput(model, args.max_tokens, args.levels, args.requests)
    if args.what in ("passes", "all"):
        rows += bench_passes(args.config, args.levels)
    if args.what in ("prefill", "all"):
        rows += bench_prefill(args.lengths, args.chunk, args.prefill_config)
    if args.what in ("agent", "all"):
        rows += bench_agent(model, args.context_tokens, canvas, args.modes)
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
