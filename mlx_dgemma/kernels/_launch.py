"""Wrap a compiled MLX custom kernel (Metal or CUDA) as a ``sample_step`` function."""

from __future__ import annotations

from typing import Callable, Union

import mlx.core as mx

from ..sampling import StepSample
from . import template

SampleFn = Callable[[mx.array, Union[float, mx.array], mx.array], StepSample]


def check_shapes(logits: mx.array, keys: mx.array) -> None:
    """Every kernel's contract: logits [B, L, V] and keys [B, L]."""
    if logits.ndim != 3 or keys.shape != logits.shape[:2]:
        raise ValueError(
            f"sample_step: expected logits [B, L, V] and keys [B, L], got "
            f"{tuple(logits.shape)} and {tuple(keys.shape)}"
        )


def wrap(kernel, threads: int) -> SampleFn:
    """``kernel`` comes from mx.fast.metal_kernel / mx.fast.cuda_kernel on the common source."""

    def sample_step(logits: mx.array, temp: Union[float, mx.array], keys: mx.array) -> StepSample:
        check_shapes(logits, keys)
        B, L, V = logits.shape
        t = mx.array(temp, dtype=mx.float32).reshape(1)
        grid, group = template.launch_shape(B * L, threads)
        outs = kernel(
            inputs=[logits.astype(mx.float32), t, keys.astype(mx.uint32)],
            template=[(template.TEMPLATE_VOCAB, int(V)), (template.TEMPLATE_THREADS, threads)],
            grid=grid,
            threadgroup=group,
            output_shapes=[(B, L)] * 4,
            output_dtypes=[mx.int32, mx.int32, mx.float32, mx.float32],
        )
        return StepSample(*outs)

    return sample_step
