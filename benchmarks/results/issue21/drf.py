import sys, time, statistics, os
tree = sys.argv[1]
sys.path.insert(0, tree); sys.path.insert(0, tree + "/benchmarks")
import mlx_dgemma, mlx.core as mx, numpy as np
from mlx_dgemma import load_model, rng
from common import quantize, temperature
from mlx_dgemma.drafter import DenoiseSettings, entropy_bound_mask, self_conditioning
from mlx_dgemma.kernels import sample_step as sample_fn
model, _ = load_model("/tmp/mlx_dgemma_bench/mid")
quantize(model, 4, 64)
if os.path.exists(tree + "/mlx_dgemma/backend.py"):
    from mlx_dgemma import backend; backend.defaults(model)
mx.eval(model.parameters())
V, L = model.args.vocab_size, model.args.canvas_length
prompt = mx.array(np.random.RandomState(0).randint(3, V, (1, 2048)))
canvas = mx.array(np.random.RandomState(1).randint(3, V, (1, L)))
c = model.make_cache(); model.encode(prompt, c); mx.eval([x.state for x in c])
logits = model.denoise(canvas, c); mx.eval(logits)
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
