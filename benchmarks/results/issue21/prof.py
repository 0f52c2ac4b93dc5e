import sys, time, statistics, os
tree, P, bits = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _setup import build, import_tree, prime
mlx_dgemma = import_tree(tree)
import mlx.core as mx, numpy as np
model = build(mlx_dgemma, bits)
L = model.args.canvas_length
canvas, c, logits, sc = prime(model, P)
step = model.decoder_step(c, 1, L)
emb = model._embed(canvas) if hasattr(model, "_embed") else model.embed(canvas)
R = 20
def t(f):
    for _ in range(3): mx.eval(f())
    ts = []
    for _ in range(R):
        a = time.perf_counter(); mx.eval(f()); ts.append(time.perf_counter() - a)
    return statistics.median(ts) * 1000
tot = {}
cnt = []
try:
    from mlx_dgemma.backend import grouped_switch_glu as gsg
except ImportError:
    from mlx_dgemma.model import grouped_switch_glu as gsg
def add(k, v): tot[k] = tot.get(k, 0) + v
h = model.decoder.self_conditioning(emb, sc); mx.eval(h)
add("selfcond", t(lambda: model.decoder.self_conditioning(emb, sc)))
for layer, (pk, pv, mask) in zip(model.layers, step.prefixes):
    x = layer.input_layernorm(h); mx.eval(x)
    add("attn", t(lambda: layer.self_attn(x, (pk, pv), step.offset, mask, False)))
    add("mlp", t(lambda: layer.mlp(x)))
    add("router", t(lambda: layer.router(x)))
    idx, w = layer.router(x); mx.eval(idx, w)
    add("experts", t(lambda: layer.experts(x, idx, w)))
    add("gsg", t(lambda: gsg(layer.experts.switch_glu, x, idx, True)))
    cnt.append(np.bincount(np.array(idx).ravel(), minlength=32).max())
    add("norms", t(lambda: layer.post_feedforward_layernorm(layer.pre_feedforward_layernorm(x))))
    h = layer(h, (pk, pv), step.offset, mask, False); mx.eval(h)
hn = model.decoder.norm(h); mx.eval(hn)
add("head", t(lambda: model.lm_head(hn)))
add("full", t(lambda: model.denoise(canvas, c, self_conditioning_embeddings=sc)))
add("soft_emb", t(lambda: model.soft_embeddings(mx.softmax(logits, -1))))
print("CHK", float(mx.abs(hn).sum()), cnt)
print("PROF", tree.split('/')[-1], {k: round(v, 1) for k, v in tot.items()}, "sum", round(sum(v for k, v in tot.items() if k not in ("full", "soft_emb")), 1))
