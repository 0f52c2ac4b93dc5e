import sys, time, statistics
sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _setup import build, import_tree, prime
P = int(sys.argv[2])
mlx_dgemma = import_tree(sys.argv[1])  # first: it loads OpenBLAS before mlx.core
import mlx.core as mx
model = build(mlx_dgemma, 0)
canvas, c, logits, sc = prime(model, P)
for _ in range(2): mx.eval(model.denoise(canvas, c, self_conditioning_embeddings=sc))
f = []
for _ in range(10):
    t = time.perf_counter(); mx.eval(model.denoise(canvas, c, self_conditioning_embeddings=sc)); f.append(time.perf_counter() - t)
b = []
for _ in range(15):
    c2 = c.copy(); t = time.perf_counter(); model.encode(canvas, c2); mx.eval([x.state for x in c2]); b.append(time.perf_counter() - t)
print(sys.argv[1].split('/')[-1], P, "forward", round(1000 * statistics.median(f), 1), "block", round(1000 * statistics.median(b), 1))
