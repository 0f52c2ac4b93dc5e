"""Model folders in the converted layout (mlx-lm / mlx-vlm style).

The converter's pieces: config.json (sorted, with the ``quantization`` block mirrored as
``quantization_config``), model.safetensors.index.json, the tokenizer and generation files
copied from the source, and a README model card.

The one builder of folders made in Python (the demo, trained models, fused adapters and
test fixtures): ``hf_weights`` maps our module tree to the folder's key names and
``write_model_folder`` writes a whole folder atomically.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

from mlx_lm.utils import save_config

# Written by the converter itself, never copied from the source.
_NOT_COPIED = {"config.json", "model.safetensors.index.json", "README.md"}
_COPIED_SUFFIXES = (".json", ".jinja", ".model", ".txt")


def write_config(config: Dict[str, Any], path: Path, quantization: Optional[Dict[str, Any]]) -> None:
    """The source config plus the quantization block (mlx-lm's save_config, vision_config kept)."""
    config = copy.deepcopy(config)
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    if quantization is not None:
        config["quantization"] = quantization
    # mlx-vlm needs vision_config to rebuild the vision tower, which the folder keeps.
    save_config(config, config_path=path / "config.json", keep_vision_config=True)


def write_index(path: Path, weight_map: Dict[str, str], total_size: int, total_parameters: int) -> None:
    index = {
        "metadata": {"total_size": total_size, "total_parameters": total_parameters},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def copy_support_files(src: Path, dst: Path) -> List[str]:
    """Tokenizer files, chat_template.jinja, generation_config.json and other small configs."""
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in _NOT_COPIED and f.name.endswith(_COPIED_SUFFIXES):
            shutil.copyfile(f, dst / f.name)
            copied.append(f.name)
    return copied


def _front_matter(readme: Path) -> Dict[str, str]:
    """The simple ``key: value`` lines of a model card's YAML header (no YAML parser needed)."""
    if not readme.is_file():
        return {}
    lines = readme.read_text(errors="replace").splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    out = {}
    for line in lines[1:]:
        if line.strip() == "---":
            break
        if ":" in line and not line.startswith((" ", "-")):
            k, v = line.split(":", 1)
            if v.strip():
                out[k.strip()] = v.strip()
    return out


def write_model_card(
    dst: Path,
    name: str,
    src: Path,
    hub_id: Optional[str],
    precision: str,
    vision_tensors: int,
) -> None:
    """README.md in ``dst`` for the folder to be called ``name``: where the weights came from,
    their precision, and how to run them."""
    meta = _front_matter(src / "README.md")
    base = hub_id or meta.get("base_model")
    header = ["---", "library_name: mlx", "pipeline_tag: text-generation"]
    if "license" in meta:
        header.append(f"license: {meta['license']}")
    if base:
        header.append(f"base_model: {base}")
        header.append("base_model_relation: quantized")
    header += ["tags:", "- mlx", "- diffusion-gemma", "- block-diffusion", "---", ""]
    source = f"[{base}](https://huggingface.co/{base})" if base else f"`{src.name}`"
    vision = (
        f"The vision tower ({vision_tensors} tensors) is kept unquantized and unchanged, "
        "so mlx-vlm can use image input; the mlx_dgemma text model does not load it.\n\n"
        if vision_tensors
        else ""
    )
    body = f"""# {name}

DiffusionGemma (block diffusion) converted to MLX from {source} with
mlx_dgemma's `convert.py`. Weights: {precision}.

The layout is that of mlx-lm / mlx-vlm conversions (Hugging Face key names, fused
`experts.gate_up_proj`, quantization block in config.json), so this folder loads in
mlx_dgemma and in mlx-vlm alike. {vision}## Use with mlx_dgemma

```bash
python -m mlx_dgemma.generate --model {name} --prompt "Why is the sky blue?"
```

```python
import mlx_dgemma

model, tokenizer = mlx_dgemma.load("{name}")
print(mlx_dgemma.generate(model, tokenizer, "Why is the sky blue?"))
```
"""
    (dst / "README.md").write_text("\n".join(header) + body)


# ---------------------------------------------------------------------------------------
# The one builder of model folders made in Python (demo, trained models, fused adapters,
# test fixtures): the converted layout, written atomically.

ENCODER, DECODER = "model.encoder.language_model.", "model.decoder."


def hf_weights(params: Dict[str, Any]) -> Dict[str, Any]:
    """Our module tree's flat parameters -> the folder's Hugging Face key names.

    The inverse of ``Model.sanitize``: SwitchGLU's ``gate_proj``/``up_proj`` are fused
    back into ``experts.gate_up_proj`` (``.weight``, and ``.scales``/``.biases`` when
    quantized), ``down_proj`` moves to ``experts.down_proj``, and the encoder's layer
    scalars go back under the encoder prefix.
    """
    import mlx.core as mx

    out = {}
    for k, v in params.items():
        if ".experts.switch_glu." in k:
            base, rest = k.split(".experts.switch_glu.")
            proj, suffix = rest.split(".", 1)
            if proj == "gate_proj":
                up = params[f"{base}.experts.switch_glu.up_proj.{suffix}"]
                out[f"{base}.experts.gate_up_proj.{suffix}"] = mx.concatenate([v, up], axis=-2)
            elif proj == "down_proj":
                out[f"{base}.experts.down_proj.{suffix}"] = v
            continue
        if k.endswith(".encoder_layer_scalar"):
            out[ENCODER + k[len(DECODER): -len("encoder_layer_scalar")] + "layer_scalar"] = v
            continue
        out[k] = v
    return out


def transformers_weights(weights: Dict[str, Any]) -> Dict[str, Any]:
    """Folder key names -> transformers' parameter names: the same, except that the fused
    experts are bare parameters there (``experts.gate_up_proj``, no ``.weight``). Only
    floating-point weights have a transformers name (quantized folders must be
    dequantized first)."""
    out = {}
    for k, v in weights.items():
        if k.endswith((".scales", ".biases")):
            raise ValueError(f"{k}: transformers cannot load MLX-quantized weights (dequantize first)")
        for name in ("gate_up_proj", "down_proj"):
            suffix = f".experts.{name}.weight"
            if k.endswith(suffix):
                k = k[: -len(".weight")]
        out[k] = v
    return out


def write_model_folder(
    path: Union[str, Path],
    config: Dict[str, Any],
    weights: Dict[str, Any],
    *,
    tokenizer: Optional[Callable[[Path], None]] = None,
    chat_template: Optional[str] = None,
    generation_config: Optional[Dict[str, Any]] = None,
    readme: Optional[str] = None,
    shards: int = 1,
    extra_files: Optional[Dict[str, Union[str, bytes]]] = None,
) -> Path:
    """Write a complete model folder at ``path`` (replacing it), atomically.

    ``weights``: arrays (MLX or NumPy) under the folder's key names (``hf_weights`` maps
    our module tree to them). ``tokenizer``: a callable that writes the tokenizer files
    into the folder it is given. Everything goes into a temporary folder beside ``path``
    that is renamed into place only when complete, so a failure leaves nothing behind.
    """
    import mlx.core as mx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.writing-", dir=str(path.parent)))
    try:
        arrays = {k: v if isinstance(v, mx.array) else mx.array(v) for k, v in weights.items()}
        keys = sorted(arrays)
        n = max(1, min(int(shards), len(keys)))
        weight_map = {}
        for i in range(n):
            name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            part = {k: arrays[k] for k in keys[i::n]}
            mx.save_safetensors(str(tmp / name), part, metadata={"format": "mlx"})
            weight_map.update({k: name for k in part})
        write_index(tmp, weight_map, sum(a.nbytes for a in arrays.values()),
                    sum(a.size for a in arrays.values()))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        if generation_config is not None:
            gen = dict(generation_config)
            if isinstance(gen.get("sampler_config"), dict):
                # transformers' DiffusionGemmaGenerationConfig finds the dataclass by this name
                gen["sampler_config"] = {"_cls_name": "EntropyBoundSamplerConfig", **gen["sampler_config"]}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if tokenizer is not None:
            tokenizer(tmp)
        if chat_template is not None:
            (tmp / "chat_template.jinja").write_text(chat_template)
        if readme is not None:
            (tmp / "README.md").write_text(readme)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data) if isinstance(data, bytes) else (tmp / name).write_text(data)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the final folder private
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=str(path.parent)))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
