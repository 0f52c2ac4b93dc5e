"""Where our denoising step's time goes, and A/B of the decoder's speed switches.

    python benchmarks/breakdown.py --config mid [--prompt 64] [--bits 4]
    python benchmarks/breakdown.py --config mid --ab compile,experts=gather:grouped

Uses the checkpoint ``run.py`` built (``--work``, default /tmp/mlx_dgemma_bench). Each
part is timed alone (inputs evaluated first, output evaluated), median of ``--repeats``
after warm-up. ``--ab`` times whole steps with each switch off and on, interleaved
(off, on, off, on, ...) so that a shared machine's load drifts over both equally.
Run it with OpenBLAS preloaded on Linux (see README).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fixed_canvas, prompt_tokens, quantize, temperature  # noqa: E402

import mlx_dgemma  # noqa: E402,F401  (first: it loads OpenBLAS before mlx.core, see mlx_dgemma/runtime.py)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_dgemma import backend, load_model, rng  # noqa: E402
from mlx_dgemma.model import decoder_prefixes  # noqa: E402
from mlx_dgemma.sampling import probabilities, sample_step_mlx  # noqa: E402


def entropy_bound_mask(entropy, bound):
    order = mx.argsort(entropy, axis=-1)
    s = mx.take_along_axis(entropy, order, axis=-1)
    sel = (mx.cumsum(s, axis=-1) - s) <= bound
    return mx.put_along_axis(mx.zeros(sel.shape, dtype=mx.bool_), order, sel, axis=-1)


def timed(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        mx.eval(fn())
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(fn())
        ts.append(time.perf_counter() - t)
    return 1000 * statistics.median(ts)


def setup(args):
    model, _ = load_model(Path(args.work) / args.config)
    if args.bits:
        quantize(model, args.bits, 32 if args.config == "tiny" else 64)
        backend.defaults(model)  # the backend's paths for the now quantized layers
    mx.eval(model.parameters())
    V, L = model.args.vocab_size, model.args.canvas_length
    cache = model.make_cache()
    model.encode(mx.array(prompt_tokens(args.prompt, V))[None], cache)
    mx.eval([c.state for c in cache])
    canvas = mx.array(fixed_canvas(L, V))
    logits = model.denoise(canvas, cache)
    temp = temperature(10, 48)
    s = sample_step_mlx(logits, temp, rng.position_keys([0], rng.SAMPLE, 0, 10, L))
    sc = model.soft_embeddings(probabilities(logits, temp, s.lse))
    mx.eval(logits, sc)
    return model, cache, canvas, logits, sc


def parts(args) -> dict:
    model, cache, canvas, logits, sc = setup(args)
    a = model.args
    V, L, R = a.vocab_size, a.canvas_length, args.repeats
    out = {}
    backend.configure(model, compile=False)  # parts are timed eagerly; the whole step both ways
    out["step forward (defaults)"] = timed(lambda: model.denoise(canvas, cache, self_conditioning_embeddings=sc), R)
    # compiling needs the traceable paths: gather_mm experts, MLX softcap
    saved = backend.settings(model)
    backend.configure(model, experts="gather", attention=False, host_softcap=False, dequantize=False, compile=True)
    out["step forward (compiled, gather experts, MLX softcap)"] = timed(
        lambda: model.denoise(canvas, cache, self_conditioning_embeddings=sc), R)
    backend.configure(model, compile=False)
    backend.configure(model, **{**saved, "compile": False})

    dec = model.decoder
    out["embed + self-conditioning MLP"] = timed(lambda: dec.self_conditioning(model.embed(canvas), sc), R)
    prefixes, offset = decoder_prefixes(cache, 1, L)
    h = dec.self_conditioning(model.embed(canvas), sc)
    mx.eval(h)
    seen = set()
    for i, (layer, (pk, pv, mask)) in enumerate(zip(model.layers, prefixes)):
        kind = "full" if a.is_full(i) else "sliding"
        n = sum(1 for j in range(a.num_hidden_layers) if a.is_full(j) == a.is_full(i))
        if kind in seen:
            continue
        seen.add(kind)
        hn = layer.input_layernorm(h)
        mx.eval(hn)
        att = timed(lambda: layer.self_attn(hn, (pk, pv), offset, mask, False), R)
        idx, w = layer.router(h)
        x2 = layer.pre_feedforward_layernorm_2(h)
        x1 = layer.pre_feedforward_layernorm(h)
        mx.eval(idx, w, x1, x2)
        rt = timed(lambda: layer.router(h), R)
        ex = timed(lambda: layer.experts(x2, idx, w), R)
        mlp = timed(lambda: layer.mlp(x1), R)
        whole = timed(lambda: layer(h, (pk, pv), offset, mask, False), R)
        out[f"{kind} layer x{n}: attention"] = att * n
        out[f"{kind} layer x{n}: router"] = rt * n
        out[f"{kind} layer x{n}: experts"] = ex * n
        out[f"{kind} layer x{n}: dense MLP"] = mlp * n
        out[f"{kind} layer x{n}: norms, residuals"] = max(0.0, whole - att - rt - ex - mlp) * n
    hf = model.hidden(canvas, cache, self_conditioning_embeddings=sc)
    mx.eval(hf)
    emb = dec.embed_tokens
    out["LM head matmul"] = timed(lambda: emb.as_linear(hf), R)
    raw = emb.as_linear(hf).astype(mx.float32)
    mx.eval(raw)
    out["LM head softcap"] = timed(lambda: model.lm_head(hf), R) - out["LM head matmul"]

    n = 10
    temp = temperature(n, 48)
    keys = rng.position_keys([0], rng.SAMPLE, 0, n, L)
    x = logits / temp
    mx.eval(x)
    from mlx_dgemma import kernels

    out[f"drafter: kernels.sample_step ({kernels.backend()}; cpu: + SC probabilities, one pass)"] = timed(
        lambda: kernels.sample_step(logits, temp, keys), R)
    out["drafter: sample_step_mlx (t, lse, entropy, argmax, gumbel sample)"] = timed(
        lambda: sample_step_mlx(logits, temp, keys), R)
    out["  of which gumbel noise"] = timed(lambda: rng.gumbel(keys, V), R)
    s = sample_step_mlx(logits, temp, keys)
    mx.eval(*s)
    rk = rng.position_keys([0], rng.RENOISE, 0, n, L)
    out["drafter: acceptance + renoise"] = timed(
        lambda: mx.where(entropy_bound_mask(s.entropy, 0.1), s.sampled, rng.random_tokens(rk, V)), R)
    out["drafter: self-conditioning probabilities"] = timed(lambda: probabilities(logits, temp, s.lse), R)
    p = probabilities(logits, temp, s.lse)
    mx.eval(p)
    out["drafter: self-conditioning matmul (probs @ E)"] = timed(lambda: model.soft_embeddings(p), R)
    return out


def vocab_passes() -> list:
    """Element-wise passes over [B, L, V] tensors in one step, from the code (not traced).

    (op, reads, writes, transcendental functions per element)."""
    return [
        ("LM head matmul (output)", 0, 1, 0),
        ("softcap tanh(x/30)*30 (compiled, fused)", 1, 1, 1),
        ("sample_step: x = logits / t", 1, 1, 0),
        ("sample_step: logsumexp(x)", 1, 0, 1),
        ("sample_step: p = exp(x - lse)", 1, 1, 1),
        ("sample_step: entropy sum(p * x)", 2, 0, 0),
        ("sample_step: argmax(x)", 1, 0, 0),
        ("gumbel: token hash (xor + lowbias32: 8 integer ops, eager)", 8, 8, 0),
        ("gumbel: uniform from bits (4 ops, eager)", 4, 4, 0),
        ("gumbel: -log(-log(u)) (4 ops, eager)", 4, 4, 2),
        ("sample: argmax(x + g)", 2, 1, 0),
        ("probabilities: exp(logits / t - lse) (3 ops)", 3, 3, 1),
        ("self-conditioning matmul (input)", 1, 0, 0),
    ]


def ab(args) -> dict:
    model, cache, canvas, logits, sc = setup(args)
    res = {}
    for spec in [s for s in args.ab.split(",") if s]:
        # "name" toggles a bool switch; "name=a:b" compares two values
        sw, _, vals = spec.partition("=")
        a_val, b_val = vals.split(":") if vals else (False, True)
        base = backend.settings(model)[sw]
        times = {a_val: [], b_val: []}
        fn = lambda: model.denoise(canvas, cache, self_conditioning_embeddings=sc)  # noqa: E731
        for v in times:  # warm both (compiles happen here)
            backend.configure(model, **{sw: v})
            mx.eval(fn())
        for _ in range(args.repeats):
            for v in times:
                backend.configure(model, **{sw: v})
                t = time.perf_counter()
                mx.eval(fn())
                times[v].append(time.perf_counter() - t)
        backend.configure(model, **{sw: base})
        a_ms, b_ms = (1000 * statistics.median(times[k]) for k in (a_val, b_val))
        res[sw] = {"a": str(a_val), "b": str(b_val), "a_ms": round(a_ms, 1), "b_ms": round(b_ms, 1),
                   "b/a": round(b_ms / a_ms, 3)}
    return res


def fused_drafter(logits, temp, keys):
    """What-if (not used by the package): the drafter's vocabulary work in one compiled
    pass sharing one exp: lse, entropy and the self-conditioning probabilities from
    e = exp(x - max); the sample by the exponential race argmax(e / -log u), which picks
    the same token as Gumbel-max argmax(x - log(-log u)) with the same u."""
    x = logits / temp
    m = x.max(-1, keepdims=True)
    e = mx.exp(x - m)
    z = e.sum(-1, keepdims=True)
    lse = m + mx.log(z)
    p = e / z
    entropy = lse[..., 0] - (p * x).sum(-1)
    argmax = mx.argmax(x, axis=-1).astype(mx.int32)
    u = rng.uniform_from_bits(rng.token_bits(keys, x.shape[-1]))
    sampled = mx.argmax(e / -mx.log(u), axis=-1).astype(mx.int32)
    return sampled, argmax, entropy, lse[..., 0], p


def drafter_ab(args) -> dict:
    """Current drafter vocabulary work (sample_step_mlx + probabilities) vs fused_drafter."""
    model, cache, canvas, logits, sc = setup(args)
    L = model.args.canvas_length
    keys = rng.position_keys([0], rng.SAMPLE, 0, 10, L)
    temp = temperature(10, 48)
    compiled = mx.compile(fused_drafter)
    t_arr = mx.array(temp, dtype=mx.float32)

    def current():
        s = sample_step_mlx(logits, temp, keys)
        return (*s, probabilities(logits, temp, s.lse))

    a, b = current(), compiled(logits, t_arr, keys)
    mx.eval(a, b)
    same = {"sampled_equal": float((a[0] == b[0]).mean()), "argmax_equal": float((a[1] == b[1]).mean()),
            "entropy_max_diff": float(mx.abs(a[2] - b[2]).max()), "probs_max_diff": float(mx.abs(a[4] - b[4]).max())}
    times = {"current": [], "fused": []}
    for _ in range(args.repeats):
        for name, fn in (("current", current), ("fused", lambda: compiled(logits, t_arr, keys))):
            t = time.perf_counter()
            mx.eval(fn())
            times[name].append(1000 * (time.perf_counter() - t))
    return {**{k: round(statistics.median(v), 1) for k, v in times.items()}, **same}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="mid")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--bits", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--work", default="/tmp/mlx_dgemma_bench")
    p.add_argument("--ab", default="", help="backend.configure switches to A/B: name (bool) or name=a:b, comma separated")
    p.add_argument("--json", help="also write the numbers here")
    p.add_argument("--drafter-ab", action="store_true", help="current vs fused drafter vocabulary work")
    args = p.parse_args(argv)
    if args.drafter_ab:
        res = drafter_ab(args)
        print(res)
    elif args.ab:
        res = ab(args)
        for k, v in res.items():
            print(f"{k:18s} {v['a']:>8s} {v['a_ms']:9.1f} ms   {v['b']:>8s} {v['b_ms']:9.1f} ms   b/a {v['b/a']:.3f}")
    else:
        res = parts(args)
        for k, v in res.items():
            print(f"{k:64s} {v:9.1f} ms")
        rows = vocab_passes()
        print(f"\nPasses over [B, L, V] per step: {len(rows)} ops, "
              f"{sum(r[1] for r in rows)} reads, {sum(r[2] for r in rows)} writes, "
              f"{sum(r[3] for r in rows)} transcendentals per element")
        res = {"parts_ms": res, "vocab_passes": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
