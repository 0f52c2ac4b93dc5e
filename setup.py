"""Build the optional CPU sampling kernel (mlx_dgemma.kernels._cpu); everything else is in
pyproject.toml. ``optional=True``: where it cannot be compiled (no C compiler) the install
still succeeds and the package samples with the pure-MLX path (mlx_dgemma/kernels/README.md)."""

import sys

from setuptools import Extension, setup

unix = sys.platform != "win32"
setup(
    ext_modules=[
        Extension(
            "mlx_dgemma.kernels._cpu",
            ["mlx_dgemma/kernels/_cpu.c"],
            # IEEE arithmetic as MLX's CPU backend does it: no fast math, no contraction
            # into FMAs that would change a rounding (the sampled token must not move);
            # no errno or trap semantics, so that the loops vectorise.
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-pthread"] if unix else ["/O2"],
            extra_link_args=["-pthread"] if unix else [],
            optional=True,
        )
    ]
)
