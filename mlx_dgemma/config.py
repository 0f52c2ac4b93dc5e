"""config.json: reading it with one-line errors, and writing small ones.

``ModelArgs`` (re-exported here) lives in the model file, models/diffusion_gemma.py,
which reads both forms of config.json (Hugging Face's and ours).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .models.diffusion_gemma import MODEL_TYPES, ModelArgs
from .errors import ConfigError  # noqa: F401  (raised here; defined with the others)

__all__ = ["ConfigError", "MODEL_TYPES", "ModelArgs", "read_config", "small_model_config", "small_vision_config"]

def small_model_config(
    *,
    vocab_size: int,
    canvas_length: int,
    hidden_size: int,
    num_hidden_layers: int,
    intermediate_size: int,
    num_attention_heads: int,
    head_dim: int,
    num_experts: int,
    top_k_experts: int,
    moe_intermediate_size: int,
    sliding_window: int,
    max_position_embeddings: int,
    eos_token_id: Union[int, List[int]],
    pad_token_id: int,
    bos_token_id: int,
    layer_types: Optional[List[str]] = None,
    **top_level: Any,
) -> Dict[str, Any]:
    """config.json (the converted layout) of a small model with the released architecture's
    fixed choices: full layers with K = V, one K/V head of twice the head size and
    proportional RoPE, GeGLU (tanh), tied soft-capped logits; the last layer full and the
    others sliding unless ``layer_types`` gives another pattern (the tests' reference model
    has a full layer before the last). The demo and the Sudoku model are built from it;
    ``top_level`` adds keys beside ``text_config``."""
    if layer_types is None:
        layer_types = ["sliding_attention"] * (num_hidden_layers - 1) + ["full_attention"]
    elif len(layer_types) != num_hidden_layers or layer_types[-1] != "full_attention" or not set(
            layer_types) <= {"sliding_attention", "full_attention"}:
        raise ValueError(f"layer_types {layer_types!r}: expected {num_hidden_layers} of 'sliding_attention' "
                         "or 'full_attention', the last one 'full_attention'")
    text = dict(
        model_type="diffusion_gemma_text",
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=max(1, num_attention_heads // 2),
        head_dim=head_dim,
        global_head_dim=2 * head_dim,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        sliding_window=sliding_window,
        layer_types=list(layer_types),
        num_experts=num_experts,
        top_k_experts=top_k_experts,
        moe_intermediate_size=moe_intermediate_size,
        max_position_embeddings=max_position_embeddings,
        final_logit_softcapping=30.0,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                               "rope_theta": 1000000.0},
        },
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
    )
    return dict(
        model_type="diffusion_gemma",
        architectures=["DiffusionGemmaForBlockDiffusion"],
        canvas_length=canvas_length,
        text_config=text,
        tie_word_embeddings=True,
        **top_level,
    )


def small_vision_config(hidden_size: int = 32, num_hidden_layers: int = 1, num_attention_heads: int = 2,
                        head_dim: int = 16, intermediate_size: int = 64, **overrides: Any) -> Dict[str, Any]:
    """A small Gemma 4 vision_config (the released tower's fixed choices: 16 px patches,
    3 x 3 pooling, axial RoPE, GeGLU) for tests and demos: pass it as ``vision_config=``
    to :func:`small_model_config` with image token ids inside the vocabulary."""
    return dict(model_type="gemma4_vision", hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                num_attention_heads=num_attention_heads, num_key_value_heads=num_attention_heads,
                head_dim=head_dim, intermediate_size=intermediate_size, patch_size=16, pooling_kernel_size=3,
                position_embedding_size=10 * 1024, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                rope_parameters={"rope_type": "axial", "rope_theta": 100.0}, use_clipped_linears=False,
                standardize=False, **overrides)


def read_config(model_path: Union[str, Path]) -> Dict[str, Any]:
    """Read ``config.json`` from a model folder, with one-line errors."""
    path = Path(model_path) / "config.json"
    if not Path(model_path).is_dir():
        raise ConfigError(f"{model_path}: not a folder")
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json in the model folder")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    if config.get("model_type") not in MODEL_TYPES:
        raise ConfigError(
            f"{path}: model_type is {config.get('model_type')!r}, "
            f"expected a DiffusionGemma config ({', '.join(MODEL_TYPES)})"
        )
    return config
