"""QLoRA at the released shapes: a 4-bit `real-layer` model trained with the real objective.

    python benchmarks/bench_train.py [--iters 1] [--work /tmp/mlx_dgemma_bench] [--out benchmarks/results]
    python benchmarks/bench_train.py --speed      # trainer speed on a small model, 1 vs 2 processes

Builds (once, in --work) the `real-layer` model (the released checkpoint's shapes and
vocabulary, 2 layers: one sliding, one full) with random bfloat16 weights and a byte-level
tokenizer, converts it with ``convert.py -q`` (the mixed recipe: experts at 4 bits, the
rest at 8), then runs ``python -m mlx_dgemma.lora --grad-checkpoint`` on it (LoRA with the
recipe's targets, batch 1: a short prompt and a one-canvas reply). Records seconds per
step, tokens per second and peak memory, and projects the memory of the full 26B
(30 layers) on Macs of 32, 64 and 128 GB:

    peak(26B) = peak(measured) - weights(real-layer) + weights(26B) + 28 x per-layer state

Weights are counted from the shapes at the bits the recipe gives each matrix (4.5 bits
per expert weight with its group scales and biases, 8.5 for the rest, norms in bf16).
With gradient checkpointing a layer keeps, between the forward and the backward pass, only
its input hidden states (encoder and pass-2 decoder), the encoder's K/V that the decoder
reads, and its LoRA parameters with their gradients and Adam moments: that is the
per-layer state (counted from the shapes, float32). Everything else in the measured peak
(the logits over the 262,144-token vocabulary, the recomputed layer's workspace) does not
grow with depth. A Mac lets the GPU wire about 75% of its memory by default (the
``iogpu.wired_limit_mb`` setting raises it); that is the budget used below.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import CONFIGS, OPENBLAS  # noqa: E402

PROMPT = "Summarise: "
REPLY = ("Block diffusion writes a reply 256 tokens at a time. The encoder reads the prompt once; "
         "the decoder then denoises each canvas over a few dozen steps.")


def build(work: Path, log=print) -> Path:
    """The 4-bit real-layer folder (built once)."""
    from mlx_dgemma.convert import convert
    from mlx_dgemma.serving.tiny import write_random_model

    q4 = work / "real-layer-q4"
    if (q4 / "config.json").is_file():
        return q4
    bf16 = work / "real-layer-bf16"
    if not (bf16 / "config.json").is_file():
        log(f"building {bf16} (random bfloat16 weights, about 4.5 GB)")
        text = {**CONFIGS["real-layer"]["text"], "max_position_embeddings": 262144}
        write_random_model(bf16, text, canvas_length=256, dtype="bfloat16", tokenizer=True)
    log(f"converting to {q4} (mixed recipe: experts 4-bit, the rest 8-bit)")
    convert(bf16, q4, quantize=True, q_bits=4, log=log)
    return q4


def write_data(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"messages": [{"role": "user", "content": f"{PROMPT}#{i}"},
                          {"role": "assistant", "content": f"{REPLY} ({i})"}]} for i in range(n)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def weight_bytes(args, layers: int) -> float:
    """Bytes of the mixed-recipe weights for ``layers`` layers of ``args``' shapes."""
    H, E, I, D = args.hidden_size, args.num_experts, args.moe_intermediate_size, args.intermediate_size
    per_bits = {"expert": 4.5, "other": 8.5}
    total = args.vocab_size * H * per_bits["other"] / 8  # tied embeddings / head
    total += 3 * H * D * per_bits["other"] / 8  # self-conditioning MLP
    for i in range(layers):
        full = (i + 1) % 6 == 0 or i == layers - 1
        hd = args.full_head_dim if full else args.head_dim
        kv = args.full_kv_heads if full else args.num_key_value_heads
        attn = H * args.num_attention_heads * hd * 2 + H * kv * hd * (1 if full else 2)
        total += (attn + 3 * H * D + H * E) * per_bits["other"] / 8
        total += 3 * E * H * I * per_bits["expert"] / 8
        total += (9 * H + 2 * hd) * 2  # norms and scales in bf16
    return total


def layer_state_bytes(args, prompt: int, canvas: int, rank: int = 16) -> float:
    """What one more layer keeps alive between forward and backward under checkpointing."""
    H = args.hidden_size
    T = prompt + canvas
    hidden = (T + canvas) * H * 4  # encoder input + pass-2 decoder input, float32
    kv = T * args.num_key_value_heads * args.head_dim * 2 * 4  # a sliding layer's K and V
    lora_in_out = [(H, args.num_attention_heads * args.head_dim), (H, args.num_key_value_heads * args.head_dim),
                   (H, args.num_key_value_heads * args.head_dim), (args.num_attention_heads * args.head_dim, H),
                   (H, args.intermediate_size), (H, args.intermediate_size), (args.intermediate_size, H)]
    lora = sum(rank * (a + b) for a, b in lora_in_out) * 4 * 4  # params, grads, Adam m and v
    return hidden + kv + lora


def speed(work: Path, out: Path, iters: int = 9, batch: int = 32) -> dict:
    """Seconds per full fine-tuning step of the Sudoku recipe's model (2.2M parameters, an
    88-token prompt and canvas, batch 32), in one process and in two ring processes on
    this machine's two cores (MLX's CPU element-wise work is single-threaded)."""
    import random

    from mlx_dgemma.sudoku import data, recipe

    model = recipe.write_initial_model(work / "sudoku-init")
    pairs = data.make_puzzles(data.HELDOUT_EASY, 2 * batch, "seeded", "random", seed=123)
    folder = work / "sudoku-data"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(data.chat_line(p, s) + "\n" for p, s in pairs))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if os.path.exists(OPENBLAS):
        env["LD_PRELOAD"] = OPENBLAS
    cmd = ["-m", "mlx_dgemma.lora", "--model", str(model), "--train", "--data", str(folder), "--fine-tune-type",
           "full", "--batch-size", str(batch), "--iters", str(iters), "--steps-per-report", "3", "--save-every",
           "1000", "--learning-rate", "1e-3", "--no-plot"]
    launch = [str(Path(sys.executable).with_name("mlx.launch")), "-n", "2", "--backend", "ring", "--starting-port",
              str(random.randint(20000, 40000)), "--env", f"PYTHONPATH={ROOT}", "--env",
              f"LD_PRELOAD={env.get('LD_PRELOAD', '')}", "--python", sys.executable, "--"]
    result = {"what": "full fine-tuning step, Sudoku recipe model, batch 32 (88-token prompt, 88-token canvas)"}
    for name, prefix in (("one process", [sys.executable]), ("two ring processes", launch)):
        ad = work / f"speed-{name.split()[0]}"
        load = os.getloadavg()
        run = subprocess.run(prefix + cmd + ["--adapter-path", str(ad)], env=env, capture_output=True, text=True)
        run.check_returncode()
        reports = [h for h in json.loads((ad / "losses.json").read_text()) if "train_loss" in h]
        # the first report includes compiling the step
        result[name] = {"seconds_per_step": [round(1 / r["iterations_per_second"], 2) for r in reports],
                        "tokens_per_second": round(reports[-1]["tokens_per_second"], 1),
                        "load_before": [round(x, 2) for x in load]}
    from mlx_dgemma import load as load_model

    m, _ = load_model(model, tokenizer=False)
    from mlx.utils import tree_flatten

    result["parameters"] = sum(v.size for _, v in tree_flatten(m.parameters()))
    (out / "train_speed.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=1,
                    help="optimizer steps (one takes about half an hour on a 2-core CPU: quantized matmuls "
                         "run at ~2-5 GFLOP/s there, and the tied head alone is 0.74 GMAC per token)")
    ap.add_argument("--work", default="/tmp/mlx_dgemma_bench")
    ap.add_argument("--model", default=None, help="train this folder instead of building the real-layer one")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args()
    work = Path(a.work)
    q4 = Path(a.model) if a.model else build(work)
    data = write_data(work / "train-data")
    ad = work / "train-adapters"
    cfg = work / "train-config.yaml"
    cfg.write_text("pad_to: 8\n")  # no padding past prompt + canvas: every token costs here
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if os.path.exists(OPENBLAS):
        env["LD_PRELOAD"] = OPENBLAS
    cmd = [sys.executable, "-m", "mlx_dgemma.lora", "--model", str(q4), "--train", "--data", str(data),
           "--grad-checkpoint", "--batch-size", "1", "--iters", str(a.iters), "--steps-per-report", "1",
           "--save-every", "1000", "--adapter-path", str(ad), "--learning-rate", "1e-4", "-c", str(cfg)]
    load = os.getloadavg()
    tic = time.time()
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - tic
    print(run.stdout[-3000:], run.stderr[-3000:])
    run.check_returncode()
    reports = [h for h in json.loads((ad / "losses.json").read_text()) if "train_loss" in h]

    from mlx_dgemma.config import ModelArgs, read_config

    small = ModelArgs.from_config(read_config(q4))
    full = ModelArgs(num_hidden_layers=30)
    from mlx_dgemma import load as load_model
    from mlx_dgemma.tuner.datasets import load_split

    _, tok = load_model(q4)
    ex = load_split(data / "train.jsonl", tok)[0]
    prompt = len(ex.prompt)
    steady = reports[1:] or reports
    peak = max(r["peak_memory"] for r in reports) * 1e9
    n = small.num_hidden_layers
    w_small, w_full = weight_bytes(small, n), weight_bytes(full, 30)
    per_layer = layer_state_bytes(full, prompt, full.canvas_length)
    projected = peak - w_small + w_full + (30 - n) * per_layer
    macs = {f"{gb} GB": {"budget_gb": round(0.75 * gb, 1), "fits": projected / 1e9 <= 0.75 * gb} for gb in (32, 64, 128)}
    result = {
        "what": "QLoRA (recipe LoRA targets, rank 16) with --grad-checkpoint on the 4-bit real-layer model",
        "machine": "Linux x86-64, 2 shared cores, MLX 0.32.4 CPU backend (OpenBLAS preloaded)",
        "load_before": [round(x, 2) for x in load],
        "prompt_tokens": prompt, "canvas": small.canvas_length, "batch": 1,
        "seconds_per_step": [round(1 / r["iterations_per_second"], 1) for r in reports],
        "tokens_per_second": round(sum(r["tokens_per_second"] for r in steady) / len(steady), 2),
        "peak_memory_gb": round(peak / 1e9, 2),
        "losses": [round(r["train_loss"], 3) for r in reports],
        "wall_s": round(wall, 1),
        "weights_gb": {"real-layer": round(w_small / 1e9, 2), "26B": round(w_full / 1e9, 2)},
        "per_layer_state_mb": round(per_layer / 1e6, 1),
        "projected_26B_peak_gb": round(projected / 1e9, 1),
        "macs": macs,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
