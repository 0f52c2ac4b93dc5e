"""Write the non-weight parts of a converted model folder, the way mlx-lm does.

config.json (sorted, with the ``quantization`` block mirrored as ``quantization_config``),
model.safetensors.index.json, the tokenizer and generation files copied from the source,
and a README model card.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

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
