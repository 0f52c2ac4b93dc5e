"""Work per denoising step at the released checkpoint's shapes, and what it means on Macs.

    python benchmarks/projection.py [--prompt 2048] [--tokens-per-forward 7.49]

Counts, for one decoder forward over a 256-token canvas plus the drafter's vocabulary
work: FLOPs (matmuls and attention scores) and bytes read (weights at the mlx-community
4-bit layout, KV cache, logits passes). Then a roofline estimate per chip:
``max(FLOPs / (eff_flops * peak), bytes / (eff_bw * bandwidth))``. Peak figures are the
vendors' published (or widely reported) numbers, listed below with their sources; the
efficiencies are assumptions, stated, and checked against the one measured forward time
others report (M5 Max, 178 ms).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_dgemma.config import ModelArgs  # noqa: E402

# (name, memory bandwidth GB/s, GPU FP16 matmul peak TFLOP/s, source)
CHIPS = [
    ("M1 Ultra", 800, 21.2, "Apple: 800 GB/s; 64-core GPU, 21 TFLOPS FP32 (FP16 runs at the same rate)"),
    ("M4 Max", 546, 18.4, "Apple: 546 GB/s; 40-core GPU ~18.4 TFLOPS FP32/FP16 (reported)"),
    ("M5 Max (shader ALUs)", 614, 18.4, "Apple: 614 GB/s; same 40 cores without the Neural Accelerators"),
    ("M5 Max (Neural Accelerators)", 614, 70.0, "~70 TFLOPS FP16 reported from Apple's '4x M4 peak AI compute'"),
]
REPORTED = [
    ("M5 Max, vmlx-swift MXFP4, 48 steps", "178 ms per forward, 7.49 tokens/forward, 36.8 tok/s"),
    ("M5 Max, vmlx-swift, steps capped at 16", "73.8 tok/s"),
    ("mlx-vlm bf16", "27.9 tok/s"),
    ("M1 Ultra, mlx-vlm 4-bit", "about 15 tok/s (autoregressive Gemma 4 26B-A4B: about 71 tok/s)"),
]


def work(args: ModelArgs, prompt: int, canvas: int, expert_bits: float = 4.5, other_bits: float = 8.5,
         kv_bytes: int = 2, logits_passes: int = 7, sc_exact: bool = True) -> dict:
    """FLOPs and bytes for one step (forward + self-conditioning matmul + logits passes).

    ``expert_bits``/``other_bits``: effective bits per weight (4-bit / 8-bit affine with a
    bf16 scale and bias per 64 weights: 4.5 and 8.5), as mlx-vlm quantizes the
    mlx-community folders (experts and self-conditioning at 4 bits, the rest at 8).
    """
    H, V, L, E, k = args.hidden_size, args.vocab_size, canvas, args.num_experts, args.top_k_experts
    I, D = args.moe_intermediate_size, args.intermediate_size
    n_heads = args.num_attention_heads
    lin = attn_flops = kv_read = 0.0
    w_other = w_expert = 0.0
    touched = E * (1 - (1 - k / E) ** L)  # distinct experts a layer reads for L tokens
    for i in range(args.num_hidden_layers):
        hd, kvh = args.layer_head_dim(i), args.layer_kv_heads(i)
        full = args.is_full(i)
        attn_params = H * n_heads * hd * 2 + H * kvh * hd * (1 if full else 2)
        dense = 3 * H * D
        router = H * E
        lin += attn_params + dense + router + k * 3 * H * I
        w_other += attn_params + dense + router
        w_expert += touched * 3 * H * I
        keys = L + (prompt if full else min(prompt, args.sliding_window - 1))
        attn_flops += 2 * 2 * n_heads * hd * keys * L
        kv_read += 2 * kvh * hd * (keys - L) * kv_bytes
    sc_mlp = 3 * H * D
    lm_head = V * H
    flops = 2 * L * (lin + sc_mlp + lm_head + (V * H if sc_exact else 0)) + attn_flops
    emb_reads = 2 if sc_exact else 1  # LM head and self-conditioning both read the table
    bytes_ = (w_expert * expert_bits + (w_other + lm_head * emb_reads) * other_bits + sc_mlp * expert_bits) / 8
    bytes_ += kv_read + logits_passes * L * V * 4
    return {
        "flops": flops, "bytes": bytes_, "attention_flops": attn_flops,
        "vocab_flops": 2 * L * V * H * (2 if sc_exact else 1),
        "experts_touched": touched, "expert_bytes": w_expert * expert_bits / 8,
    }


def project(w: dict, tokens_per_forward: float, eff_flops: float, eff_bw: float, drafter_share: float):
    rows = []
    for name, bw, tflops, _ in CHIPS:
        t_c = w["flops"] / (eff_flops * tflops * 1e12)
        t_m = w["bytes"] / (eff_bw * bw * 1e9)
        t = max(t_c, t_m)
        step = t / (1 - drafter_share)
        rows.append((name, 1000 * t_c, 1000 * t_m, 1000 * t, tokens_per_forward / step))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--tokens-per-forward", type=float, default=7.49,
                   help="reported at 48 steps on the real checkpoint (spec note)")
    p.add_argument("--eff-flops", type=float, default=0.6, help="fraction of peak the quantized matmuls reach")
    p.add_argument("--eff-bw", type=float, default=0.8, help="fraction of peak bandwidth reached")
    p.add_argument("--drafter-share", type=float, default=0.09, help="share of a step outside the forward")
    a = p.parse_args(argv)
    args = ModelArgs()  # the released checkpoint's shapes (30 layers, 262,144 vocabulary)
    print(f"Released checkpoint shapes, canvas {args.canvas_length}, prompt {a.prompt}:")
    for label, sc in (("exact self-conditioning", True), ("top-k self-conditioning", False)):
        w = work(args, a.prompt, args.canvas_length, sc_exact=sc)
        print(f"\n{label}: {w['flops'] / 1e12:.2f} TFLOP per step "
              f"(vocabulary matmuls {w['vocab_flops'] / 1e12:.2f}, attention scores "
              f"{w['attention_flops'] / 1e12:.2f}); {w['bytes'] / 1e9:.1f} GB read "
              f"(experts {w['expert_bytes'] / 1e9:.1f} GB: {w['experts_touched']:.1f} of "
              f"{args.num_experts} experts per layer touched by {args.canvas_length} tokens)")
        print(f"intensity {w['flops'] / w['bytes']:.0f} FLOP/byte: compute-bound on every chip below\n")
        print("| chip | compute ms | memory ms | forward ms | tok/s at "
              f"{a.tokens_per_forward} tokens/forward |")
        print("|---|---|---|---|---|")
        for name, tc, tm, t, tps in project(w, a.tokens_per_forward, a.eff_flops, a.eff_bw, a.drafter_share):
            print(f"| {name} | {tc:.0f} | {tm:.0f} | {t:.0f} | {tps:.1f} |")
    print(f"\nAssumed: {a.eff_flops:.0%} of peak FLOP/s, {a.eff_bw:.0%} of peak bandwidth, "
          f"{a.drafter_share:.0%} of a step outside the forward (sampling).")
    print("\nPeak figures:")
    for name, bw, tf, src in CHIPS:
        print(f"- {name}: {src}")
    print("\nReported by others (spec note):")
    for k, v in REPORTED:
        print(f"- {k}: {v}")


if __name__ == "__main__":
    main()
