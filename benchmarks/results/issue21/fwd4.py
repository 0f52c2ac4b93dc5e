import sys, time, statistics
tree, P, bits = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _setup import build, import_tree, prime
mlx_dgemma = import_tree(tree)
import mlx.core as mx
model = build(mlx_dgemma, bits)
canvas, c, logits, sc = prime(model, P)
for _ in range(3): mx.eval(model.denoise(canvas, c, self_conditioning_embeddings=sc))
f = []
for _ in range(int(sys.argv[4]) if len(sys.argv) > 4 else 25):
    t = time.perf_counter(); mx.eval(model.denoise(canvas, c, self_conditioning_embeddings=sc)); f.append(time.perf_counter() - t)
assert mlx_dgemma.__file__.startswith(tree)
print("RESULT", tree.split('/')[-1], P, bits, "forward", round(1000 * statistics.median(f), 1), "min", round(1000*min(f),1))
