"""The fused sampling step, written once for every GPU backend.

One threadgroup (Metal) / block (CUDA) handles one canvas position and reads that
position's logits exactly once. Each thread walks the vocabulary with a stride of the
group size (coalesced loads, ascending indices per thread) and keeps one running state:

    m   running max of x = logit / t
    s   sum of exp(x - m)                      (log-sum-exp = m + log s)
    w   sum of exp(x - m) * (x - m)            (entropy = log s - w / s)
    av, ai   best x and its token              (argmax)
    sv, si   best x + gumbel(key, token)       (Gumbel-max sample)

States merge associatively (the flash-attention rescaling for m, s, w; for the two
maxima the larger value wins and an exact tie goes to the LOWER token id, which is
what ``mx.argmax`` returns). Threads merge first within a simdgroup/warp by an XOR
butterfly of shuffles, then the per-simdgroup states meet in shared memory and the first
simdgroup merges them the same way. The merge order is fixed by the code, so results
do not depend on scheduling.

Keeping ``w`` relative to the running max (instead of ``sum p * x`` as the MLX path
does) avoids the cancellation in ``lse - sum p x`` for nearly one-hot rows; the two
agree to float32 rounding (see mlx_dgemma/kernels/README.md).

The Gumbel noise hashes exactly the counters of ``mlx_dgemma.rng.gumbel``:
``u = ((lowbias32(key ^ token) >> 8) + 0.5) * 2^-24``, ``g = -log(-log(u))``, so the
kernels draw the same samples as ``sampling.sample_step_mlx``.

A backend supplies only its primitives (``Primitives``): function qualifier, shared
memory qualifier, shuffle, barrier, exp/log, -inf and the thread indices. ``build``
glues them to the common text. The sources use only names that cannot trigger MLX's
automatic Metal attribute detection by accident (it adds an argument for every
attribute name found anywhere in the source).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Tuple

# Inputs and outputs of the generated kernel function (MLX writes the signature).
INPUT_NAMES = ("logits", "temp", "keys")
OUTPUT_NAMES = ("out_sampled", "out_argmax", "out_entropy", "out_lse")
# Compile-time constants (MLX template arguments): vocabulary size, threads per group.
TEMPLATE_VOCAB = "VOCAB"
TEMPLATE_THREADS = "TGSIZE"
SIMD_WIDTH = 32  # Apple simdgroups and NVIDIA warps are both 32 wide.
MAX_THREADS = 1024  # at most 32 simdgroups: the second stage fits in one simdgroup.


@dataclass(frozen=True)
class Primitives:
    """Backend spellings used by the common source."""

    name: str
    prelude: str  # macros placed before the common header (file scope)
    indices: str  # statements at the top of the kernel body defining dg_tid .. dg_warp


# ---------------------------------------------------------------------------------
# File scope: the hash, the state and its merge. Uses DG_FN, DG_EXP, DG_LOG, DG_NEG_INF.
COMMON_HEADER = r"""
#define DG_M1 0x7FEB352Du
#define DG_M2 0x846CA68Bu

// lowbias32: identical to mlx_dgemma.rng.mix32 (wrapping 32-bit multiplies).
DG_FN uint32_t dg_mix32(uint32_t x) {
  x ^= x >> 16;
  x *= DG_M1;
  x ^= x >> 15;
  x *= DG_M2;
  x ^= x >> 16;
  return x;
}

// Gumbel(0, 1) noise for (position key, token): rng.gumbel, operation for operation.
DG_FN float dg_gumbel(uint32_t key, uint32_t token) {
  uint32_t h = dg_mix32(key ^ token);
  float u = ((float)(h >> 8) + 0.5f) * 5.9604644775390625e-08f;  // 2^-24, exact
  return -DG_LOG(-DG_LOG(u));
}

struct DgState {
  float m;   // running max of x
  float s;   // sum exp(x - m); 0 means "no finite element seen"
  float w;   // sum exp(x - m) * (x - m)
  float av;  // argmax value
  int ai;    // argmax token (DG_NONE when nothing seen)
  float sv;  // best x + g
  int si;    // its token
};

#define DG_NONE 0x7FFFFFFF

DG_FN DgState dg_empty() {
  DgState e;
  e.m = DG_NEG_INF;
  e.s = 0.0f;
  e.w = 0.0f;
  e.av = DG_NEG_INF;
  e.ai = DG_NONE;
  e.sv = DG_NEG_INF;
  e.si = DG_NONE;
  return e;
}

// One element, in ascending token order within a thread: strict '>' keeps the first
// (lowest) token on exact ties, as mx.argmax does.
DG_FN DgState dg_push(DgState st, float x, float g, int v) {
  if (x > st.m) {
    // New running max: rescale the sums to it. st.s == 0 means st.m is -inf.
    float r = DG_EXP(st.m - x);
    st.w = (st.s > 0.0f) ? (st.w + (st.m - x) * st.s) * r : 0.0f;
    st.s = st.s * r + 1.0f;  // exp(x - x) = 1; its (x - m) term is 0
    st.m = x;
  } else if (x > DG_NEG_INF) {
    float d = x - st.m;
    float e = DG_EXP(d);
    st.s += e;
    st.w += e * d;
  }
  if (x > st.av) {
    st.av = x;
    st.ai = v;
  }
  float y = x + g;
  if (y > st.sv) {
    st.sv = y;
    st.si = v;
  }
  return st;
}

// Associative merge; symmetric in its arguments (so every lane of a butterfly agrees).
DG_FN DgState dg_merge(DgState a, DgState b) {
  DgState o;
  o.m = (a.m > b.m) ? a.m : b.m;
  float ra = (a.s > 0.0f) ? DG_EXP(a.m - o.m) : 0.0f;
  float rb = (b.s > 0.0f) ? DG_EXP(b.m - o.m) : 0.0f;
  o.s = a.s * ra + b.s * rb;
  float wa = (a.s > 0.0f) ? (a.w + (a.m - o.m) * a.s) * ra : 0.0f;
  float wb = (b.s > 0.0f) ? (b.w + (b.m - o.m) * b.s) * rb : 0.0f;
  o.w = wa + wb;
  bool ka = (a.av > b.av) || (a.av == b.av && a.ai < b.ai);
  o.av = ka ? a.av : b.av;
  o.ai = ka ? a.ai : b.ai;
  bool ks = (a.sv > b.sv) || (a.sv == b.sv && a.si < b.si);
  o.sv = ks ? a.sv : b.sv;
  o.si = ks ? a.si : b.si;
  return o;
}

// Butterfly over the 32 lanes of a simdgroup/warp: afterwards every lane holds the merge.
DG_FN DgState dg_simd_reduce(DgState st) {
  for (int off = 16; off > 0; off >>= 1) {
    DgState o;
    o.m = DG_SHFL_XOR(st.m, off);
    o.s = DG_SHFL_XOR(st.s, off);
    o.w = DG_SHFL_XOR(st.w, off);
    o.av = DG_SHFL_XOR(st.av, off);
    o.ai = DG_SHFL_XOR(st.ai, off);
    o.sv = DG_SHFL_XOR(st.sv, off);
    o.si = DG_SHFL_XOR(st.si, off);
    st = dg_merge(st, o);
  }
  return st;
}
"""

# ---------------------------------------------------------------------------------
# Kernel body (after the backend's index statements). Inputs: logits [rows, VOCAB]
# float32, temp [1] float32, keys [rows] uint32. Outputs: four [rows] arrays.
# Shared memory first in the function body (Metal wants threadgroup variables declared at
# kernel function scope; first is the most conservative place).
COMMON_SHARED = r"""
  DG_SHARED float sh_m[32];
  DG_SHARED float sh_s[32];
  DG_SHARED float sh_w[32];
  DG_SHARED float sh_av[32];
  DG_SHARED int sh_ai[32];
  DG_SHARED float sh_sv[32];
  DG_SHARED int sh_si[32];
"""

COMMON_BODY = r"""
  const float t = temp[0];
  const uint32_t key = keys[dg_row];
  const int64_t base = (int64_t)dg_row * (int64_t)VOCAB;

  // Pass over this position's logits: one read per element.
  DgState st = dg_empty();
  for (int v = (int)dg_tid; v < VOCAB; v += TGSIZE) {
    float x = logits[base + v] / t;  // division, as the MLX path does (not * 1/t)
    st = dg_push(st, x, dg_gumbel(key, (uint32_t)v), v);
  }

  // Stage 1: within each simdgroup/warp.
  st = dg_simd_reduce(st);
  if (dg_lane == 0) {
    sh_m[dg_warp] = st.m;
    sh_s[dg_warp] = st.s;
    sh_w[dg_warp] = st.w;
    sh_av[dg_warp] = st.av;
    sh_ai[dg_warp] = st.ai;
    sh_sv[dg_warp] = st.sv;
    sh_si[dg_warp] = st.si;
  }
  DG_BARRIER();

  // Stage 2: the first simdgroup merges the per-simdgroup states.
  if (dg_warp == 0) {
    DgState p = dg_empty();
    if (dg_lane < (uint32_t)(TGSIZE / 32)) {
      p.m = sh_m[dg_lane];
      p.s = sh_s[dg_lane];
      p.w = sh_w[dg_lane];
      p.av = sh_av[dg_lane];
      p.ai = sh_ai[dg_lane];
      p.sv = sh_sv[dg_lane];
      p.si = sh_si[dg_lane];
    }
    p = dg_simd_reduce(p);
    if (dg_lane == 0) {
      float ls = DG_LOG(p.s);
      out_lse[dg_row] = p.m + ls;
      out_entropy[dg_row] = ls - p.w / p.s;
      // A row of -inf (or NaN) has no winner: report token 0, as mx.argmax does.
      out_argmax[dg_row] = (p.ai == DG_NONE) ? 0 : p.ai;
      out_sampled[dg_row] = (p.si == DG_NONE) ? 0 : p.si;
    }
  }
"""


def build(prims: Primitives) -> Tuple[str, str]:
    """(header, source) for ``mx.fast.metal_kernel`` / ``mx.fast.cuda_kernel``."""
    return prims.prelude + COMMON_HEADER, COMMON_SHARED + prims.indices + COMMON_BODY


def kernel_name(header: str, source: str) -> str:
    """A name that changes with the text: MLX's CUDA backend caches compiled kernels on
    disk by name (MLX_PTX_CACHE_DIR), so an edited source must not reuse an old name."""
    return "dgemma_sample_step_" + hashlib.sha256((header + source).encode()).hexdigest()[:12]


def launch_shape(rows: int, threads: int) -> Tuple[Tuple[int, int, int], Tuple[int, int, int]]:
    """(grid, threadgroup) in threads, as both MLX kernel wrappers take them: one group per row."""
    if threads % SIMD_WIDTH or not SIMD_WIDTH <= threads <= MAX_THREADS:
        raise ValueError(f"threads per group must be a multiple of 32 in [32, 1024], got {threads}")
    return (rows * threads, 1, 1), (threads, 1, 1)
