"""Process setup for MLX's Linux CPU backend, done once when mlx_dgemma is imported.

Two things decide how fast MLX runs on a Linux CPU, and neither is MLX's default:

- **BLAS.** The ``mlx[cpu]`` wheel links its own reference (netlib) BLAS: a float32
  matmul runs at ~4-8 GFLOP/s, where OpenBLAS gives ~150-250 on the same 2 cores. MLX
  resolves ``cblas_sgemm`` when ``mlx.core`` is loaded, so a BLAS loaded into the global
  symbol scope BEFORE that (what ``LD_PRELOAD`` does) wins. We load the system OpenBLAS
  that way when mlx_dgemma is imported first. When ``mlx.core`` was imported earlier
  it is too late: the note says so (``LD_PRELOAD`` then still works).
- **malloc.** MLX 0.32's CPU allocator keeps only 32 MB of freed buffers for reuse, and
  glibc serves every allocation over 32 MB with a fresh ``mmap``: each [256, 32768]
  float32 result then cost ~8,000 page faults (~40 ms here) before a byte was computed,
  every time. We let glibc keep large blocks in its heap for reuse (``mallopt``: no mmap,
  no trimming): the process keeps its peak size instead of returning it to the system
  between steps. (Raising MLX's own cache as well made a 4-bit denoising step of the mid
  benchmark model slower, 664 against 568 ms, and a float32 one no faster:
  ``benchmarks/bench_buffer_cache.py``; training raises it for its run,
  ``tuner.trainer.buffer_cache_for_training``.)

- **OpenBLAS's kernels.** OpenBLAS picks its kernels for the CPU when it is loaded; a
  build older than the CPU does not know it and falls back to its generic "Prescott"
  kernels (Debian 12's 0.3.21 on a Xeon of family 6 model 207: float32 matmuls ~50
  GFLOP/s where its AVX-512 kernels give ~250). Then we load it again naming the core
  this CPU's instruction set runs (``OPENBLAS_CORETYPE``, which child processes inherit).
  A core named in the environment is left as it is.

``MLX_DGEMMA_BLAS`` = a library path (any BLAS with the CBLAS interface), or ``bundled``
to keep MLX's own; ``MLX_DGEMMA_MALLOC=system`` keeps glibc's defaults. ``describe()``
names what is in use; the CLI and the server print it once on stderr (``announce``).
"""

from __future__ import annotations

import _ctypes
import ctypes
import ctypes.util
import os
import sys
from typing import Dict, List, Optional, Set

ENV_BLAS = "MLX_DGEMMA_BLAS"
ENV_MALLOC = "MLX_DGEMMA_MALLOC"
# Set beside OPENBLAS_CORETYPE when we named the core, so that a core the user or the
# machine named stays told apart from ours (tests start user-like processes without ours).
ENV_NAMED_CORE = "MLX_DGEMMA_NAMED_CORE"

# Where distributions put OpenBLAS (Debian/Ubuntu alternatives first: the pthread build).
OPENBLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
HOW_TO_GET = ("install OpenBLAS (Debian/Ubuntu: apt-get install libopenblas0-pthread; Fedora: dnf install "
              "openblas) or point MLX_DGEMMA_BLAS at a CBLAS library")

# OpenBLAS's fallback for a CPU it does not know, and the cores to name instead, best
# first, with the instruction sets each needs (as /proc/cpuinfo spells them).
GENERIC_CORE = "Prescott"
CORES_BY_FLAGS = (
    ("SkylakeX", {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}),
    ("Haswell", {"avx2", "fma"}),
)

_state: Dict[str, Optional[str]] = {"blas": None, "blas_path": None, "blas_core": None, "core_note": None, "malloc": None}
_announced = False


def _preloaded() -> Optional[str]:
    for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split():
        if "blas" in os.path.basename(p).lower():
            return p
    return None


def find_openblas() -> Optional[str]:
    for p in OPENBLAS_PATHS:
        if os.path.exists(p):
            return p
    name = ctypes.util.find_library("openblas")
    return name


def cpu_flags() -> Set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def core_for(flags: Set[str]) -> Optional[str]:
    """The best OpenBLAS core whose instructions are all in ``flags``."""
    return next((core for core, need in CORES_BY_FLAGS if need <= flags), None)


def openblas_core(lib: ctypes.CDLL) -> Optional[str]:
    """The core a loaded OpenBLAS runs, None for another BLAS."""
    try:
        get = lib.openblas_get_corename
    except AttributeError:
        return None
    get.restype = ctypes.c_char_p
    return get().decode(errors="replace")


def core_override(picked: Optional[str], flags: Set[str]) -> Optional[str]:
    """The core to name in OPENBLAS_CORETYPE when OpenBLAS ``picked`` its generic fallback
    on a CPU with better instructions; None when its pick stands or one is named already."""
    if os.environ.get("OPENBLAS_CORETYPE") or picked is None or picked.lower() != GENERIC_CORE.lower():
        return None
    return core_for(flags)


def _load_global(path: str) -> ctypes.CDLL:
    """Load ``path`` into the global symbol scope; an OpenBLAS that falls back to its generic
    kernels on this CPU is unloaded and loaded again with the core named."""
    probe = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
    picked = openblas_core(probe)
    better = core_override(picked, cpu_flags())
    if better:
        handle = probe._handle
        del probe
        _ctypes.dlclose(handle)  # nothing else holds it yet: its constructor runs again below
        os.environ["OPENBLAS_CORETYPE"] = os.environ[ENV_NAMED_CORE] = better
    lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    core = openblas_core(lib)
    _state["blas_core"] = core
    if better:
        _state["core_note"] = f"OpenBLAS took this CPU for a {picked}: core {core} (OPENBLAS_CORETYPE={better})"
    return lib


def _setup_blas() -> None:
    choice = os.environ.get(ENV_BLAS, "").strip()
    pre = _preloaded()
    if pre:
        _state.update(blas="preloaded", blas_path=pre)
        try:  # loaded already by ld.so: only the environment of the next process can name the core
            _state["blas_core"] = core = openblas_core(ctypes.CDLL(pre))
            better = core_override(core, cpu_flags())
            if better:
                _state["core_note"] = f"OpenBLAS runs its generic {core} kernels here: set OPENBLAS_CORETYPE={better}"
        except OSError:
            pass
        return
    if choice == "bundled":
        _state.update(blas="bundled", blas_path=None)
        return
    if "mlx.core" in sys.modules:  # bound already: only LD_PRELOAD can change it now
        _state.update(blas="bundled-late", blas_path=choice or find_openblas())
        return
    path = choice or find_openblas()
    if not path:
        _state.update(blas="missing", blas_path=None)
        return
    try:
        if not hasattr(_load_global(path), "cblas_sgemm"):
            raise OSError("no cblas_sgemm in it")
    except OSError as e:
        _state.update(blas="failed", blas_path=f"{path} ({e})")
        return
    _state.update(blas="loaded", blas_path=path)


def _setup_malloc() -> None:
    if os.environ.get(ENV_MALLOC, "").strip() == "system":
        _state["malloc"] = "system (MLX_DGEMMA_MALLOC=system)"
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc only
    except (OSError, AttributeError):
        _state["malloc"] = "system (not glibc)"
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)) == 1
    _state["malloc"] = "heap reuse (no mmap per large block)" if ok else "system (mallopt refused)"


def cpu_allocator() -> bool:
    """Whether MLX allocates with its CPU allocator (a build without Metal or CUDA)."""
    import mlx.core as mx

    return not (mx.metal.is_available() or mx.cuda.is_available())


def setup() -> None:
    """Idempotent; a no-op off Linux (macOS: Accelerate and Metal need none of this)."""
    if _state["blas"] is not None or not sys.platform.startswith("linux"):
        return
    _setup_blas()
    _setup_malloc()


def fast_blas() -> bool:
    return _state["blas"] in ("preloaded", "loaded") or not sys.platform.startswith("linux")


def describe() -> str:
    """One line: which BLAS MLX's matmuls use, and how to get the fast one if missing."""
    if not sys.platform.startswith("linux"):
        return "BLAS: MLX's own (macOS: Accelerate)"
    kind, path = _state["blas"], _state["blas_path"]
    note = f"; {_state['core_note']}" if _state["core_note"] else ""
    if kind == "preloaded":
        return f"BLAS: {path} (LD_PRELOAD{note})"
    if kind == "loaded":
        return f"BLAS: {path} (loaded before MLX{note})"
    slow = "MLX's bundled reference BLAS, float32 matmuls ~30x slower than OpenBLAS"
    if kind == "bundled":
        return f"BLAS: {slow} ({ENV_BLAS}=bundled)"
    if kind == "bundled-late":
        hint = f"set LD_PRELOAD={path}" if path else HOW_TO_GET
        return f"BLAS: {slow}: mlx was imported before mlx_dgemma; import mlx_dgemma first or {hint}"
    if kind == "failed":
        return f"BLAS: {slow}: could not load {path}"
    return f"BLAS: {slow}: no OpenBLAS found; {HOW_TO_GET}"


def announce(file=None) -> None:
    """Print ``describe()`` once per process on stderr (the CLI and the server call this)."""
    global _announced
    if _announced or not sys.platform.startswith("linux"):
        return
    _announced = True
    print(f"mlx_dgemma: {describe()}", file=file or sys.stderr, flush=True)


def warn_if_slow() -> None:
    """Once per process, a RuntimeWarning when MLX's matmuls run on the slow BLAS (``load``
    calls this: a user's script that imported mlx before mlx_dgemma hears about it)."""
    global _announced
    if _announced or fast_blas():
        return
    _announced = True
    import warnings

    warnings.warn(f"mlx_dgemma: {describe()}", RuntimeWarning, stacklevel=3)


def state() -> Dict[str, Optional[str]]:
    return dict(_state)


def preload_env(path: str) -> Dict[str, str]:
    """The environment a child process needs to preload the OpenBLAS at ``path``
    (``LD_PRELOAD``) with the core this CPU runs, where OpenBLAS would fall back to its
    generic kernels (probed here, in a scope of its own)."""
    env = {"LD_PRELOAD": path}
    ours = os.environ.get(ENV_NAMED_CORE)
    if ours and os.environ.get("OPENBLAS_CORETYPE") == ours:  # named here already (this process loaded it)
        env["OPENBLAS_CORETYPE"] = env[ENV_NAMED_CORE] = ours
        return env
    try:
        probe = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
    except OSError:
        return env
    better = core_override(openblas_core(probe), cpu_flags())
    _ctypes.dlclose(probe._handle)  # our reference only: a copy loaded before stays
    if better:
        env["OPENBLAS_CORETYPE"] = env[ENV_NAMED_CORE] = better
    return env


__all__: List[str] = ["ENV_BLAS", "ENV_MALLOC", "ENV_NAMED_CORE", "announce", "core_for", "core_override", "cpu_allocator", "cpu_flags",
                      "describe", "fast_blas", "find_openblas", "openblas_core", "preload_env", "setup", "state",
                      "warn_if_slow"]
