import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# MLX's Linux CPU wheel links the reference (netlib) BLAS. Where OpenBLAS is installed,
# run the whole session again with it preloaded: float32 matmuls get ~30x faster.
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


def pytest_configure(config):
    if (
        sys.platform == "linux"
        and os.path.exists(OPENBLAS)
        and OPENBLAS not in os.environ.get("LD_PRELOAD", "")
        and not os.environ.get("MLX_DGEMMA_NO_PRELOAD")
        and not hasattr(config, "workerinput")
    ):
        from mlx_dgemma.runtime import preload_env  # with the core this CPU runs, if OpenBLAS misses it

        env = dict(os.environ, **preload_env(OPENBLAS), MLX_DGEMMA_NO_PRELOAD="1")
        os.execve(sys.executable, [sys.executable, "-m", "pytest", *sys.argv[1:]], env)
    if os.environ.get("MLX_DGEMMA_NO_PRELOAD") and "blas" not in os.environ.get("LD_PRELOAD", ""):
        # Asked for MLX's own BLAS: keep mlx_dgemma.runtime from loading OpenBLAS at import
        # (the C attention and experts then stay off too: they need a global cblas_sgemm).
        os.environ.setdefault("MLX_DGEMMA_BLAS", "bundled")
