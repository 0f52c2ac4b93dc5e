"""Run the shared kernel source on the CPU: a test harness for machines without a GPU.

The common header and body of ``template`` (the exact text the Metal and CUDA kernels
are built from) are compiled as C++ with primitives that emulate a GPU group: every
thread of a group is an OS thread, a simdgroup/warp shuffle is a store, a 32-thread
barrier and a load, and the group barrier is a ``std::barrier``. Groups (positions) run
one after another. This checks the algorithm text itself (online log-sum-exp, entropy,
argmax and Gumbel-max, the two-stage reduction, tie rules, tails) against the MLX path;
only the backend primitives in ``metal.py`` / ``cuda.py`` stay unexecuted here.

Needs a C++20 compiler (``g++``); slow by design (one OS thread per GPU thread).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import numpy as np

from ..sampling import StepSample
from . import template

NAME = "cpu-emulation"

PRIMITIVES = template.Primitives(
    name=NAME,
    prelude=r"""
#include <barrier>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

struct DgWarp {
  std::barrier<>* bar;
  float f[32];
  int i[32];
};
static thread_local DgWarp* dg_tl_warp = nullptr;
static thread_local uint32_t dg_tl_lane = 0;
static std::barrier<>* dg_group_bar = nullptr;

static inline float dg_shfl(float x, int m) {
  dg_tl_warp->f[dg_tl_lane] = x;
  dg_tl_warp->bar->arrive_and_wait();
  float r = dg_tl_warp->f[dg_tl_lane ^ (uint32_t)m];
  dg_tl_warp->bar->arrive_and_wait();
  return r;
}
static inline int dg_shfl(int x, int m) {
  dg_tl_warp->i[dg_tl_lane] = x;
  dg_tl_warp->bar->arrive_and_wait();
  int r = dg_tl_warp->i[dg_tl_lane ^ (uint32_t)m];
  dg_tl_warp->bar->arrive_and_wait();
  return r;
}

#define DG_FN static inline
#define DG_SHARED static
#define DG_EXP(x) std::exp((float)(x))
#define DG_LOG(x) std::log((float)(x))
#define DG_NEG_INF (-INFINITY)
#define DG_SHFL_XOR(x, lane_mask) dg_shfl((x), (int)(lane_mask))
#define DG_BARRIER() dg_group_bar->arrive_and_wait()
""",
    indices=r"""
  const uint32_t dg_tid = tid;
  const uint32_t dg_row = row;
  const uint32_t dg_lane = dg_tid & 31u;
  const uint32_t dg_warp = dg_tid >> 5;
""",
)

_DRIVER = r"""
// One GPU thread of one group. VOCAB and TGSIZE are run-time values here.
static void dg_thread(const float* logits, const float* temp, const uint32_t* keys,
                      int32_t* out_sampled, int32_t* out_argmax, float* out_entropy,
                      float* out_lse, int VOCAB, int TGSIZE, uint32_t row, uint32_t tid) {
%s
}

extern "C" void dg_run(const float* logits, float t, const uint32_t* keys, int rows, int vocab,
                       int threads, int32_t* out_sampled, int32_t* out_argmax,
                       float* out_entropy, float* out_lse) {
  const float temp[1] = {t};
  int warps = threads / 32;
  for (int row = 0; row < rows; ++row) {
    std::barrier<> group(threads);
    dg_group_bar = &group;
    std::vector<DgWarp> ws(warps);
    std::vector<std::barrier<>*> bars;
    for (int w = 0; w < warps; ++w) {
      bars.push_back(new std::barrier<>(32));
      ws[w].bar = bars.back();
    }
    std::vector<std::thread> pool;
    for (int tid = 0; tid < threads; ++tid) {
      pool.emplace_back([&, tid, row]() {
        dg_tl_warp = &ws[tid / 32];
        dg_tl_lane = (uint32_t)tid & 31u;
        dg_thread(logits, temp, keys, out_sampled, out_argmax, out_entropy, out_lse,
                  vocab, threads, (uint32_t)row, (uint32_t)tid);
      });
    }
    for (auto& th : pool) th.join();
    for (auto* b : bars) delete b;
  }
}
"""


def source() -> str:
    """The complete C++ translation unit (common text + CPU primitives + driver)."""
    header, body = template.build(PRIMITIVES)
    return header + _DRIVER % body


def compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CXX", "g++"))


def build(out_dir: Optional[Path] = None) -> ctypes.CDLL:
    """Compile (cached by source hash) and load the emulator."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) to build the kernel emulator")
    src = source()
    digest = hashlib.sha256(src.encode()).hexdigest()[:16]
    out_dir = Path(out_dir or Path(tempfile.gettempdir()) / "mlx_dgemma_emulator")
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"dg_emulator_{digest}.so"
    if not lib.exists():
        cpp = out_dir / f"dg_emulator_{digest}.cpp"
        cpp.write_text(src)
        tmp = out_dir / f".{digest}.{os.getpid()}.so"
        # No -ffast-math: IEEE exp/log/division, like the GPU kernels' safe math modes.
        subprocess.run([cxx, "-std=c++20", "-O2", "-fPIC", "-shared", "-pthread",
                        "-Wall", "-Werror", "-Wno-unused-variable", str(cpp), "-o", str(tmp)],
                       check=True, capture_output=True, text=True)
        os.replace(tmp, lib)
    dll = ctypes.CDLL(str(lib))
    dll.dg_run.restype = None
    return dll


def make_sample_step(threads: int = 64, dll: Optional[ctypes.CDLL] = None):
    """A ``sample_step`` running the shared source on emulated groups of ``threads``."""
    template.launch_shape(1, threads)  # validates the group size
    dll = dll or build()

    def sample_step(logits: mx.array, temp: Union[float, mx.array], keys: mx.array) -> StepSample:
        B, L, V = logits.shape
        x = np.ascontiguousarray(np.array(logits.astype(mx.float32)))
        k = np.ascontiguousarray(np.array(keys.astype(mx.uint32)))
        rows = B * L
        outs = [np.zeros(rows, np.int32), np.zeros(rows, np.int32),
                np.zeros(rows, np.float32), np.zeros(rows, np.float32)]
        ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
        dll.dg_run(ptr(x), ctypes.c_float(float(np.array(temp, dtype=np.float32))), ptr(k),
                   ctypes.c_int(rows), ctypes.c_int(V), ctypes.c_int(threads), *map(ptr, outs))
        return StepSample(*(mx.array(o.reshape(B, L)) for o in outs))

    return sample_step
