"""The fused sampling step on NVIDIA GPUs, through ``mx.fast.cuda_kernel`` (MLX's CUDA build).

Only the primitives live here; the algorithm is ``template.COMMON_HEADER/COMMON_BODY``.
Reviewed line by line against ``metal.py`` (same order of definitions, same meaning).
MLX's CUDA prelude already includes cooperative_groups and its device utilities
(uint32_t, int64_t); the body lands inside ``namespace mlx::core::cu``.
"""

from __future__ import annotations

import mlx.core as mx

from . import template
from ._launch import SampleFn, wrap

NAME = "cuda"
THREADS = 1024

PRIMITIVES = template.Primitives(
    name=NAME,
    prelude=r"""
#define DG_FN __device__ __forceinline__
#define DG_SHARED __shared__
#define DG_EXP(x) expf(x)
#define DG_LOG(x) logf(x)
#define DG_NEG_INF (-__int_as_float(0x7f800000))
#define DG_SHFL_XOR(x, lane_mask) __shfl_xor_sync(0xffffffffu, (x), (int)(lane_mask))
#define DG_BARRIER() __syncthreads()
""",
    indices=r"""
  const uint32_t dg_tid = threadIdx.x;
  const uint32_t dg_row = blockIdx.x;
  const uint32_t dg_lane = dg_tid & 31u;
  const uint32_t dg_warp = dg_tid >> 5;
""",
)

HEADER, SOURCE = template.build(PRIMITIVES)


def available() -> bool:
    """MLX's CUDA build with a visible GPU."""
    try:
        return bool(hasattr(mx, "cuda") and mx.cuda.is_available())
    except Exception:
        return False


def make_sample_step(threads: int = THREADS) -> SampleFn:
    """Build the kernel (compiled by NVRTC on first call) and return ``sample_step``."""
    kernel = mx.fast.cuda_kernel(
        name=template.kernel_name(HEADER, SOURCE),
        input_names=list(template.INPUT_NAMES),
        output_names=list(template.OUTPUT_NAMES),
        source=SOURCE,
        header=HEADER,
        ensure_row_contiguous=True,
    )
    return wrap(kernel, threads)
