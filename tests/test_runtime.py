"""mlx_dgemma.runtime: OpenBLAS loaded before MLX at import, the note on stderr, malloc.

Each case runs in a fresh interpreter without LD_PRELOAD (what a user's process looks
like), since what matters is the order in which the libraries are loaded.
"""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_dgemma import runtime

ROOT = Path(__file__).resolve().parent.parent
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only (macOS: Accelerate)")


def run(code: str, **env) -> str:
    e = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLX_DGEMMA_BLAS", "MLX_DGEMMA_MALLOC")}
    if e.get(runtime.ENV_NAMED_CORE) and e.get("OPENBLAS_CORETYPE") == e[runtime.ENV_NAMED_CORE]:
        del e["OPENBLAS_CORETYPE"], e[runtime.ENV_NAMED_CORE]  # ours, not the machine's: a user's process lacks it
    e.update(env, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


PROBE = """
import ctypes, mlx_dgemma
from mlx_dgemma import runtime
import mlx.core as mx
print(runtime.state()["blas"], hasattr(ctypes.CDLL(None), "cblas_sgemm"), runtime.state()["malloc"].split()[0])
"""


@linux
def test_import_loads_openblas_before_mlx():
    if not runtime.find_openblas():
        pytest.skip("no OpenBLAS on this machine (apt-get install libopenblas0-pthread)")
    kind, global_sgemm, malloc = run(PROBE).split()
    assert kind == "loaded" and global_sgemm == "True"  # MLX's cblas_sgemm resolves to it
    assert malloc == "heap"


def test_the_core_named_for_a_cpu_openblas_does_not_know(monkeypatch):
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    avx512 = {"avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
    assert runtime.core_for(avx512) == "SkylakeX" and runtime.core_for({"avx2", "fma", "avx512f"}) == "Haswell"
    assert runtime.core_for({"sse3", "avx"}) is None
    # only OpenBLAS's generic fallback is replaced, and only by a core the CPU runs
    assert runtime.core_override("Prescott", avx512) == "SkylakeX"
    assert runtime.core_override("Zen", avx512) is None and runtime.core_override("Prescott", {"sse3"}) is None
    assert runtime.core_override(None, avx512) is None  # another BLAS
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")  # named by the user or the machine: kept
    assert runtime.core_override("Prescott", avx512) is None


CORE = """
import os, mlx_dgemma
from mlx_dgemma import runtime
import mlx.core as mx
a = mx.ones((64, 64))
print(runtime.state()["blas_core"], os.environ.get("OPENBLAS_CORETYPE"), (a @ a)[0, 0].item())
"""


@linux
def test_openblas_runs_the_core_of_this_cpu():
    path = runtime.find_openblas()
    if not path or not runtime.core_for(runtime.cpu_flags()):
        pytest.skip("needs OpenBLAS and a CPU with AVX2 (apt-get install libopenblas0-pthread)")
    core, named, value = run(CORE).split()
    assert core.lower() != "prescott" and float(value) == 64.0  # not the generic fallback, and it computes
    assert named in ("None", core)  # OpenBLAS's own pick, or the one we named (children inherit it)
    # a core named in the environment is kept ("Prescott": SSE3, runs on every x86-64)
    if runtime.cpu_flags() >= {"sse3"}:
        core, named, value = run(CORE, OPENBLAS_CORETYPE="Prescott").split()
        assert (core, named, value) == ("Prescott", "Prescott", "64.0")
    # a child that preloads it gets the core too
    e = runtime.preload_env(path)
    assert e["LD_PRELOAD"] == path
    code = "import ctypes; from mlx_dgemma import runtime; print(runtime.openblas_core(ctypes.CDLL(%r)))" % path
    assert run(code, **e).lower() != "prescott"


@linux
def test_bundled_on_request_and_too_late_after_mlx():
    kind, global_sgemm, malloc = run(PROBE, MLX_DGEMMA_BLAS="bundled", MLX_DGEMMA_MALLOC="system").split()
    assert (kind, global_sgemm, malloc) == ("bundled", "False", "system")
    out = run("import mlx.core, mlx_dgemma\nfrom mlx_dgemma import runtime\nprint(runtime.describe())")
    assert "mlx was imported before mlx_dgemma" in out and "import mlx_dgemma first" in out


@linux
def test_missing_blas_says_how_to_get_it():
    out = run("import mlx_dgemma\nfrom mlx_dgemma import runtime\nprint(runtime.describe())",
              MLX_DGEMMA_BLAS="/nonexistent/libopenblas.so.0")
    assert "could not load /nonexistent/libopenblas.so.0" in out and "30x slower" in out


@linux
def test_announce_once_on_stderr(monkeypatch):
    monkeypatch.setattr(runtime, "_announced", False)
    buf = io.StringIO()
    runtime.announce(buf)
    runtime.announce(buf)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlx_dgemma: BLAS: ")
