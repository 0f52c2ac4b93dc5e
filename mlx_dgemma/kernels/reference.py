"""The pure-MLX sampling step: the semantic reference for the kernels (re-exported)."""

from ..sampling import StepSample, probabilities, sample_step_mlx

NAME = "mlx"

__all__ = ["NAME", "StepSample", "probabilities", "sample_step_mlx"]
