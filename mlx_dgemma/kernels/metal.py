"""The fused sampling step on Apple GPUs, through ``mx.fast.metal_kernel``.

Only the primitives live here; the algorithm is ``template.COMMON_HEADER/COMMON_BODY``.
Reviewed line by line against ``cuda.py`` (same order of definitions, same meaning).
"""

from __future__ import annotations

import mlx.core as mx

from . import template
from ._launch import SampleFn, wrap

NAME = "metal"
THREADS = 1024

PRIMITIVES = template.Primitives(
    name=NAME,
    prelude=r"""
#define DG_FN inline
#define DG_SHARED threadgroup
#define DG_EXP(x) metal::precise::exp(x)
#define DG_LOG(x) metal::precise::log(x)
#define DG_NEG_INF (-INFINITY)
#define DG_SHFL_XOR(x, lane_mask) metal::simd_shuffle_xor((x), (ushort)(lane_mask))
#define DG_BARRIER() metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup)
""",
    # MLX adds a [[...]] argument for each attribute name used here (and nowhere else).
    indices=r"""
  const uint32_t dg_tid = thread_position_in_threadgroup.x;
  const uint32_t dg_row = threadgroup_position_in_grid.x;
  const uint32_t dg_lane = thread_index_in_simdgroup;
  const uint32_t dg_warp = simdgroup_index_in_threadgroup;
""",
)

HEADER, SOURCE = template.build(PRIMITIVES)


def available() -> bool:
    """An Apple GPU that MLX can run kernels on."""
    try:
        return bool(mx.metal.is_available())
    except Exception:
        return False


def make_sample_step(threads: int = THREADS) -> SampleFn:
    """Build the kernel (compiled by MLX on first call) and return ``sample_step``."""
    kernel = mx.fast.metal_kernel(
        name=template.kernel_name(HEADER, SOURCE),
        input_names=list(template.INPUT_NAMES),
        output_names=list(template.OUTPUT_NAMES),
        source=SOURCE,
        header=HEADER,
        ensure_row_contiguous=True,
        # IEEE exp/log and infinities (the empty state is -inf): never fast math.
        compile_options={"math_mode": "safe"},
    )
    return wrap(kernel, threads)
