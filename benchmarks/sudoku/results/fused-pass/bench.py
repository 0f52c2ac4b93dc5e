"""Tried and not kept (session 15): the objective with the encoder and pass 2 in one sequence per
layer (NeMo's layout: the clean sequence, then the canvas; a block mask), against the trainer's
objective. Pass 1 (self-conditioning, the heads rows, no gradient) needs the encoder's K/V before
pass 2 runs, so it runs fused too, over the prompt's span and the canvas. Prints the loss, its
parts and the largest gradient difference on three batches, then the compiled value-and-gradient
of one process's batch of 8 (6 layers), interleaved rounds.

    python benchmarks/sudoku/bench_step.py --batches 16 --iters 4 --no-torch   # makes WORK (init-0, train.jsonl)
    OPENBLAS_NUM_THREADS=1 LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python benchmarks/sudoku/results/fused-pass/bench.py 4            # SPLIT=1: attention per part
"""
import os, sys, time, statistics
from pathlib import Path as _P
sys.path.insert(0, str(_P(__file__).resolve().parents[4]))
import mlx_dgemma  # noqa
import mlx.core as mx, mlx.nn as nn
from pathlib import Path
from mlx_dgemma import load, backend, fastmath
from mlx_dgemma.tuner import setup_fine_tuning, TrainingArgs
from mlx_dgemma.tuner.datasets import load_split, make_batch
from mlx_dgemma.tuner.trainer import batch_spec
from mlx_dgemma.tuner.objective import objective, prepare_for_training, signal_of, prefix_span, Loss

W = Path(os.environ.get("WORK", "/tmp/sudoku-bench-step"))
SPLIT = os.environ.get("SPLIT") == "1"
model, tok = load(W / "init-0")
setup_fine_tuning(model, "full")
backend.configure(model, experts="blocked")
prepare_for_training(model)
data = load_split(W / "train.jsonl", tok)
spec = batch_spec(model, TrainingArgs(pad_to=1, corrupt_only_free=False))


def fused_layers(model, h, T, starts, mask_full, mask_sliding):
    """h [B, T + L, D]: the encoder's positions 0..T-1, then the canvas at starts.."""
    S = h.shape[1]
    enc_pos = mx.arange(S) < T
    for i, layer in enumerate(model.layers):
        a = layer.self_attn
        x = layer.input_layernorm(h)
        B = x.shape[0]
        q = a.q_norm(a.q_proj(x).reshape(B, S, a.n_heads, a.head_dim)).transpose(0, 2, 1, 3)
        k = a.k_proj(x).reshape(B, S, a.n_kv_heads, a.head_dim)
        v = a.v_proj(x).reshape(B, S, a.n_kv_heads, a.head_dim) if not a.is_full else k
        k = a.k_norm(k).transpose(0, 2, 1, 3)
        v = a.v_norm(v).transpose(0, 2, 1, 3)
        q = mx.concatenate([a.rope(q[:, :, :T], offset=0), a.rope(q[:, :, T:], offset=starts)], axis=2)
        k = mx.concatenate([a.rope(k[:, :, :T], offset=0), a.rope(k[:, :, T:], offset=starts)], axis=2)
        mask = mask_full if a.is_full else mask_sliding
        if SPLIT:
            oe = mx.fast.scaled_dot_product_attention(q[:, :, :T], k[:, :, :T], v[:, :, :T], scale=1.0, mask="causal")
            od = mx.fast.scaled_dot_product_attention(q[:, :, T:], k, v, scale=1.0, mask=mask[:, :, T:])
            o = mx.concatenate([oe, od], axis=2)
        else:
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
        o = a.o_proj(o.transpose(0, 2, 1, 3).reshape(B, S, -1))
        hh = h + layer.post_attention_layernorm(o)
        dense = layer.post_feedforward_layernorm_1(layer.mlp(layer.pre_feedforward_layernorm(hh)))
        idx, w = layer.router(hh)
        moe = layer.post_feedforward_layernorm_2(layer.experts(layer.pre_feedforward_layernorm_2(hh), idx, w))
        out = hh + layer.post_feedforward_layernorm(dense + moe)
        scal = mx.where(enc_pos[None, :, None], layer.encoder_layer_scalar, layer.layer_scalar)
        h = out * scal
    return h


def fused_masks(model, T, L, starts):
    S = T + L
    q = mx.arange(S)[:, None]
    k = mx.arange(S)[None]
    W = model.args.sliding_window
    enc_full = (k <= q) & (q < T)
    enc_sl = enc_full & (k > q - W)
    s = starts[:, None, None]
    canvas_q = (q >= T)[None]
    dec_full = canvas_q & (((k < T)[None] & (k[None] < s)) | (k >= T)[None])
    dec_sl = canvas_q & (((k < T)[None] & (k[None] < s) & (k[None] >= s - (W - 1))) | (k >= T)[None])
    return ((enc_full[None] | dec_full)[:, None], (enc_sl[None] | dec_sl)[:, None])


def fused_objective(model, batch, span):
    tokens, starts_p, lengths = batch["tokens"], batch["prompt_lengths"], batch["lengths"]
    corrupt, noise = batch["corrupt"], batch["noise"]
    B, T = tokens.shape
    L = corrupt.shape[1]
    starts = starts_p + batch["blocks"] * L
    positions = starts[:, None] + mx.arange(L)[None]
    clean = mx.take_along_axis(tokens, mx.minimum(positions, T - 1), axis=1)
    canvas = mx.where(corrupt, noise, clean)
    rows = batch["self_conditioned"]
    # pass 1: the encoder over the span and the canvas, heads rows only, no gradient
    r_starts = starts[rows]
    mf, ms = fused_masks(model, span, L, r_starts)
    h = mx.concatenate([model.embed(tokens[rows, :span]), model.decoder.self_conditioning(model.embed(canvas[rows]), None)], axis=1)
    h = fused_layers(model, h, span, r_starts, mf, ms)
    first = mx.stop_gradient(model.lm_head(model.decoder.norm(h[:, span:])))
    part = signal_of(model, first)
    heads = batch["self_condition"]
    slot = mx.where(heads, mx.cumsum(heads.astype(mx.int32)) - 1, rows.size)
    signal = mx.concatenate([part, mx.zeros((1,) + part.shape[1:], part.dtype)])[slot]
    # the encoder and pass 2 in one sequence
    mf, ms = fused_masks(model, T, L, starts)
    h = mx.concatenate([model.embed(tokens), model.decoder.self_conditioning(model.embed(canvas), signal)], axis=1)
    h = fused_layers(model, h, T, starts, mf, ms)
    logits = model.lm_head(model.decoder.norm(h))
    enc_logits, dec_logits = logits[:, :T], logits[:, T:]
    valid = mx.arange(1, T)[None] < lengths[:, None]
    enc_ce = fastmath.cross_entropy(enc_logits[:, :-1], tokens[:, 1:]) * valid
    scored = positions < lengths[:, None]
    diff_ce = fastmath.cross_entropy(dec_logits, clean) * scored
    loss = diff_ce.sum() / mx.maximum(scored.sum(), 1) + enc_ce.sum() / mx.maximum(valid.sum(), 1)
    return Loss(loss, diff_ce.sum(), enc_ce.sum(), scored.sum(), valid.sum())


def make(it, n=8):
    ids = list(range(it * n, (it + 1) * n))
    return make_batch([data[i] for i in ids], ids, it, spec, [data[i] for i in ids])


def vg(fn):
    def lf(model, batch, span):
        out = fn(model, batch, span)
        return out.loss, mx.stack([out.diffusion, out.encoder])
    g = nn.value_and_grad(model, lf)
    state = [model.state]
    return mx.compile(lambda b, span: g(model, b, span), inputs=state, outputs=state)


cur = vg(lambda m, b, s: objective(m, b, 1.0, True, None, False, s))
fus = vg(fused_objective)

# exactness on a few batches
for it in range(3):
    b = make(it)
    span = prefix_span(b)
    (l1, p1), g1 = cur(b, span)
    (l2, p2), g2 = fus(b, span)
    from mlx.utils import tree_flatten
    d = max(float(mx.abs(x - y).max()) for (_, x), (_, y) in zip(tree_flatten(g1), tree_flatten(g2)))
    print("loss", float(l1), float(l2), "parts", p1.tolist(), p2.tolist(), "max grad diff", d, flush=True)

# timing: interleaved rounds; each round the same 6 batches through each
batches = [make(it) for it in range(10, 16)]
spans = [prefix_span(b) for b in batches]
for fn in (cur, fus):  # warm (each heads count compiles once)
    for b, s in zip(batches, spans):
        mx.eval(fn(b, s))
res = {"current": [], "fused": []}
for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 4):
    for name, fn in (("current", cur), ("fused", fus)) if r % 2 == 0 else (("fused", fus), ("current", cur)):
        t = time.perf_counter()
        for b, s in zip(batches, spans):
            mx.eval(fn(b, s))
        res[name].append((time.perf_counter() - t) / len(batches) * 1000)
for k, v in res.items():
    print(k, "ms per batch of 8:", [round(x) for x in v], "median", round(statistics.median(v)))
