"""``python -m mlx_dgemma.fuse``: merge fine-tuned adapters into a model folder.

mlx-lm's ``mlx_lm.fuse`` for DiffusionGemma: the adapters of ``--adapter-path`` are
applied and merged into the weights (LoRA/DoRA layers become plain, or re-quantized,
layers; full fine-tuning weights replace the base ones), and the folder is written
through ``folder.write_model_folder`` with the source's tokenizer and generation files.

- default: the converted MLX layout, quantized as the source was (QLoRA stays 4-bit);
- ``--dequantize`` (or ``--de-quantize``): every quantized layer back to floating point;
- ``--export-hf``: the Hugging Face layout in ``--hf-dtype`` (bfloat16 or float32) that
  transformers' ``DiffusionGemmaForBlockDiffusion.from_pretrained`` loads (and so vLLM
  and NeMo); it implies ``--dequantize``.

The source's vision tower weights (kept by converted folders) are passed through as they
are, so the fused folder still loads in mlx-vlm.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fuse fine-tuned adapters into a DiffusionGemma model folder.")
    p.add_argument("--model", default="mlx_model", help="The base model folder (default: %(default)s).")
    p.add_argument("--save-path", default="fused_model", help="Where to write the fused folder (default: %(default)s).")
    p.add_argument("--adapter-path", default="adapters",
                   help="The adapters' folder (adapter_config.json, adapters.safetensors; default: %(default)s); "
                        "'' for none: --export-hf then converts the model folder as it is.")
    p.add_argument("--dequantize", "--de-quantize", dest="dequantize", action="store_true",
                   help="Write floating-point weights even if the model is quantized.")
    p.add_argument("--export-hf", action="store_true",
                   help="Write the Hugging Face layout (transformers' DiffusionGemmaForBlockDiffusion).")
    p.add_argument("--hf-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="Weight dtype of --export-hf (default: %(default)s).")
    return p


def fuse_model(model, dequantize: bool = False):
    """Replace every adapter layer by its merged layer (mlx-lm's ``fuse`` per layer): on a
    quantized base the merged weight is quantized again unless ``dequantize``."""
    from mlx.utils import tree_unflatten

    fused = [(n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return model


def passthrough_weights(src: Path) -> dict:
    """Source tensors our text model does not load (the vision tower), unchanged."""
    import mlx.core as mx

    from .loader import weight_files

    out = {}
    for f in weight_files(src):
        for k, v in mx.load(str(f)).items():
            if k.startswith(("model.encoder.vision_tower.", "model.encoder.embed_vision.")):
                out[k] = v
    return out


def fuse(model_path, adapter_path, save_path, dequantize: bool = False, export_hf: bool = False,
         hf_dtype: str = "bfloat16", log=print) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model

    from .config import read_config
    from .folder import copy_support_files, hf_weights, transformers_weights, write_model_folder
    from .loader import load, resolve_model_path

    src = resolve_model_path(model_path)
    adapter_path = adapter_path or None  # none: export or dequantize the folder as it is
    log(f"Loading {src}" + (f" with the adapters in {adapter_path}" if adapter_path else " (no adapters)"))
    model, _ = load(src, tokenizer=False, adapter_path=adapter_path)
    model = fuse_model(model, dequantize or export_hf)
    config = read_config(src)
    if dequantize or export_hf:
        log("Dequantizing")
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    weights = hf_weights(dict(tree_flatten(model.parameters())))
    weights.update(passthrough_weights(src))
    if export_hf:
        dtype = getattr(mx, hf_dtype)
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
                   for k, v in transformers_weights(weights).items()}
        config["dtype"] = config["torch_dtype"] = hf_dtype
    out = write_model_folder(save_path, config, weights, tokenizer=lambda dst: copy_support_files(src, dst),
                             shards=max(1, -(-sum(v.nbytes for v in weights.values()) // (5 << 30))))
    log(f"Fused model written to {out}" + (" (Hugging Face layout, " + hf_dtype + ")" if export_hf else ""))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    from .errors import ConfigError, WeightsError

    args = build_parser().parse_args(argv)
    try:
        fuse(args.model, args.adapter_path, args.save_path, args.dequantize, args.export_hf, args.hf_dtype)
    except (ConfigError, WeightsError, OSError) as e:
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
