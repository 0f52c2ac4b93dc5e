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
