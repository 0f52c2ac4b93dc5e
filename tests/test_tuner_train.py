"""Fine-tuning end to end: learning, fuse, export to transformers, what trains, bad input,
saves, Ctrl-C and resume (python -m mlx_dgemma.lora / mlx_dgemma.fuse on tiny models)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_dgemma
from mlx_dgemma import fuse, lora
from mlx_dgemma.serving.tiny import byte_vocab_size, write_random_model

ROOT = Path(__file__).resolve().parent.parent

TEXT = dict(vocab_size=byte_vocab_size(), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
            num_global_key_value_heads=1, sliding_window=32, num_experts=4, top_k_experts=2,
            moe_intermediate_size=32, layer_types=["sliding_attention", "full_attention"],
            max_position_embeddings=4096)
PAIRS = [("What is the capital of France?", "Paris"), ("Say hi.", "Hi!"), ("2+2?", "4"), ("Color of the sky?", "Blue")]


def tiny_model(path, canvas=8, **over):
    return write_random_model(path, {**TEXT, **over}, canvas_length=canvas, tokenizer=True,
                              generation={"max_denoising_steps": 8})


def chat(p, r):
    return {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}


def write_data(folder, train, valid=None, test=None):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("valid", valid), ("test", test)):
        if rows is not None:
            (folder / f"{name}.jsonl").write_text("".join(
                (r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return folder


def run_lora(*argv):
    return lora.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def test_lora_learns_the_replies_and_survives_fuse_and_export(tmp_path):
    """LoRA (the recipe's targets, rank 16, alpha 32) on a random tiny model, four chat
    examples: afterwards the sampler writes each training prompt's reply with the
    adapters and not without; likewise after fuse, and in transformers after --export-hf."""
    model_dir = tiny_model(tmp_path / "m")
    data = write_data(tmp_path / "data", [chat(p, r) for p, r in PAIRS])
    (tmp_path / "c.yaml").write_text("lr_schedule: constant\n")
    ad = tmp_path / "ad"
    assert run_lora("--model", model_dir, "--train", "--data", data, "--iters", 400, "--batch-size", 4,
                    "--learning-rate", "1e-2", "--steps-per-report", 100, "--save-every", 1000,
                    "--adapter-path", ad, "-c", tmp_path / "c.yaml", "--no-plot") == 0

    def replies(model, tok):
        return [mlx_dgemma.generate(model, tok, p, max_tokens=16, seed=0) for p, _ in PAIRS]

    want = [r for _, r in PAIRS]
    assert replies(*mlx_dgemma.load(model_dir, adapter_path=ad)) == want
    base = replies(*mlx_dgemma.load(model_dir))
    assert not any(b == w for b, w in zip(base, want)), base

    assert fuse.main(["--model", str(model_dir), "--adapter-path", str(ad), "--save-path", str(tmp_path / "fused")]) == 0
    fused, tok = mlx_dgemma.load(tmp_path / "fused")
    assert not any("lora" in k for k, _ in tree_flatten(fused.parameters()))
    assert replies(fused, tok) == want

    hf_dir = tmp_path / "hf"
    assert fuse.main(["--model", str(model_dir), "--adapter-path", str(ad), "--save-path", str(hf_dir),
                      "--export-hf", "--hf-dtype", "float32"]) == 0
    import torch
    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

    hf, info = DiffusionGemmaForBlockDiffusion.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert all(".vision_tower." in k or ".embed_vision." in k for k in info["missing_keys"]), info["missing_keys"]
    htok = AutoTokenizer.from_pretrained(hf_dir)
    eos = set(hf.generation_config.eos_token_id)
    got = []
    for p, _ in PAIRS:
        ids = htok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       enable_thinking=False, return_tensors="pt", return_dict=True)["input_ids"]
        torch.manual_seed(0)
        out = hf.generate(ids, max_new_tokens=8)
        out = getattr(out, "sequences", out)[0, ids.shape[1]:].tolist()
        out = out[: next((i for i, t in enumerate(out) if t in eos), len(out))]
        got.append(htok.decode(out, skip_special_tokens=True))
    assert got == want
