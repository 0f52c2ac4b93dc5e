"""Model arguments read from a Hugging Face or converted config.json.

DiffusionGemma's config.json nests the text model under ``text_config`` and puts
``canvas_length`` at the top level. Full-attention layers differ from sliding ones in
head size and KV heads; that difference arrives in one of two forms (the released
checkpoint's ``global_head_dim``/``num_global_key_value_heads`` keys, or the
``per_layer_config`` map that transformers 5.24 ``save_pretrained`` writes). Both are
normalised here into ``full_head_dim`` and ``full_kv_heads``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from mlx_lm.models.base import BaseModelArgs

MODEL_TYPES = ("diffusion_gemma", "diffusion_gemma_text")


class ConfigError(ValueError):
    """A config.json that is missing, unreadable or not a DiffusionGemma config."""


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "diffusion_gemma"
    hidden_size: int = 2816
    num_hidden_layers: int = 30
    intermediate_size: int = 2112
    num_attention_heads: int = 16
    head_dim: int = 256
    num_key_value_heads: int = 8
    full_head_dim: Optional[int] = None
    full_kv_heads: Optional[int] = None
    rms_norm_eps: float = 1e-6
    vocab_size: int = 262144
    sliding_window: int = 1024
    layer_types: Optional[List[str]] = None
    rope_parameters: Optional[Dict[str, Dict[str, Any]]] = None
    max_position_embeddings: int = 262144
    final_logit_softcapping: Optional[float] = 30.0
    num_experts: int = 128
    top_k_experts: int = 8
    moe_intermediate_size: int = 704
    canvas_length: int = 256
    pad_token_id: int = 0
    eos_token_id: Union[int, List[int], None] = 1
    bos_token_id: int = 2
    attention_bias: bool = False
    hidden_activation: str = "gelu_pytorch_tanh"
    # Images (None: a text-only model). ``vision_config`` is Gemma 4's vision config as
    # written in config.json; image tokens are replaced by the tower's soft tokens, and
    # with ``use_bidirectional_attention == "vision"`` they attend to each other both ways.
    vision_config: Optional[Dict[str, Any]] = None
    image_token_id: Optional[int] = None
    boi_token_id: Optional[int] = None
    eoi_token_id: Optional[int] = None
    use_bidirectional_attention: Optional[str] = None

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = [
                "full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                for i in range(self.num_hidden_layers)
            ]
        # The reference forces the last layer to full attention.
        self.layer_types = list(self.layer_types)
        self.layer_types[-1] = "full_attention"
        if self.rope_parameters is None:
            self.rope_parameters = {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {
                    "rope_type": "proportional",
                    "partial_rotary_factor": 0.25,
                    "rope_theta": 1_000_000.0,
                },
            }
        if self.full_head_dim is None:
            self.full_head_dim = 512
        if self.full_kv_heads is None:
            self.full_kv_heads = self.num_key_value_heads
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_approx"):
            raise ConfigError(
                f"hidden_activation {self.hidden_activation!r} is not supported "
                "(DiffusionGemma uses 'gelu_pytorch_tanh')"
            )

    def layer_head_dim(self, i: int) -> int:
        return self.full_head_dim if self.is_full(i) else self.head_dim

    def layer_kv_heads(self, i: int) -> int:
        return self.full_kv_heads if self.is_full(i) else self.num_key_value_heads

    def is_full(self, i: int) -> bool:
        return self.layer_types[i] == "full_attention"

    @property
    def eos_token_ids(self) -> List[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "ModelArgs":
        """Build from a DiffusionGemma config dict (top-level or text config)."""
        model_type = config.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(
                f"model_type is {model_type!r}, expected one of {', '.join(MODEL_TYPES)}"
            )
        text = dict(config.get("text_config") or config)
        text.setdefault("canvas_length", config.get("canvas_length", 256))
        for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
            if key not in text and key in config:
                text[key] = config[key]
        for key in ("vision_config", "image_token_id", "boi_token_id", "eoi_token_id"):
            if key in config and config.get("text_config") is not None:
                text[key] = config[key]
        layer_types = text.get("layer_types")
        num_layers = text.get("num_hidden_layers", cls.num_hidden_layers)
        if layer_types is None:
            layer_types = [
                "full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                for i in range(num_layers)
            ]
            layer_types[-1] = "full_attention"
        # Form 1: per_layer_config {"29": {"head_dim": 512, "num_key_value_heads": 2}}.
        plc = text.get("per_layer_config") or {}
        full_overrides = [
            v
            for k, v in plc.items()
            if str(k).isdigit() and int(k) < len(layer_types) and layer_types[int(k)] == "full_attention"
        ]
        full_head_dim = next((o["head_dim"] for o in full_overrides if "head_dim" in o), None)
        full_kv = next(
            (o["num_key_value_heads"] for o in full_overrides if "num_key_value_heads" in o), None
        )
        # Form 2: global_head_dim / num_global_key_value_heads (/ attention_k_eq_v).
        if full_head_dim is None:
            full_head_dim = text.get("global_head_dim", 512)
        if full_kv is None and text.get("attention_k_eq_v", True):
            full_kv = text.get("num_global_key_value_heads")
        text["full_head_dim"] = full_head_dim
        text["full_kv_heads"] = full_kv
        text["layer_types"] = layer_types
        text["model_type"] = "diffusion_gemma"
        return cls.from_dict(text)


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
    **top_level: Any,
) -> Dict[str, Any]:
    """config.json (the converted layout) of a small model with the released architecture's
    fixed choices: the last layer full and the others sliding, full layers with K = V, one
    K/V head of twice the head size and proportional RoPE, GeGLU (tanh), tied soft-capped
    logits. The demo and the Sudoku model are built from it; ``top_level`` adds keys
    beside ``text_config``."""
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
        layer_types=["sliding_attention"] * (num_hidden_layers - 1) + ["full_attention"],
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
