"""The models known by name, and where mlx_dgemma keeps what it builds and converts.

Below the loader: the loader resolves these names, and nothing here imports the loader
or anything above it (the demo recipe is imported only when the demo must be built).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import ConfigError

BUILTIN_MODELS = ("demo", "sudoku")
CACHE_ENV = "MLX_DGEMMA_CACHE"  # where the demo and first-use conversions are kept
SUDOKU_MODEL_DIR = Path(__file__).resolve().parent / "sudoku" / "model"  # package data


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mlx_dgemma").expanduser()


def demo_path() -> Path:
    return cache_root() / "demo"


def builtin_model_path(name: str, log=None) -> Path:
    """The folder of a model known by name: ``demo`` (random weights, built locally on first
    use) or ``sudoku`` (the trained Sudoku model shipped inside the package)."""
    if name == "demo":
        from .demo import ensure_demo

        return ensure_demo(demo_path(), log=log or (lambda msg: print(msg, file=sys.stderr)))
    if name == "sudoku":
        if not (SUDOKU_MODEL_DIR / "config.json").is_file():
            raise ConfigError(f"{SUDOKU_MODEL_DIR}: the sudoku model is not built here; "
                              "`python -m mlx_dgemma.sudoku.train` rebuilds it")
        return SUDOKU_MODEL_DIR
    raise ConfigError(f"{name}: not a built-in model (expected one of {', '.join(BUILTIN_MODELS)})")
