"""DiffusionGemma on MLX."""

from .config import ConfigError, ModelArgs
from .loader import WeightsError, load, load_model
from .model import Model

__all__ = ["ConfigError", "Model", "ModelArgs", "WeightsError", "load", "load_model"]
__version__ = "0.1.0"

from .generate import generate, stream_generate  # noqa: E402

__all__ += ["generate", "stream_generate"]
