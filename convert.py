#!/usr/bin/env python
"""Convert a Hugging Face DiffusionGemma checkpoint into an MLX model folder.

    python convert.py --hf-path google/diffusiongemma-26B-A4B-it --mlx-path dgemma-4bit -q

A thin wrapper over ``mlx_dgemma.convert`` (also ``python -m mlx_dgemma.convert``);
see docs/convert.md.
"""

import sys

from mlx_dgemma.convert import main

if __name__ == "__main__":
    sys.exit(main())
