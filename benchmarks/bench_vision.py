"""Prefill with one image against the same prompt without it: time and peak memory.

    python benchmarks/bench_vision.py [--config mid] [--max-soft-tokens 280] [--text-tokens 64]
        [--repeats 3] [--warmup 1] [--out benchmarks/results/vision]

Random float32 weights: the text model of ``--config`` (benchmarks/common.py) and Gemma 4's
default vision tower (transformers' Gemma4VisionConfig: hidden 768, 16 layers, 12 heads of
64, MLP 3072, 16 px patches, 3 x 3 pooling). One 640 x 480 picture, resized to the
soft-token budget (280: 2,520 patches -> 280 soft tokens).

Per case, medians over ``--repeats`` after ``--warmup``: the image processor (Pillow
resize, patches), the vision tower (+ embedder), the encoder pass over the prompt (text:
``--text-tokens`` tokens; image: the same + boi + soft tokens + eoi) and their sum; MLX's
peak memory during the case (weights included; ``weights_gb`` says how much they are).
Writes ``vision.json`` and ``vision.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import mlx_dgemma  # noqa: E402,F401  (first: loads OpenBLAS for MLX's CPU matmuls)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.common import CONFIGS  # noqa: E402
from mlx_dgemma.config import ModelArgs, small_model_config  # noqa: E402
from mlx_dgemma.image_processor import process_image  # noqa: E402
from mlx_dgemma import backend  # noqa: E402
from mlx_dgemma.model import build_model  # noqa: E402

# transformers' Gemma4VisionConfig defaults
VISION = dict(model_type="gemma4_vision", hidden_size=768, intermediate_size=3072, num_hidden_layers=16,
              num_attention_heads=12, num_key_value_heads=12, head_dim=64, patch_size=16, pooling_kernel_size=3,
              position_embedding_size=10240, rope_parameters={"rope_type": "axial", "rope_theta": 100.0})


def build(config: str) -> Model:
    c = CONFIGS[config]
    from tests.reference.hf_reference import TINY_TEXT

    text = {**TINY_TEXT, **c["text"]}
    V = text["vocab_size"]
    cfg = small_model_config(
        vocab_size=V, canvas_length=c["canvas_length"], hidden_size=text["hidden_size"],
        num_hidden_layers=text["num_hidden_layers"], intermediate_size=text["intermediate_size"],
        num_attention_heads=text["num_attention_heads"], head_dim=text["head_dim"], num_experts=text["num_experts"],
        top_k_experts=text["top_k_experts"], moe_intermediate_size=text["moe_intermediate_size"],
        sliding_window=text["sliding_window"], max_position_embeddings=32768, eos_token_id=1, pad_token_id=0,
        bos_token_id=2, vision_config=VISION, boi_token_id=V - 3, image_token_id=V - 2, eoi_token_id=V - 1)
    cfg["text_config"]["use_bidirectional_attention"] = "vision"
    mx.random.seed(0)
    model = build_model(ModelArgs.from_config(cfg))
    mx.eval(model.parameters())
    return backend.defaults(model)


def picture(w: int = 640, h: int = 480) -> Image.Image:
    rs = np.random.RandomState(0)
    return Image.fromarray(rs.randint(0, 256, (h, w, 3)).astype(np.uint8))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="mid", choices=sorted(CONFIGS))
    ap.add_argument("--max-soft-tokens", type=int, default=280)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--sdpa", action="store_true",
                    help="attention through MLX's SDPA instead of the C kernel (the CPU default)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vision"))
    args = ap.parse_args(argv)

    model = build(args.config)
    if args.sdpa:
        backend.configure(model, attention=False)
    a = model.args
    weights_gb = sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 2**30
    vision = model.model.encoder.vision_tower.args
    img = picture()
    text = np.random.RandomState(1).randint(3, a.vocab_size - 3, args.text_tokens).tolist()

    def run(with_image: bool) -> dict:
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        feats = None
        ids = text
        t1 = t2 = t0
        if with_image:
            p = process_image(img, vision.patch_size, vision.pooling_kernel_size, args.max_soft_tokens)
            t1 = time.perf_counter()
            feats = model.image_features(p.patches, p.positions)  # evaluated
            t2 = time.perf_counter()
            ids = [a.boi_token_id] + [a.image_token_id] * p.num_soft_tokens + [a.eoi_token_id] + text
        cache = model.make_cache()
        model.encode(mx.array([ids]), cache, image_features=feats)
        mx.eval([c.state for c in cache])
        t3 = time.perf_counter()
        return dict(processor=t1 - t0, tower=t2 - t1, encode=t3 - t2, total=t3 - t0,
                    peak_gb=mx.get_peak_memory() / 2**30, prompt_tokens=len(ids))

    results = {}
    for case, with_image in (("text", False), ("image", True)):
        runs = [run(with_image) for _ in range(args.warmup + args.repeats)][args.warmup:]
        med = {k: statistics.median(r[k] for r in runs) for k in ("processor", "tower", "encode", "total")}
        results[case] = {**{f"{k}_ms": round(1000 * v, 1) for k, v in med.items()},
                         "peak_gb": round(max(r["peak_gb"] for r in runs), 3),
                         "prompt_tokens": runs[0]["prompt_tokens"],
                         "all_total_ms": [round(1000 * r["total"], 1) for r in runs]}
        print(case, results[case], flush=True)

    meta = dict(command="python benchmarks/bench_vision.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                config=args.config, vision=VISION, max_soft_tokens=args.max_soft_tokens, image="640x480 random RGB",
                weights_gb=round(weights_gb, 3), repeats=args.repeats, warmup=args.warmup,
                attention="C kernel" if backend.settings(model)["attention"] else "MLX SDPA",
                machine=f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, MLX {mx.__version__} "
                        f"({mx.default_device()})",
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "vision.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    tmp.replace(out / "vision.json")
    rows = ["| case | prompt tokens | processor ms | tower ms | encode ms | total ms | peak GB |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for case, r in results.items():
        rows.append(f"| {case} | {r['prompt_tokens']} | {r['processor_ms']} | {r['tower_ms']} | {r['encode_ms']} | "
                    f"{r['total_ms']} | {r['peak_gb']} |")
    md = (f"# Prefill with one image (`{meta['command']}`)\n\n{meta['machine']}, {meta['date']}; config "
          f"{args.config} + Gemma 4's default vision tower, float32 random weights ({meta['weights_gb']} GB), "
          f"attention: {meta['attention']}; "
          f"medians of {args.repeats} after {args.warmup} warm-up; peak = MLX's peak memory during the case, "
          "weights included.\n\n" + "\n".join(rows) + "\n")
    tmp = out / "vision.md.tmp"
    tmp.write_text(md)
    tmp.replace(out / "vision.md")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
