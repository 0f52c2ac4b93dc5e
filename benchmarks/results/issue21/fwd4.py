import sys, time, statistics
tree, P, bits = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, tree); sys.path.insert(0, tree + "/benchmarks")
import mlx_dgemma
import mlx.core as mx, numpy as np
from mlx_dgemma import load_model
from common import quantize
model, _ = load_model("/tmp/mlx_dgemma_bench/mid")
if bits:
    quantize(model, bits, 64)
    import os
    if os.path.exists(tree + "/mlx_dgemma/backend.py"):
        from mlx_dgemma import backend
        assert backend.__file__.startswith(tree), backend.__file__
        backend.defaults(model)
mx.eval(model.parameters())
V, L = model.args.vocab_size, model.args.canvas_length
prompt = mx.array(np.random.RandomState(0).randint(3, V, (1, P)))
canvas = mx.array(np.random.RandomState(1).randint(3, V, (1, L)))
c = model.make_cache(); model.encode(prompt, c); mx.eval([x.state for x in c])
logits = model.denoise(canvas, c); sc = model.soft_embeddings(mx.softmax(logits, -1)); mx.eval(sc)
for _ in range(3): mx.eval(model.denoise(canvas, c, self_conditioning_embeddings=sc))
f = []
for _ in range(int(sys.argv[4]) if len(sys.argv) > 4 else 25):
    t = time.perf_counter(); mx.eval(model.denoise(canvas, c, self_conditioning_embeddings=sc)); f.append(time.perf_counter() - t)
assert mlx_dgemma.__file__.startswith(tree)
print("RESULT", tree.split('/')[-1], P, bits, "forward", round(1000 * statistics.median(f), 1), "min", round(1000*min(f),1))
