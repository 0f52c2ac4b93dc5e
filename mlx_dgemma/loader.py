"""Load a DiffusionGemma model folder: a Hugging Face checkpoint or a converted one.

Converted folders (ours, and mlx-community's made by mlx-vlm) keep the Hugging Face key
names and are quantized the mlx-lm way (``.scales``/``.biases`` beside each quantized
weight). Which modules are quantized, and with how many bits, is read off the tensors
themselves, so per-module overrides load whatever they are keyed by.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from .config import ConfigError, ModelArgs, read_config
from . import backend
from .model import Model, build_model
from .builtin import BUILTIN_MODELS, builtin_model_path  # noqa: F401  (re-exported)
from .errors import WeightsError  # noqa: F401  (raised here; defined with the others)


def resolve_model_path(path_or_id: Union[str, Path]) -> Path:
    """A built-in name (``demo``, ``sudoku``), a local folder as is, or a hub id, downloaded
    (weights and tokenizer only). Built-in names win over folders of the same name in the
    working directory (write ``./demo`` for those)."""
    if isinstance(path_or_id, str) and path_or_id in BUILTIN_MODELS:
        return builtin_model_path(path_or_id)
    p = Path(path_or_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"{p}: not a model folder")
        return p
    s = str(path_or_id)
    if s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise ConfigError(f"{s}: no such model folder (and not a hub id of the form owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                s,
                allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.md"],
            )
        )
    except Exception as e:  # network errors, unknown repos, gated repos
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"{s}: not a local folder, and the hub download failed ({type(e).__name__}: {reason})") from None


def read_header(f: Path) -> Dict[str, dict]:
    """A safetensors file's header, checked against the file's size (one-line errors)."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise WeightsError(f"{f}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise WeightsError(f"{f}: truncated safetensors file (header says {n} bytes, file has {size})")
            header = json.loads(fh.read(n))
    except OSError as e:
        raise WeightsError(f"{f}: cannot be read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise WeightsError(f"{f}: not a safetensors file (bad header)") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise WeightsError(f"{f}: truncated safetensors file (expected {8 + n + end} bytes, found {size})")
    return header


def weight_files(model_path: Path) -> list:
    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise WeightsError(f"{index}: not a valid safetensors index ({e})") from None
        files = [model_path / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise WeightsError(f"{missing[0]}: listed in {index.name} but missing")
    else:
        files = sorted(model_path.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{model_path}: no .safetensors weight files")
    return files


def load_weights(model_path: Path) -> Dict[str, mx.array]:
    weights: Dict[str, mx.array] = {}
    for f in weight_files(model_path):
        read_header(f)
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:
            raise WeightsError(f"{f}: could not be read ({e})".splitlines()[0]) from None
    return weights


def _quantization_of(module: nn.Module, path: str, weights: Dict[str, mx.array], mode: str):
    """(group_size, bits, mode) for a module whose weight is stored quantized, else None."""
    scales = weights.get(f"{path}.scales")
    if scales is None:
        return None
    # Read the mode off the tensors (affine keeps biases and float scales): mxfp4 folders
    # keep their 8-bit modules affine, whatever the top-level mode says.
    from mlx_lm.utils import infer_quant_config

    return infer_quant_config(path, module, weights)


def load_model(model_path: Union[str, Path], strict: bool = True) -> Tuple[Model, Dict[str, Any]]:
    """Build the model from a local folder and load its weights."""
    from . import runtime

    runtime.warn_if_slow()  # Linux: MLX's bundled BLAS is ~30x slower than OpenBLAS
    model_path = Path(model_path)
    config = read_config(model_path)
    try:
        args = ModelArgs.from_config(config)
        model = build_model(args)
    except ValueError as e:  # ConfigError, or the model file's own checks
        raise ConfigError(f"{model_path / 'config.json'}: {e}") from None
    weights = model.sanitize(load_weights(model_path))
    if model.has_vision and not any(k.startswith("model.encoder.") for k in weights):
        model.drop_vision()  # a vision_config without vision weights: text only

    quant = config.get("quantization") or config.get("quantization_config") or {}
    default_mode = quant.get("mode", "affine") if isinstance(quant, dict) else "affine"
    if any(k.endswith(".scales") for k in weights):
        nn.quantize(
            model,
            class_predicate=lambda p, m: hasattr(m, "to_quantized")
            and (_quantization_of(m, p, weights, default_mode) or False),
        )

    expected = dict(nn.utils.tree_flatten(model.parameters()))
    if strict:
        missing = sorted(set(expected) - set(weights))
        if missing:
            raise WeightsError(f"{model_path}: missing weight {missing[0]} ({len(missing)} missing in all)")
        extra = sorted(set(weights) - set(expected))
        if extra:
            raise WeightsError(f"{model_path}: unexpected weight {extra[0]} ({len(extra)} unexpected in all)")
    for k, v in weights.items():
        if k in expected and expected[k].shape != v.shape:
            raise WeightsError(
                f"{model_path}: weight {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
            )
    model.load_weights(list(weights.items()), strict=strict)
    model.eval()
    mx.eval(model.parameters())
    backend.defaults(model)
    return model, config


def load_tokenizer(model_path: Union[str, Path], eos_token_ids=None):
    from mlx_lm.tokenizer_utils import load as load_tok

    return load_tok(Path(model_path), eos_token_ids=eos_token_ids)


def load(path_or_hub_id: Union[str, Path], tokenizer: bool = True, adapter_path: Optional[Union[str, Path]] = None):
    """Load ``(model, tokenizer)`` from a converted or Hugging Face DiffusionGemma folder or hub id.

    ``adapter_path``: a folder written by ``python -m mlx_dgemma.lora`` (adapter_config.json
    and adapters.safetensors) to apply on top.
    """
    path = resolve_model_path(path_or_hub_id)
    model, _ = load_model(path)
    model.path = path
    if adapter_path is not None:
        from .tuner.utils import load_adapters

        load_adapters(model, adapter_path)
    if not tokenizer:
        return model, None
    return model, load_tokenizer(path)
