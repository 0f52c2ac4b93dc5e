import sys, time, statistics, os
tree = sys.argv[1]
sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _setup import build, import_tree, prime
mlx_dgemma = import_tree(tree)
import mlx.core as mx
from mlx_dgemma import rng
from mlx_dgemma.drafter import DenoiseSettings, self_conditioning
from mlx_dgemma.kernels import sample_step as sample_fn
model = build(mlx_dgemma, 4)
V, L = model.args.vocab_size, model.args.canvas_length
canvas, c, logits, _ = prime(model, 2048)
t = 0.7
def T(f, R=15):
    for _ in range(3): mx.eval(f())
    ts = []
    for _ in range(R):
        a = time.perf_counter(); r = f(); mx.eval(r); ts.append(time.perf_counter() - a)
    return round(statistics.median(ts) * 1000, 1)
keys = rng.position_keys([0], rng.SAMPLE, 0, 3, L)
s = sample_fn(logits, t, keys); mx.eval(s)
r = dict(sample=T(lambda: sample_fn(logits, t, keys)),
         selfcond=T(lambda: self_conditioning(model, logits, t, s, DenoiseSettings())),
         soft_emb=T(lambda: model.soft_embeddings(mx.softmax(logits, -1))),
         renoise=T(lambda: rng.random_tokens(rng.position_keys([0], rng.RENOISE, 0, 3, L), V)))
print("DRF", tree.split("/")[-1], r)
