"""QLoRA at the released shapes: a 4-bit `real-layer` model trained with the real objective.

    python benchmarks/bench_train.py [--canvases 16,48] [--work /tmp/mlx_dgemma_bench] [--out benchmarks/results]
    python benchmarks/bench_train.py --speed      # trainer speed on a small model, 1 vs 2 processes

Builds (once, in --work) the `real-layer` model (the released checkpoint's shapes and
vocabulary, 2 layers: one sliding, one full) with random bfloat16 weights and a byte-level
tokenizer and converts it with ``convert.py -q`` (the mixed recipe: experts at 4 bits, the
rest at 8). Then, once per canvas length, it trains it for one step as ``python -m
mlx_dgemma.lora --grad-checkpoint`` does (LoRA with the recipe's targets, Adam with its
betas, batch 1, a reply of one canvas), each in its own process, and records the seconds,
tokens per second and peak memory.

Why short canvases: on this CPU quantized matmuls run at 1-3 GFLOP/s and the tied head
alone is 0.74 GMAC per token; one step at the released canvas (256) takes about an hour
(two such runs were stopped from outside on the shared machine). Everything the step
holds beyond the weights grows linearly with the rows that pass through the network:
``rows = prompt + canvas`` (encoder) ``+ 2 x canvas`` (the two decoder passes). Two canvas
lengths give that line; it is extrapolated to the released canvas and a 64-token prompt:

    peak(26B) = line(rows at 256) - weights(real-layer) + weights(26B) + 28 x per-layer state

Weights are counted from the shapes at the bits the recipe gives each matrix (4.5 bits
per expert weight with its group scales and biases, 8.5 for the rest, norms in bf16).
With gradient checkpointing a layer keeps, between the forward and the backward pass, only
its input hidden states (encoder and pass-2 decoder), the encoder's K/V that the decoder
reads, and its LoRA parameters with their gradients and Adam moments: that is the
per-layer state (counted from the shapes, float32). The rest of the measured peak (the
logits over the 262,144-token vocabulary, the recomputed layer's workspace) does not grow
with depth. A Mac lets the GPU wire about 75% of its memory by default (the
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

import mlx_dgemma  # noqa: E402,F401  (first: it loads OpenBLAS before mlx.core, mlx_dgemma/runtime.py)
from benchmarks.common import CONFIGS, OPENBLAS  # noqa: E402

PROJECTED_PROMPT = 64  # prompt tokens assumed for the 26B projection


def build(work: Path, log=print) -> Path:
    """The 4-bit real-layer folder (built once)."""
    from mlx_dgemma.convert import convert
    from tests.fixtures.tiny import write_random_model

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


def write_data(folder: Path, canvas: int, n: int = 2) -> Path:
    """Text records of one canvas each (the BOS token is the prompt: the fewest rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = "The decoder denoises each canvas over a few dozen steps. " * (1 + canvas // 50)
    rows = [{"text": f"{i}{text}"[: canvas - 2]} for i in range(n)]
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


def qlora_run(model_path: Path, data: Path, adapters: Path, iters: int, canvas: int) -> list:
    """What ``python -m mlx_dgemma.lora --model Q4 --train --data D --grad-checkpoint
    --batch-size 1`` does (the recipe's LoRA, Adam with its betas), in this process, with
    the model's canvas length set to ``canvas``."""
    import mlx.core as mx
    import mlx.optimizers as optim

    from mlx_dgemma import load as load_model
    from mlx_dgemma.tuner import TrainingArgs, setup_fine_tuning, train
    from mlx_dgemma.tuner.datasets import load_split

    mx.random.seed(0)
    model, tok = load_model(model_path)
    model.args.canvas_length = canvas
    examples = load_split(data / "train.jsonl", tok)
    setup_fine_tuning(model, "lora")
    mx.reset_peak_memory()  # the step's own peak, not the load's
    args = TrainingArgs(batch_size=1, iters=iters, steps_per_report=1, steps_per_save=10**6, grad_checkpoint=True,
                        adapter_file=str(adapters / "adapters.safetensors"), pad_to=8,
                        fill_token_id=tok.eos_token_id)
    history = train(model, optim.Adam(1e-4, betas=[0.95, 0.99]), examples, None, args)
    (adapters / "losses.json").write_text(json.dumps(history, indent=1))
    return [h for h in history if "train_loss" in h]


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
        from mlx_dgemma.runtime import preload_env

        env.update(preload_env(OPENBLAS))
    cmd = ["-m", "mlx_dgemma.lora", "--model", str(model), "--train", "--data", str(folder), "--fine-tune-type",
           "full", "--batch-size", str(batch), "--iters", str(iters), "--steps-per-report", "3", "--save-every",
           "1000", "--learning-rate", "1e-3", "--no-plot"]
    launch = [sys.executable, "-m", "mlx_dgemma.launch", "-n", "2", "--backend", "ring", "--starting-port",
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


def one(q4: Path, work: Path, canvas: int, out: Path) -> None:
    """One step at one canvas length (run in its own process: its own peak memory)."""
    data = write_data(work / f"train-data-{canvas}", canvas)
    load = os.getloadavg()
    tic = time.time()
    reports = qlora_run(q4, data, work / f"train-adapters-{canvas}", 1, canvas)
    r = reports[-1]
    out.write_text(json.dumps({
        "canvas": canvas, "seconds": round(time.time() - tic, 1), "step_seconds": round(1 / r["iterations_per_second"], 1),
        "tokens_per_second": round(r["tokens_per_second"], 3), "peak_memory_gb": round(r["peak_memory"], 3),
        "loss": round(r["train_loss"], 3), "load_before": [round(x, 2) for x in load],
        "load_after": [round(x, 2) for x in os.getloadavg()]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--canvases", default="16,48", help="canvas lengths to train one step at (default: %(default)s)")
    ap.add_argument("--work", default="/tmp/mlx_dgemma_bench")
    ap.add_argument("--model", default=None, help="train this folder instead of building the real-layer one")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--speed", action="store_true", help="time the Sudoku-sized model instead (one and two processes)")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--reuse", action="store_true", help="reuse the per-canvas results already in --work")
    a = ap.parse_args()
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if a.speed:
        speed(work, out)
        return
    q4 = Path(a.model) if a.model else build(work)
    if a.one is not None:
        one(q4, work, a.one, work / f"one-{a.one}.json")
        return
    runs = []
    for canvas in [int(c) for c in a.canvases.split(",")]:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--work", str(work), "--model", str(q4), "--one", str(canvas)]
        if not (a.reuse and (work / f"one-{canvas}.json").is_file()):
            subprocess.run(cmd, check=True)
        runs.append(json.loads((work / f"one-{canvas}.json").read_text()))

    from mlx_dgemma.config import ModelArgs, read_config

    small = ModelArgs.from_config(read_config(q4))
    full = ModelArgs(num_hidden_layers=30)

    def rows(prompt: int, canvas: int) -> int:
        return prompt + canvas + 2 * canvas

    # each run: a 1-token prompt, its rows padded as the trainer pads them (to a multiple of 8)
    xs = [rows(-(-(1 + r["canvas"]) // 8) * 8 - r["canvas"], r["canvas"]) for r in runs]
    ys = [r["peak_memory_gb"] * 1e9 for r in runs]
    slope = (ys[-1] - ys[0]) / (xs[-1] - xs[0]) if len(runs) > 1 else 0.0
    at256 = ys[-1] + slope * (rows(PROJECTED_PROMPT, 256) - xs[-1])
    secs = [r["step_seconds"] for r in runs]
    sec_slope = (secs[-1] - secs[0]) / (xs[-1] - xs[0]) if len(runs) > 1 else 0.0
    n = small.num_hidden_layers
    w_small, w_full = weight_bytes(small, n), weight_bytes(full, 30)
    per_layer = layer_state_bytes(full, PROJECTED_PROMPT, 256)
    projected = at256 - w_small + w_full + (30 - n) * per_layer
    # The logits over the vocabulary at the released canvas, which a step holds at most
    # once each: pass 1's probabilities (canvas rows), pass 2's logits and their gradient
    # (canvas rows), the encoder's logits and their gradient (prompt + canvas rows), float32.
    # Added in full (they are not all alive at once): where the measured peaks are equal (the peak was
    # reached outside the step, e.g. while loading), the line above has no slope to carry it.
    logits = (256 + 2 * 256 + 2 * (PROJECTED_PROMPT + 256)) * full.vocab_size * 4
    bound = projected + (logits if slope == 0.0 else 0.0)
    result = {
        "what": "QLoRA (recipe LoRA targets, rank 16, Adam) with --grad-checkpoint on the 4-bit real-layer model "
                "(mixed recipe), batch 1, one step per canvas length",
        "machine": "Linux x86-64, 2 shared cores, MLX 0.32.4 CPU backend (OpenBLAS preloaded)",
        "runs": runs,
        "rows": xs,
        "memory_per_row_mb": round(slope / 1e6, 2),
        "real_layer_peak_at_256_gb": round(at256 / 1e9, 2),
        "real_layer_step_at_256_s": round(secs[-1] + sec_slope * (rows(PROJECTED_PROMPT, 256) - xs[-1]), 0),
        "weights_gb": {"real-layer": round(w_small / 1e9, 2), "26B": round(w_full / 1e9, 2)},
        "per_layer_state_mb": round(per_layer / 1e6, 1),
        "projected_prompt": PROJECTED_PROMPT,
        "projected_26B_peak_gb": round(projected / 1e9, 1),
        "logits_at_256_gb": round(logits / 1e9, 2),
        "projected_26B_peak_with_logits_gb": round(bound / 1e9, 1),
        "macs": {f"{gb} GB": {"budget_gb": round(0.75 * gb, 1), "fits": bound / 1e9 <= 0.75 * gb}
                 for gb in (32, 64, 128)},
    }
    (out / "train.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
