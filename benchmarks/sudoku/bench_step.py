"""Training throughput of the Sudoku recipe: examples/s, tokens/s, peak memory and model FLOP
utilisation of one full fine-tuning step, MLX (one process, two ring processes; this tree
and another, e.g. the code before a change) against PyTorch (transformers' model with the
objective as tests/test_tuner_objective.py computes it).

    python benchmarks/sudoku/bench_step.py                                  # everything below
    python benchmarks/sudoku/bench_step.py --before /work/main --batches 16,64,256

Every measurement runs in its own process (its own peak memory): the project's trainer
(``mlx_dgemma.tuner.train``, the compiled step, AdamW, batch from ``iterate_batches``) for
``--iters`` iterations on real training lines (prompt 89 + canvas 88 = 177 tokens an
example; with ``--prompt pins`` 8 + 88, the puzzle only in the canvas's pins), reporting
every iteration; the median of the second half is quoted (the first ones compile the
step, once for each count of self-conditioned rows a process meets).
FLOPs are counted from the shapes (matmuls only, x2 per MAC; the backward pass twice the forward of what gets a gradient: encoder and pass 2; pass 1 for the
half of the rows whose self-conditioning coin is heads; with ``--encoder-loss-weight 0`` the
encoder over the prompt alone and without its head; the routed experts, or every expert
with ``--experts dense``: ``flops_per_example``), MFU against
the measured float32 matmul peak of the same process setup. Writes
benchmarks/sudoku/results/step.json and step.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
PROMPTS = {"cells": 89, "pins": 8}  # prompt tokens of each recipe.chat_template format
CANVAS = 88


def flops_per_example(c: dict, encoder_loss: bool = True, pass1_share: float = 0.5, dense: bool = False,
                      prompt: int = PROMPTS["cells"]) -> float:
    """Matmul FLOPs of one training example as the trainer computes it: the encoder (with
    ``encoder_loss``, over the whole sequence and through the head; without, over the
    ``prompt`` positions the decoder reads and without the head), pass 1 of the decoder for
    ``pass1_share`` of the rows (those whose self-conditioning coin is heads), pass 2, and
    the backward pass (twice the forward of what gets a gradient: encoder and pass 2).
    The experts: the routed ones (top-k), or with ``dense`` every expert (what the dense
    dispatch computes)."""
    t = c["text_config"]
    H, I, V = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    E, M = t["num_experts"], t["moe_intermediate_size"]
    heads, hd = t["num_attention_heads"], t["head_dim"]
    macs_tok = 0.0
    for kind in t["layer_types"]:
        full = kind == "full_attention"
        d = t["global_head_dim"] if full else hd
        kv = t["num_global_key_value_heads"] if full else t["num_key_value_heads"]
        macs_tok += H * heads * d * 2 + H * kv * d * (1 if full else 2)  # q, o; k (and v)
        macs_tok += 3 * H * I + 3 * H * M * (E if dense else t["top_k_experts"])  # dense MLP; experts
    enc, dec = (prompt + CANVAS, CANVAS) if encoder_loss else (prompt, CANVAS)
    enc_macs = (macs_tok + (H * V if encoder_loss else 0)) * enc  # the tied head only for the encoder's loss
    dec_macs = (macs_tok + H * V) * dec
    layers = len(t["layer_types"])
    attn = lambda q, k: 2 * q * k * t["num_attention_heads"] * hd * layers  # noqa: E731  (QK^T and PV)
    pass1 = dec_macs + attn(dec, enc + dec) + dec * V * H  # and the signal's soft lookup
    fwd = 2 * (enc_macs + attn(enc, enc / 2) + pass1_share * pass1 + dec_macs + attn(dec, enc + dec))
    grad = 2 * 2 * (enc_macs + attn(enc, enc / 2) + dec_macs + attn(dec, enc + dec) + dec * V * H)
    return fwd + grad


def run_one(a) -> None:
    """One measurement (this process, or each ring process): prints a JSON line (rank 0)."""
    sys.path.insert(0, str(Path(a.tree).resolve()))
    import mlx_dgemma  # noqa: F401  (loads OpenBLAS before mlx.core)
    import mlx.core as mx
    import mlx.optimizers as optim

    from mlx_dgemma import load
    from mlx_dgemma.sudoku.recipe import write_initial_model
    from mlx_dgemma.tuner import TrainingArgs, setup_fine_tuning, train
    from mlx_dgemma.tuner.datasets import load_split

    world = mx.distributed.init()
    init = Path(a.work) / f"init-{world.rank()}"
    # a tree from before the prompt formats (--before) takes no prompt argument
    write_initial_model(init, num_hidden_layers=a.layers, **({"prompt": a.prompt} if a.prompt != "cells" else {}))
    model, tok = load(init)
    setup_fine_tuning(model, "full")
    try:  # since issue 21 the backend swaps the experts; earlier trees had a model switch
        from mlx_dgemma import backend

        try:
            backend.configure(model, experts=a.experts)
        except ValueError:  # a tree from before the blocked dispatch
            backend.configure(model, experts="dense")
    except ImportError:
        model.expert_dispatch = "dense"
    data = load_split(Path(a.data), tok)
    hist = train(model, optim.AdamW(1e-3, betas=[0.9, 0.99], weight_decay=1e-4), data, None,
                 TrainingArgs(batch_size=a.batch, iters=a.iters, steps_per_report=1, steps_per_save=10**9, pad_to=1,
                              encoder_loss_weight=a.encoder_loss_weight,
                              adapter_file=str(Path(a.work) / f"ad-{world.rank()}.safetensors")),
                 log=lambda *x, **k: None)
    if world.rank() == 0:
        import resource

        secs = [1 / h["iterations_per_second"] for h in hist if "iterations_per_second" in h]
        # peak_gb: MLX's peak of live arrays; rss_gb: the process's resident peak (with MLX's
        # buffer cache, the libraries and the data), what PyTorch's row reports as its peak
        print("RESULT " + json.dumps({"seconds": secs, "peak_gb": max(h["peak_memory"] for h in hist),
                                      "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                                      "processes": world.size()}), flush=True)


def matmul_peak(threads: int) -> float:
    """GFLOP/s of a 2048^3 float32 matmul in MLX with ``threads`` BLAS threads (median of 5)."""
    code = ("import sys,time; sys.path.insert(0, %r); import mlx_dgemma, mlx.core as mx\n"
            "a=mx.random.normal((2048,2048)); mx.eval(a@a); ts=[]\n"
            "for _ in range(5):\n t=time.perf_counter(); mx.eval(a@a); ts.append(time.perf_counter()-t)\n"
            "print(2*2048**3/sorted(ts)[2]/1e9)") % str(ROOT)
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads))
    return float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout.split()[-1])


def torch_step(a) -> None:
    """The same step in PyTorch: transformers' model, the tests' per-example objective, AdamW."""
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch
    from transformers.models.diffusion_gemma import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    from mlx_dgemma.sudoku.recipe import model_config
    from mlx_dgemma.tuner.datasets import BatchSpec, load_split, make_batch
    import tests.test_tuner_objective as objective_test
    from tests.reference.hf_reference import TINY_VISION

    objective_test.L = CANVAS  # the test's canvas length is a module constant

    torch.set_num_threads(2)
    cfg = model_config(num_hidden_layers=a.layers)
    model = DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(
        text_config=cfg["text_config"], vision_config=dict(TINY_VISION), canvas_length=CANVAS)).to(torch.float32)
    model.train()
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if ".router." not in n], lr=1e-3)

    from mlx_dgemma import load

    _, tok = load(Path(a.work) / "init-0")
    data = load_split(Path(a.data), tok)
    spec = BatchSpec(CANVAS, cfg["text_config"]["vocab_size"], 5, 0, 0, 0.5, 1)
    secs = []
    for it in range(a.iters):
        ids = list(range(it * a.batch, (it + 1) * a.batch))
        b = {k: np.array(v) for k, v in make_batch([data[i % len(data)] for i in ids], ids, it, spec, []).items()}
        t = time.perf_counter()
        loss = objective_test.reference_objective(model, b)[0]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        secs.append(time.perf_counter() - t)
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print("RESULT " + json.dumps({"seconds": secs, "peak_gb": rss, "rss_gb": rss,
                                  "processes": 1}), flush=True)


def measure(args_list, env_extra=None, launch: int = 1, timeout: int = 900) -> dict:
    env = dict(os.environ, **(env_extra or {}))
    if os.path.exists(OPENBLAS):
        from mlx_dgemma.runtime import preload_env

        env.update(preload_env(OPENBLAS))
    cmd = [sys.executable, str(Path(__file__).resolve()), *args_list]
    if launch > 1:
        import random

        cmd = [sys.executable, "-m", "mlx_dgemma.launch", "-n", str(launch), "--backend", "ring",
               "--starting-port", str(random.randint(20000, 40000)), "--env", "OPENBLAS_NUM_THREADS=1",
               "--env", f"LD_PRELOAD={env.get('LD_PRELOAD', '')}", "--python", sys.executable, "--",
               str(Path(__file__).resolve()), *args_list]
    load = os.getloadavg()[0]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout} s", "load_before": load}
    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"], "load_before": load}
    r = json.loads(line[7:])
    # the second half of the iterations: the compiled step meets each new count of
    # self-conditioned rows once (a new shape), in the first iterations
    secs = r["seconds"]
    steady = secs[len(secs) // 2:] if len(secs) > 3 else (secs[1:] or secs)
    r.update(median_seconds=statistics.median(steady), load_before=round(load, 2))
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, default=None, help="another tree to measure too (e.g. /work/main)")
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--encoder-loss-weight", type=float, default=1.0,
                    help="the objective's encoder_loss_weight (0: the encoder's loss is not computed)")
    ap.add_argument("--layers", type=int, default=6,
                    help="the model's layers (6: the issue's recipe; train.yaml's grown model has 11)")
    ap.add_argument("--experts", choices=["blocked", "dense"], default="blocked",
                    help="the trainer's expert dispatch (train.yaml's expert_dispatch; a tree without "
                    "blocked takes dense)")
    ap.add_argument("--prompt", choices=sorted(PROMPTS), default="cells",
                    help="the prompt format (recipe.chat_template; pins: the puzzle only in the canvas's pins)")
    ap.add_argument("--processes", default=None, help="e.g. 2: these process counts for every tree "
                    "(default: 1 and 2 for this tree, 1 for --before)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sudoku-bench-step"))
    ap.add_argument("--data", type=Path, default=None, help="train.jsonl of Sudoku lines (default: made here)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--run", choices=["mlx", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--tree", default=str(ROOT), help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.run == "mlx":
        run_one(a)
        return 0
    if a.run == "torch":
        torch_step(a)
        return 0

    a.work.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in a.batches.split(",")]
    data = a.data
    if data is None:
        sys.path.insert(0, str(ROOT))
        from mlx_dgemma.sudoku import data as sdata

        data = a.work / "train.jsonl"
        if not data.is_file():
            pairs = sdata.make_puzzles(sdata.TRAIN_EASY, 2 * max(batches) * (a.iters + 1) // 8 + 8, "search",
                                       "random", seed=77)
            pairs = sdata.augment(pairs, max(batches) * (a.iters + 1), 78)
            data.write_text("".join(sdata.chat_line(p, s) + "\n" for p, s in pairs))
    sys.path.insert(0, str(ROOT))
    from mlx_dgemma.sudoku.recipe import model_config

    fpe = flops_per_example(model_config(num_hidden_layers=a.layers), encoder_loss=a.encoder_loss_weight != 0,
                            dense=a.experts == "dense", prompt=PROMPTS[a.prompt])
    peaks = {1: matmul_peak(2), 2: 2 * matmul_peak(1)}
    common = ["--iters", str(a.iters), "--work", str(a.work), "--data", str(data), "--experts", a.experts,
              "--layers", str(a.layers), "--prompt", a.prompt,
              "--encoder-loss-weight", str(a.encoder_loss_weight)]
    rows = []
    trees = [("after", str(ROOT))] + ([("before", str(a.before))] if a.before else [])
    for b in batches:
        for name, tree in trees:
            counts = [int(p) for p in a.processes.split(",")] if a.processes else [1] + ([2] if name == "after" else [])
            setups = [(p, {}) for p in counts]
            for procs, env in setups:
                r = measure(["--run", "mlx", "--tree", tree, "--batch", str(b), *common], env, launch=procs)
                rows.append(dict(r, framework="mlx", code=name, batch=b, processes=procs))
                print(json.dumps(rows[-1]), flush=True)
        if not a.no_torch and b == min(batches):  # a per-example loop: ~2 s an example here
            r = measure(["--run", "torch", "--batch", str(b), *common[:0], "--iters", "3", *common[2:]])
            rows.append(dict(r, framework="torch", code="transformers", batch=b, processes=1))
            print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        if "median_seconds" in r:
            s = r["median_seconds"]
            r["examples_per_second"] = r["batch"] / s
            r["tokens_per_second"] = r["batch"] * (PROMPTS[a.prompt] + CANVAS) / s
            r["gflops"] = fpe * r["batch"] / s / 1e9
            r["mfu"] = r["gflops"] / peaks[r["processes"]]
    result = {"what": f"one full fine-tuning step of the Sudoku recipe ({a.layers} layers, prompt "
                      f"{PROMPTS[a.prompt]} ({a.prompt}) + canvas {CANVAS})",
              "command": "python benchmarks/sudoku/bench_step.py " + " ".join(sys.argv[1:]),
              "flops_per_example": fpe, "matmul_peak_gflops": peaks, "cpu_cores": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "step.json").write_text(json.dumps(result, indent=1))
    lines = ["| framework | code | processes | batch | s/step (median) | examples/s | tokens/s | peak GB | max RSS GB "
             "| GFLOP/s | MFU |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "median_seconds" not in r:
            lines.append(f"| {r['framework']} | {r['code']} | {r['processes']} | {r['batch']} | failed: {r['error']} |")
            continue
        lines.append(f"| {r['framework']} | {r['code']} | {r['processes']} | {r['batch']} | {r['median_seconds']:.2f} "
                     f"| {r['examples_per_second']:.1f} | {r['tokens_per_second']:.0f} | {r['peak_gb']:.2f} "
                     f"| {r.get('rss_gb', float('nan')):.2f} | {r['gflops']:.1f} | {r['mfu']:.1%} |")
    (a.out / "step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
