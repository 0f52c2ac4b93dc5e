import sys, time, statistics
sys.path.insert(0, sys.argv[1])
import mlx_dgemma
import mlx.core as mx, numpy as np
from mlx_dgemma import load_model
model, _ = load_model("/tmp/mlx_dgemma_bench/mid")
V, L = model.args.vocab_size, model.args.canvas_length
P = int(sys.argv[2])
prompt = mx.array(np.random.RandomState(0).randint(3, V, (1, P)))
canvas = mx.array(np.random.RandomState(1).randint(3, V, (1, L)))
c = model.make_cache(); model.encode(prompt, c); mx.eval([x.state for x in c])
logits = model.denoise(canvas, c); sc = model.soft_embeddings(mx.softmax(logits, -1)); mx.eval(sc)
for _ in range(2): mx.eval(model.denoise(canvas, c, self_conditioning_embeddings=sc))
f = []
for _ in range(10):
    t = time.perf_counter(); mx.eval(model.denoise(canvas, c, self_conditioning_embeddings=sc)); f.append(time.perf_counter() - t)
b = []
for _ in range(15):
    c2 = c.copy(); t = time.perf_counter(); model.encode(canvas, c2); mx.eval([x.state for x in c2]); b.append(time.perf_counter() - t)
print(sys.argv[1].split('/')[-1], P, "forward", round(1000 * statistics.median(f), 1), "block", round(1000 * statistics.median(b), 1))
