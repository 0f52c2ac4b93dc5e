"""DiffusionGemma on MLX."""

# First, before anything imports mlx.core: the fast BLAS and malloc setup for MLX's
# Linux CPU backend (see runtime.py; a no-op elsewhere).
from . import runtime

runtime.setup()

from .config import ModelArgs
from .errors import ConfigError, WeightsError
from .loader import load, load_model
from .model import Model

__all__ = ["ConfigError", "Model", "ModelArgs", "WeightsError", "load", "load_model"]
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so that `python -m mlx_dgemma.generate` does not import the module twice.
    # (`mlx_dgemma.generate` may then be the submodule: it is callable, as generate().)
    if name in ("generate", "stream_generate"):
        import importlib

        return getattr(importlib.import_module(".generate", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ += ["generate", "stream_generate"]
