"""What trains, and the adapter files (mlx-lm's names and layout).

``adapters.safetensors`` holds the trained tensors under our module tree's names (LoRA's
``lora_a``/``lora_b``, DoRA's ``m`` too, or every trained weight for full fine-tuning);
``adapter_config.json`` holds the run's settings, as mlx-lm writes them, plus
``base_model``: the shapes of the model the adapters were made for, so that loading them
into another model fails with a one-line error instead of a broadcasting one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .. import backend
from ..model import Model
from ..errors import AdapterError, WeightsError  # noqa: F401  (AdapterError: raised here)

# The recipe's LoRA targets (NeMo AutoModel diffusion_gemma_lora.yaml): attention and the
# dense MLP. Full-attention layers have no v_proj (K = V) and are simply skipped for it.
LORA_KEYS = [
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
]
# Optional: the routed experts too (mlx-lm's LoRASwitchLinear).
EXPERT_KEYS = ["experts.switch_glu.gate_proj", "experts.switch_glu.up_proj", "experts.switch_glu.down_proj"]
# rank 16, alpha 32: mlx-lm's ``scale`` is alpha / rank.
DEFAULT_LORA = {"rank": 16, "scale": 2.0, "dropout": 0.0, "keys": LORA_KEYS}

ADAPTER_FILE, CONFIG_FILE = "adapters.safetensors", "adapter_config.json"
_SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "num_key_value_heads",
               "full_head_dim", "full_kv_heads", "intermediate_size", "moe_intermediate_size", "num_experts",
               "vocab_size")


def base_model_shapes(model: Model) -> Dict[str, int]:
    return {k: getattr(model.args, k) for k in _SHAPE_KEYS}


def freeze_untrained(model: Model) -> None:
    """The recipe never trains the MoE router; the layer scalars are buffers in the reference."""
    for layer in model.layers:
        layer.router.freeze()
        layer.freeze(keys=["layer_scalar", "encoder_layer_scalar"], recurse=False)


def setup_fine_tuning(model: Model, fine_tune_type: str = "lora", num_layers: int = -1,
                      lora_parameters: Optional[Dict[str, Any]] = None) -> Model:
    """Freeze the model and make trainable what ``fine_tune_type`` trains in the last
    ``num_layers`` layers (-1: all). ``full`` with every layer also trains the embeddings
    (tied to the head), the final norm and the self-conditioning block: everything but
    the router (and the layer-scalar buffers)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    n = len(model.layers)
    if num_layers > n:
        raise ValueError(f"--num-layers {num_layers}: the model has only {n} layers")
    if num_layers == 0 or num_layers < -1:
        raise ValueError(f"--num-layers must be -1 (all) or between 1 and {n}, got {num_layers}")
    model.freeze()
    if fine_tune_type == "full":
        if num_layers == -1 or num_layers == n:
            model.unfreeze()
        else:
            for layer in model.layers[-num_layers:]:
                layer.unfreeze()
        freeze_untrained(model)
    elif fine_tune_type in ("lora", "dora"):
        params = {**DEFAULT_LORA, **(lora_parameters or {})}
        linear_to_lora_layers(model, num_layers, params, use_dora=fine_tune_type == "dora")
        if any(k.startswith("experts.") for k in params["keys"]):
            backend.configure(model, experts="gather")  # the CPU's grouped experts read base weights directly
    else:
        raise ValueError(f"--fine-tune-type must be lora, dora or full, got {fine_tune_type!r}")
    return model


def atomic_write(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` into a temporary file beside ``path``, then rename
    (never half-written), with the permissions a plain ``open`` would give it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=str(path.parent))
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the file private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_adapters(model: nn.Module, path: Union[str, Path]) -> Path:
    """The trainable parameters into ``path`` (a .safetensors file), atomically."""
    path = Path(path)
    weights = dict(tree_flatten(model.trainable_parameters()))
    atomic_write(path, lambda tmp: mx.save_safetensors(tmp, weights))
    return path


def save_optimizer_state(optimizer, path: Union[str, Path], iteration: int, dtype=None) -> Path:
    """The optimizer's state (its step, Adam's moments ...) into ``path`` (.safetensors),
    atomically, with the total ``iteration`` it belongs to in the metadata. ``dtype``: store
    the floating-point tensors in it (bfloat16 halves a checkpoint; the step stays exact)."""
    path = Path(path)
    flat = dict(tree_flatten(optimizer.state))
    if dtype is not None:
        flat = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and v.ndim else v for k, v in flat.items()}
    meta = {"iteration": str(int(iteration))}
    atomic_write(path, lambda tmp: mx.save_safetensors(tmp, flat, metadata=meta))
    return path


def load_optimizer_state(optimizer, path: Union[str, Path]) -> int:
    """Restore ``save_optimizer_state``'s file into ``optimizer`` (in float32 where it was
    stored lower); returns the iteration it was saved at."""
    from mlx.utils import tree_unflatten

    path = Path(path)
    try:
        flat, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise AdapterError(f"{path}: not an optimizer state file ({e})".splitlines()[0]) from None
    if "iteration" not in meta:
        raise AdapterError(f"{path}: no iteration in its metadata (not written by save_optimizer_state)")
    flat = {k: v.astype(mx.float32) if v.dtype in (mx.bfloat16, mx.float16) else v for k, v in flat.items()}
    optimizer.state = tree_unflatten(list(flat.items()))
    return int(meta["iteration"])


def numbered_adapter_file(adapter_file: Union[str, Path], iteration: int) -> Path:
    """The copy of ``adapter_file`` saved at ``iteration`` (mlx-lm's naming: ``0000100_adapters.safetensors``)."""
    adapter_file = Path(adapter_file)
    return adapter_file.parent / f"{iteration:07d}_{adapter_file.name}"


def save_adapter_config(config: Dict[str, Any], model: Model, path: Union[str, Path]) -> Path:
    path = Path(path)
    config = {k: v for k, v in config.items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}
    config["base_model"] = base_model_shapes(model)
    text = json.dumps(config, indent=4, sort_keys=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def check_adapter_weights(model: nn.Module, weights: Dict[str, mx.array], source: Union[str, Path],
                          full: bool) -> None:
    """Every tensor must be a trainable parameter of ``model`` with the same shape."""
    params = dict(tree_flatten(model.parameters()))
    leaves = {"lora_a", "lora_b", "m"}
    for name, w in sorted(weights.items()):
        p = params.get(name)
        if p is None or not (full or name.rsplit(".", 1)[-1] in leaves):
            what = "a weight" if full else "an adapter tensor"
            raise AdapterError(f"{source}: {name} is not {what} of this model (adapters made for another model or "
                               "fine-tune type?)")
        if tuple(p.shape) != tuple(w.shape):
            raise AdapterError(f"{source}: {name} has shape {tuple(w.shape)}, this model expects {tuple(p.shape)} "
                               "(adapters made for another model or rank?)")


def read_adapter_weights(path: Union[str, Path]) -> Dict[str, mx.array]:
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: no such adapter file")
    try:
        return mx.load(str(path))
    except Exception as e:
        raise AdapterError(f"{path}: not a safetensors file ({e})".splitlines()[0]) from None


def load_adapters(model: Model, adapter_path: Union[str, Path]) -> Model:
    """Apply the adapters in ``adapter_path`` (adapter_config.json + adapters.safetensors)."""
    folder = Path(adapter_path)
    cfg_path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise AdapterError(f"--adapter-path {folder}: not a folder")
    if not cfg_path.is_file():
        raise AdapterError(f"{cfg_path}: missing (an adapter folder holds {CONFIG_FILE} and {ADAPTER_FILE})")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{cfg_path}: not valid JSON ({e})".splitlines()[0]) from None
    shapes = config.get("base_model") or {}
    for k, v in shapes.items():
        mine = getattr(model.args, k, None)
        if mine is not None and mine != v:
            raise AdapterError(f"{cfg_path}: made for a model with {k} {v}, this model has {mine}")
    kind = config.get("fine_tune_type", "lora")
    weights = read_adapter_weights(folder / ADAPTER_FILE)
    if kind != "full":
        setup_fine_tuning(model, kind, config.get("num_layers", -1), config.get("lora_parameters"))
    check_adapter_weights(model, weights, folder / ADAPTER_FILE, full=kind == "full")
    model.load_weights(list(weights.items()), strict=False)
    model.freeze()
    model.eval()
    mx.eval(model.parameters())
    return model
