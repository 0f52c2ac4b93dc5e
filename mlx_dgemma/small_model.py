"""Small model folders, the one way they are built: a config from
:func:`mlx_dgemma.config.small_model_config`, weights drawn at random (MLX's default
initialisations, seeded) and optionally reshaped by the caller's ``init``, written in the
converted layout with :func:`mlx_dgemma.folder.write_model_folder`.

The demo model, the Sudoku model's starting point, the server's and the tests' tiny
models and the agent test fixture are all written here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import ModelArgs
from .folder import hf_weights, write_model_folder
from .model import Model, build_model

# ``init(args, params) -> params``: the caller's weights from MLX's random ones (the same
# module-tree key names, e.g. "model.decoder.embed_tokens.weight").
Init = Callable[[ModelArgs, Dict[str, mx.array]], Dict[str, mx.array]]


def small_model(config: Dict[str, Any], seed: int = 0) -> Model:
    """The model of ``config`` (a :func:`small_model_config` dict) with MLX's random
    initialisation under ``seed``, vision tower included when the config names one."""
    mx.random.seed(seed)
    model = build_model(ModelArgs.from_config(config))
    mx.eval(model.parameters())
    return model


def write_small_model(
    path: Union[str, Path],
    config: Dict[str, Any],
    *,
    seed: int = 0,
    init: Optional[Init] = None,
    params: Optional[Dict[str, mx.array]] = None,
    dtype: Optional[str] = None,
    **folder: Any,
) -> Path:
    """Write a model folder at ``path`` (replacing it) and return it.

    The weights: ``params`` as given (e.g. a trained model's), else the random ones of
    :func:`small_model` passed through ``init``; cast to ``dtype`` ("float32",
    "bfloat16", ...) when given. ``folder``: what else goes in (``tokenizer``,
    ``chat_template``, ``generation_config``, ``readme``; see ``write_model_folder``).
    """
    if params is None:
        model = small_model(config, seed)
        params = dict(tree_flatten(model.parameters()))
        if init is not None:
            params = init(model.args, params)
    if dtype is not None:
        params = {k: v.astype(getattr(mx, dtype)) for k, v in params.items()}
    return write_model_folder(path, config, hf_weights(params), **folder)
