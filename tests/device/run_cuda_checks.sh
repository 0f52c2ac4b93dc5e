#!/usr/bin/env bash
# CUDA checks for the fused sampling kernel, on a machine with an NVIDIA GPU and MLX's CUDA
# build importable (mlx + mlx-cuda-13; see ../shared/device/prepare-mlx-cuda.sh for carrying
# the wheels to the lent GPU machine and installing them under /tmp/site).
#
#   bash tests/device/run_cuda_checks.sh [OUT_DIR]        # run in the project root
#
# 1. the CUDA kernel's own checks, without pytest (the device image may lack it):
#    self-check against the MLX path, real vocabulary, tails, ties, run-to-run determinism,
#    the drafter's committed block with the kernel vs the MLX path, the dispatch's choice;
# 2. tests/test_kernels.py under pytest when pytest is importable;
# 3. timing: kernel vs MLX path at [1, 256, 262144], and the drafter-step benchmark.
# Writes a summary to OUT_DIR (default $OUT or /tmp/cuda_checks), plus the CUDA source MLX
# generated (MLX_PTX_CACHE_DIR keeps the .cu next to the PTX).
set -uo pipefail
OUT_DIR=${1:-${OUT:-/tmp/cuda_checks}}
mkdir -p "$OUT_DIR"
export PYTHONPATH="${PYTHONPATH:-}:$PWD"
export MLX_PTX_CACHE_DIR="$OUT_DIR/ptx"
PY=${PYTHON:-python3}

if ! $PY -c "import mlx.core as mx, sys; sys.exit(0 if mx.cuda.is_available() else 1)"; then
  echo "MLX's CUDA backend is not available here (mlx.core.cuda.is_available() is False)" | tee "$OUT_DIR/summary.txt"
  exit 2
fi
# NVRTC needs the CUDA headers (cooperative_groups.h) under $CUDA_HOME/include; MLX looks at
# /usr/local/cuda when CUDA_HOME is unset. Use a pip-installed NVIDIA runtime's if need be.
if [ -z "${CUDA_HOME:-}" ] && [ ! -f /usr/local/cuda/include/cooperative_groups.h ]; then
  CUDA_HOME=$($PY - <<'PY'
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except ImportError:
    roots = []
for r in roots:
    for inc in sorted(glob.glob(os.path.join(r, "*", "include", "cooperative_groups.h"))):
        print(os.path.dirname(os.path.dirname(inc)))
        raise SystemExit
PY
)
  [ -n "$CUDA_HOME" ] && export CUDA_HOME && echo "CUDA_HOME=$CUDA_HOME (from the pip NVIDIA packages)"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT_DIR/gpu.txt"

status=0
echo "== 1. CUDA kernel checks" | tee "$OUT_DIR/summary.txt"
$PY - <<'PY' 2>&1 | tee -a "$OUT_DIR/summary.txt" || status=1
# Self-contained (no pytest, no torch): the device image may lack them.
import sys, time, traceback
import mlx.core as mx, numpy as np
from mlx_dgemma import Model, ModelArgs, kernels, rng
from mlx_dgemma.kernels import cuda
from mlx_dgemma.sampling import StepSample, sample_step_mlx

print("mlx", mx.__version__, "device", mx.default_device(), "cuda available", cuda.available())
failed = 0


def check(name, fn):
    global failed
    t0 = time.perf_counter()
    try:
        fn()
        print(f"PASS {name} ({time.perf_counter() - t0:.1f} s)")
    except Exception:
        failed += 1
        print(f"FAIL {name}")
        traceback.print_exc(limit=6)


def keys_for(B, L, seed):
    return rng.position_keys(list(range(seed, seed + B)), rng.SAMPLE, 0, 1, L)


def self_check():
    problem = kernels.self_check(cuda.make_sample_step())
    assert problem is None, problem


def against_mlx():
    fn = cuda.make_sample_step()
    for V, L in ((262144, 256), (262144, 8), (4099, 33), (5, 3)):
        x = np.random.RandomState(L).standard_normal((1 if L == 256 else 2, L, V)).astype(np.float32)
        x = np.tanh(x * 0.3) * 30  # soft-capped range
        logits, keys = mx.array(x), keys_for(x.shape[0], L, V)
        for t in (0.4, 0.8):
            a, b, w = fn(logits, t, keys), fn(logits, t, keys), sample_step_mlx(logits, t, keys)
            mx.eval(a, b, w)
            for f in StepSample._fields:  # run to run: bit for bit
                assert np.array_equal(np.array(getattr(a, f)), np.array(getattr(b, f))), f
            assert np.array_equal(np.array(a.argmax), np.array(w.argmax)), (V, L, t, "argmax")
            diff = np.array(a.sampled) != np.array(w.sampled)
            y = np.array(logits / t + rng.gumbel(keys, V)) if diff.any() else None
            for bb, ll in zip(*np.nonzero(diff)):  # only last-ulp near-ties may differ
                ya, yw = y[bb, ll, np.array(a.sampled)[bb, ll]], y[bb, ll, np.array(w.sampled)[bb, ll]]
                assert abs(ya - yw) <= 1e-5 * max(1.0, abs(yw)), (V, L, t, "sampled", bb, ll)
            lse = np.array(w.lse)
            np.testing.assert_allclose(np.array(a.lse), lse, rtol=1e-5, atol=1e-5)
            # the MLX path's float32 sums drift with V; the kernel must match float64 itself
            assert np.all(np.abs(np.array(a.entropy) - np.array(w.entropy)) <= 2e-4 + 2e-5 * np.abs(lse))
            z = x.astype(np.float64) / np.float64(np.float32(t))
            m = z.max(-1, keepdims=True)
            e = np.exp(z - m)
            s64 = e.sum(-1)
            h64 = np.log(s64) - (e * (z - m)).sum(-1) / s64
            err = np.abs(np.array(a.entropy) - h64)
            assert np.all(err <= 1e-5 + 1e-6 * np.abs(lse)), ("entropy vs float64", err.max())
            np.testing.assert_allclose(np.array(a.lse), m[..., 0] + np.log(s64), rtol=1e-6, atol=1e-6)
            print(f"   V={V} L={L} t={t}: sampled equal at {1 - diff.mean():.5f} of positions")
    x = np.zeros((1, 2, 300), np.float32)
    x[0, 0, [17, 3, 250]] = 9.0
    s = fn(mx.array(x), 0.5, keys_for(1, 2, 0))
    assert np.array(s.argmax).tolist() == [[3, 0]], np.array(s.argmax)


def drafter():
    from mlx_dgemma.drafter import DenoiseSettings, denoise_block
    args = ModelArgs(hidden_size=64, num_hidden_layers=2, intermediate_size=96, num_attention_heads=4,
                     head_dim=16, num_key_value_heads=2, full_head_dim=32, full_kv_heads=1,
                     vocab_size=4096, sliding_window=8, num_experts=4, top_k_experts=2,
                     moe_intermediate_size=32, canvas_length=64)
    mx.random.seed(0)
    model = Model(args)
    mx.eval(model.parameters())

    def run(fn):
        cache = model.make_cache()
        model.encode(mx.array([[2, 17, 33, 5, 80, 9]]), cache)
        drafts = []
        res = denoise_block(model, cache, DenoiseSettings(max_denoising_steps=16), [7, 8], 0,
                            on_draft=drafts.append, sample_fn=fn)
        return np.array(res.tokens), [np.array(d.tokens) for d in drafts]

    a, da = run(cuda.make_sample_step())
    b, db = run(sample_step_mlx)
    same_drafts = sum(np.array_equal(x, y) for x, y in zip(da, db))
    print(f"   {len(db)} steps; drafts equal at {same_drafts} of them")
    np.testing.assert_array_equal(a, b)


def dispatch():
    kernels.reset()
    assert kernels.backend() == "cuda", kernels.backend_reason()


check("self-check against the MLX path", self_check)
check("against the MLX path: real vocabulary, tails, ties, determinism", against_mlx)
check("drafter: same committed block as the MLX path", drafter)
check("dispatch picks cuda", dispatch)
print("backend:", kernels.backend(), "-", kernels.backend_reason())
sys.exit(1 if failed else 0)
PY

if $PY -c "import pytest" 2>/dev/null; then
  echo "== 2. pytest tests/test_kernels.py" | tee -a "$OUT_DIR/summary.txt"
  $PY -m pytest -q -rs tests/test_kernels.py 2>&1 | tail -25 | tee -a "$OUT_DIR/summary.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
  echo "== 2. pytest not installed here: skipped (section 1 ran the CUDA checks)" | tee -a "$OUT_DIR/summary.txt"
fi

echo "== 3. timing" | tee -a "$OUT_DIR/summary.txt"
$PY benchmarks/bench_drafter_step.py --runs 10 --warmup 3 --sc-dtype bfloat16 2>&1 | tee -a "$OUT_DIR/summary.txt" || status=1
$PY benchmarks/bench_drafter_step.py --runs 10 --warmup 3 --skip-sampling --sc-bits 4 2>&1 | tail -8 | tee -a "$OUT_DIR/summary.txt" || status=1
MLX_DGEMMA_SAMPLER=mlx $PY benchmarks/bench_drafter_step.py --runs 10 --warmup 3 --skip-sc 2>&1 | tail -4 | tee -a "$OUT_DIR/summary.txt" || status=1

echo "exit status $status" | tee -a "$OUT_DIR/summary.txt"
exit $status
