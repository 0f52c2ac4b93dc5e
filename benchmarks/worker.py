"""One backend, one configuration, one process: what ``run.py`` launches.

    python benchmarks/worker.py build --config mid --ckpt DIR
    python benchmarks/worker.py bench --backend mlx_dgemma --config mid --ckpt DIR --prompt 64

``build`` makes the random float32 weights with the PyTorch reference harness
(``build_reference``, seed 0) and writes them in the checkpoint layout
``save_checkpoint`` writes, plus a probe (the reference's first-step logits for a fixed
prompt and canvas) that the MLX workers check themselves against.

``bench`` measures, for one backend, after warm-up (medians over ``--repeats``):
  step_ms     one steady-state denoising step: decoder forward with self-conditioning,
              then the drafter (temperature, sample, entropy, entropy-bound acceptance,
              renoising, the next step's self-conditioning input), evaluated;
  forward_ms  the decoder forward alone; drafter_ms the rest of the step alone;
  block_ms    the encoder pass over a committed 256-token canvas (the per-block cost);
  prefill_ms  the prompt's encoder pass (one run);
  e2e         tokens/s and tokens per forward of a whole generation (2 blocks, fixed seed);
  peak memory (process RSS; MLX's allocator peak for the MLX backends).
Where each backend puts the self-conditioning matmul differs (ours and mlx-vlm: in the
drafter; the reference: inside the forward), so only ``step_ms`` compares like for like.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CONFIDENCE, CONFIGS, ENTROPY_BOUND, STABILITY, emit, fixed_canvas, median_ms, now,
    peak_rss_gb, prompt_tokens, quantize, repeat, temperature,
)

PROBE_PROMPT = 64
PROBE_POSITIONS = 4


# ---------------------------------------------------------------------------------------
# build (torch)


def _hf_config(name: str):
    from tests.reference.hf_reference import tiny_config

    c = CONFIGS[name]
    return tiny_config(canvas_length=c["canvas_length"], **c["text"])


def save_streaming(model, path: Path, shard_bytes: int = 1 << 30) -> None:
    """``save_checkpoint(model, path, prefix="decoder")``'s layout, one shard at a time.

    The harness's ``save_checkpoint`` clones every tensor at once (2x the model in
    memory); at real-layer shapes (9 GB float32) that is too much for a shared machine.
    """
    from safetensors.torch import save_file

    enc, dec = "model.encoder.language_model.", "model.decoder."
    sd = model.state_dict()
    keys = sorted(
        k for k in sd
        if k != "lm_head.weight" and (not k.startswith(enc) or k.endswith("layer_scalar"))
    )
    shards, cur, size = [], [], 0
    for k in keys:
        n = sd[k].numel() * sd[k].element_size()
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += n
    shards.append(cur)
    weight_map = {}
    for i, part in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: sd[k].detach().contiguous() for k in part}, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(model.config.to_dict(), indent=1, default=str))
    assert dec  # the decoder prefix keeps every shared weight


def build(args) -> None:
    import numpy as np
    import torch

    from tests.reference.hf_reference import (
        build_reference, reference_denoise, reference_encode, save_checkpoint,
    )

    path = Path(args.ckpt)
    path.mkdir(parents=True, exist_ok=True)
    t = now()
    ref = build_reference(_hf_config(args.config), seed=0)
    built = now() - t
    n_params = sum(p.numel() for p in ref.parameters())
    if n_params * 4 < (1 << 30):
        save_checkpoint(ref, path, prefix="decoder")
    else:
        save_streaming(ref, path)
    # mlx-vlm reads the full layers' shapes from these keys (the released checkpoint's
    # form), not from transformers' per_layer_config; both forms stay in the file.
    cfg = json.loads((path / "config.json").read_text())
    text = CONFIGS[args.config]["text"] or {}
    from tests.reference.hf_reference import TINY_TEXT

    merged = {**TINY_TEXT, **text}
    cfg["text_config"].update(
        global_head_dim=merged["global_head_dim"],
        num_global_key_value_heads=merged["num_global_key_value_heads"],
        attention_k_eq_v=True,
    )
    (path / "config.json").write_text(json.dumps(cfg, indent=1, default=str))
    # The probe: first-step logits (no self-conditioning) for a fixed prompt and canvas.
    V, L = merged["vocab_size"], CONFIGS[args.config]["canvas_length"]
    prompt = prompt_tokens(PROBE_PROMPT, V)[None]
    canvas = fixed_canvas(L, V)
    with torch.no_grad():
        logits = reference_denoise(ref, canvas, reference_encode(ref, [prompt]))
    np.savez(
        path / "probe.npz", prompt=prompt, canvas=canvas,
        logits=logits[0, :PROBE_POSITIONS], argmax=logits[0].argmax(-1),
    )
    (path / "BUILT").write_text(json.dumps({"params": n_params, "build_s": round(built, 1)}))
    emit({"built": str(path), "params": n_params, "build_s": round(built, 1)})


def probe_check(logits_fn, ckpt: Path, prompt_len: int, bits: int):
    """Max |diff| on the probe positions and argmax agreement with the reference."""
    import numpy as np

    if prompt_len != PROBE_PROMPT or bits:
        return None
    p = np.load(ckpt / "probe.npz")
    out = logits_fn(p["prompt"], p["canvas"])[0]
    return {
        "max_abs_diff": float(np.abs(out[:PROBE_POSITIONS] - p["logits"]).max()),
        "argmax_agree": float((out.argmax(-1) == p["argmax"]).mean()),
    }


# ---------------------------------------------------------------------------------------
# mlx_dgemma


def bench_ours(args) -> dict:
    import mlx_dgemma  # noqa: F401  (before mlx.core: it loads OpenBLAS, see mlx_dgemma/runtime.py)
    import mlx.core as mx
    import numpy as np

    from mlx_dgemma import backend, load_model, rng
    from mlx_dgemma.sampling import probabilities, sample_step_mlx

    try:
        from mlx_dgemma.drafter import DenoiseSettings, denoise_steps, entropy_bound_mask, self_conditioning
    except ImportError:  # the drafter is not there yet: a copy of its step
        DenoiseSettings = denoise_steps = self_conditioning = None

        def entropy_bound_mask(entropy, bound):
            order = mx.argsort(entropy, axis=-1)
            s = mx.take_along_axis(entropy, order, axis=-1)
            sel = (mx.cumsum(s, axis=-1) - s) <= bound
            return mx.put_along_axis(mx.zeros(sel.shape, dtype=mx.bool_), order, sel, axis=-1)

    sample_fn, sampler = sample_step_mlx, "mlx"
    if args.sampler == "kernels":
        from mlx_dgemma import kernels

        sample_fn, sampler = kernels.sample_step, "kernels:" + kernels.backend()
    soft = None
    if args.backend == "mlx_dgemma+np":  # what-if: a NumPy CPU "kernel" (cpu_sampler.py)
        import mlx_dgemma.drafter as drafter_mod
        from cpu_sampler import sample_step_numpy, soft_embeddings_numpy

        sample_fn, sampler, soft = sample_step_numpy, "numpy (prototype)", soft_embeddings_numpy
        drafter_mod._soft_embeddings = soft_embeddings_numpy

    ckpt = Path(args.ckpt)
    t = now()
    model, _ = load_model(ckpt)
    if args.bits:
        quantize(model, args.bits, args.group_size)
        backend.defaults(model)  # the backend's paths for the now quantized layers
    mx.eval(model.parameters())
    load_s = now() - t
    V, L = model.args.vocab_size, model.args.canvas_length

    def logits_fn(prompt, canvas):
        c = model.make_cache()
        model.encode(mx.array(prompt), c)
        return np.array(model.denoise(mx.array(canvas), c))

    probe = probe_check(logits_fn, ckpt, args.prompt, args.bits)
    mx.reset_peak_memory()

    prompt = mx.array(prompt_tokens(args.prompt, V))[None]
    cache = model.make_cache()
    t = now()
    model.encode(prompt, cache)
    mx.eval([c.state for c in cache])  # encode builds the graph; the cache is computed here
    prefill = now() - t
    N = args.warmup + args.repeats + 1
    seeds = [0]

    def drafter(logits, canvas, n):
        temp = temperature(n, N)
        s = sample_fn(logits, temp, rng.position_keys(seeds, rng.SAMPLE, 0, n, L))
        accept = entropy_bound_mask(s.entropy, ENTROPY_BOUND)
        renoise = rng.random_tokens(rng.position_keys(seeds, rng.RENOISE, 0, n, L), V)
        new = mx.where(accept, s.sampled, renoise)
        if soft is not None:
            sc = soft(model, logits, temp, s.lse)
        elif self_conditioning is not None:  # the drafter's own (uses the kernel's probabilities)
            sc = self_conditioning(model, logits, temp, s, DenoiseSettings())
        else:
            sc = model.soft_embeddings(probabilities(logits, temp, s.lse))
        return new, s.argmax, sc, s.entropy.mean(-1), accept

    # 1. whole steps, through the drafter generate() uses
    step_times = []
    if denoise_steps is not None:
        settings = DenoiseSettings(max_denoising_steps=N, stability_threshold=None, confidence_threshold=None)
        t = now()
        for _ in denoise_steps(model, cache, settings, seeds, 0, sample_fn=sample_fn):
            t2 = now()
            step_times.append(t2 - t)
            t = t2
    else:
        canvas, sc = mx.array(fixed_canvas(L, V)), None
        for n in range(N, 0, -1):
            t = now()
            logits = model.denoise(canvas, cache, self_conditioning_embeddings=sc)
            canvas, am, sc, ent, acc = drafter(logits, canvas, n)
            mx.eval(canvas, am, sc, ent, acc)
            np.array(ent)
            step_times.append(now() - t)
    step_times = step_times[1 + args.warmup:]  # the first step has no self-conditioning

    # 2. the parts alone
    canvas = mx.array(fixed_canvas(L, V))
    logits = model.denoise(canvas, cache)
    sc = model.soft_embeddings(mx.softmax(logits / temperature(N, N), axis=-1))
    mx.eval(logits, sc)
    fwd = repeat(lambda: mx.eval(model.denoise(canvas, cache, self_conditioning_embeddings=sc)),
                 args.repeats, args.warmup)
    drf = repeat(lambda: mx.eval(*drafter(logits, canvas, N - 1)), args.repeats, args.warmup)
    blk = repeat(lambda c: (model.encode(canvas, c), mx.eval([x.state for x in c])), args.repeats, args.warmup,
                 setup=cache.copy)

    # 3. end to end
    e2e = None
    try:
        from mlx_dgemma.generate import generate_blocks
    except ImportError:
        generate_blocks = None
    if generate_blocks is not None and args.e2e_steps:
        settings = DenoiseSettings(max_denoising_steps=args.e2e_steps)
        t = now()
        blocks = list(generate_blocks(model, prompt, settings=settings, max_tokens=args.e2e_tokens,
                                      seeds=[0], eos_token_ids=(), pad_token_id=None, sample_fn=sample_fn))
        total = now() - t
        last = blocks[-1]
        tokens = sum(b.tokens.shape[1] for b in blocks)
        e2e = {
            "tokens": tokens, "seconds": round(total, 3), "prompt_s": round(last.prompt_time, 3),
            "tok_s": round(tokens / last.elapsed, 3), "passes": int(last.total_passes[0]),
            "tokens_per_forward": round(float(last.tokens_per_forward[0]), 3),
        }
    return dict(
        sampler=sampler, load_s=round(load_s, 2), prefill_ms=round(1000 * prefill, 2),
        step_ms=median_ms(step_times), forward_ms=median_ms(fwd), drafter_ms=median_ms(drf),
        block_ms=median_ms(blk), step_samples=[round(1000 * x, 2) for x in step_times], e2e=e2e,
        probe=probe, peak_mlx_gb=round(mx.get_peak_memory() / 2**30, 3), peak_rss_gb=peak_rss_gb(),
    )


# ---------------------------------------------------------------------------------------
# mlx-vlm (mlx_vlm.models.diffusion_gemma): its own step functions, entropy-bound sampler


def bench_vlm(args) -> dict:
    import mlx.core as mx
    import numpy as np
    from mlx_vlm.generate import diffusion as D
    from mlx_vlm.utils import load_model

    ckpt = Path(args.ckpt)
    t = now()
    model = load_model(ckpt)
    if args.bits:
        quantize(model, args.bits, args.group_size)
    mx.eval(model.parameters())
    load_s = now() - t
    tc = model.config.text_config
    V, L = tc.vocab_size, model.config.canvas_length
    stopping = {"stability_threshold": STABILITY, "confidence_threshold": CONFIDENCE}

    def prefill(prompt):
        c = model.diffusion_prefill_cache(
            prompt, attention_mask=None, cache=model.make_cache(), pixel_values=None,
            mm_token_type_ids=None, prefill_step_size=None, chunk_prefill=False)
        mx.eval([x.state for x in c])
        return c

    def logits_fn(prompt, canvas):
        c = prefill(mx.array(prompt))
        canvas = mx.array(canvas)
        return np.array(model.diffusion_decoder_logits(
            canvas, cache=c, self_conditioning=None,
            decoder_attention_mask=model.diffusion_decoder_masks(canvas, c, None)))

    probe = probe_check(logits_fn, ckpt, args.prompt, args.bits)
    mx.reset_peak_memory()
    prompt = mx.array(prompt_tokens(args.prompt, V))[None]
    t = now()
    cache = prefill(prompt)
    prefill_s = now() - t
    ctx = model.diffusion_prepare_self_conditioning()

    def drafter(logits, canvas, n, N, history):
        processed = logits / temperature(n, N)
        argmax = mx.argmax(processed, axis=-1).astype(mx.int32)
        den = D._diffusion_sample_canvas(processed, mx.int32, 1.0)
        ent = D._diffusion_token_entropy(processed)
        sc = model.diffusion_self_conditioning(processed, ctx)
        acc = D._diffusion_entropy_transfer_mask(ent, ENTROPY_BOUND)
        accepted = mx.where(acc, den, canvas)
        canvas = mx.where(acc, accepted, D._diffusion_initialize_canvas(1, L, V, mx.int32))
        stop = D._diffusion_stable_and_confident(argmax, processed, history, stopping)
        return canvas, argmax, sc, stop

    def block_steps(cache, N, compile_graph, timings=None, early_stop=True):
        canvas = D._diffusion_initialize_canvas(1, L, V, mx.int32)
        masks = model.diffusion_decoder_masks(canvas, cache, None)
        f0, f1 = D._make_diffusion_decoder_logits_fns(model, cache, masks, compile_graph=compile_graph)
        sc, history, steps, argmax = None, [], 0, canvas
        for n in range(N, 0, -1):
            t = now()
            steps += 1
            logits = f0(canvas) if sc is None else f1(canvas, sc)
            if n == 1 and timings is None:  # mlx-vlm skips sampling on the last step
                argmax = mx.argmax(logits / temperature(n, N), axis=-1)
                mx.eval(argmax)
                break
            canvas, argmax, sc, stop = drafter(logits, canvas, n, N, history if early_stop else [])
            mx.eval(canvas, argmax, sc)
            if timings is not None:
                timings.append(now() - t)
            if stop and early_stop:
                break
        return argmax, steps

    # 1. whole steps, eager and compiled (mlx-vlm's diffusion_compile); keep the faster
    N = args.warmup + args.repeats + 1
    variants = {}
    for compiled in (False, True):
        times = []
        block_steps(cache, N, compiled, timings=times, early_stop=False)
        variants["compiled" if compiled else "eager"] = median_ms(times[1 + args.warmup:])
    best = min(variants, key=lambda k: variants[k])
    compiled = best == "compiled"

    # 2. the parts alone
    canvas = mx.array(fixed_canvas(L, V))
    masks = model.diffusion_decoder_masks(canvas, cache, None)
    f0, f1 = D._make_diffusion_decoder_logits_fns(model, cache, masks, compile_graph=compiled)
    logits = f0(canvas)
    sc = model.diffusion_self_conditioning(logits / temperature(N, N), ctx)
    mx.eval(logits, sc)
    fwd = repeat(lambda: mx.eval(f1(canvas, sc)), args.repeats, args.warmup)
    drf = repeat(lambda: mx.eval(*drafter(logits, canvas, N - 1, N, [])[:3]), args.repeats, args.warmup)

    def copy_cache():
        out = model.make_cache()
        for dst, src in zip(out, cache):
            dst.state = src.state
            if hasattr(src, "meta_state"):
                dst.meta_state = src.meta_state
        return out

    def encode(c):
        model.diffusion_update_cache(canvas, cache=c)
        mx.eval([x.state for x in c])

    blk = repeat(encode, args.repeats, args.warmup, setup=copy_cache)

    # 3. end to end: their block loop (prefill, denoise, commit the argmax, encode it)
    e2e = None
    if args.e2e_steps:
        mx.random.seed(0)
        t = now()
        c = prefill(prompt)
        p_s = now() - t
        tokens, passes, pending = 0, 0, None
        while tokens < args.e2e_tokens:
            if pending is not None:
                model.diffusion_update_cache(pending, cache=c)
            pending, steps = block_steps(c, args.e2e_steps, compiled)
            pending = pending.astype(mx.int32)
            mx.eval(pending)
            tokens += L
            passes += steps
        total = now() - t
        e2e = {"tokens": tokens, "seconds": round(total, 3), "prompt_s": round(p_s, 3),
               "tok_s": round(tokens / (total - p_s), 3), "passes": passes,
               "tokens_per_forward": round(tokens / passes, 3)}
    return dict(
        variant=best, variants_step_ms=variants, load_s=round(load_s, 2),
        prefill_ms=round(1000 * prefill_s, 2), step_ms=variants[best], forward_ms=median_ms(fwd),
        drafter_ms=median_ms(drf), block_ms=median_ms(blk), e2e=e2e, probe=probe,
        peak_mlx_gb=round(mx.get_peak_memory() / 2**30, 3), peak_rss_gb=peak_rss_gb(),
    )


# ---------------------------------------------------------------------------------------
# the PyTorch reference (transformers), through its own generate()


def bench_reference(args) -> dict:
    import numpy as np
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    from tests.reference.hf_reference import reference_encode

    torch.set_num_threads(os.cpu_count() or 1)
    t = now()
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(args.ckpt, dtype=torch.float32).eval()
    load_s = now() - t
    V = model.config.text_config.vocab_size
    L = model.config.canvas_length
    prompt = torch.as_tensor(prompt_tokens(args.prompt, V)[None]).long()

    # Time the decoder forward and the whole _denoising_step inside generate().
    steps, fwds, encs = [], [], []

    def timed(fn, sink):
        def wrapper(*a, **k):
            t = now()
            out = fn(*a, **k)
            sink.append(now() - t)
            return out
        return wrapper

    model._denoising_step = timed(model._denoising_step, steps)
    model.forward = timed(model.forward, fwds)
    enc = model.model.encoder
    enc.register_forward_pre_hook(lambda m, a: encs.append(-now()))
    enc.register_forward_hook(lambda m, a, o: encs.__setitem__(-1, encs[-1] + now()))

    N = args.warmup + args.repeats + 1
    kw = dict(eos_token_id=[V + 7], return_dict_in_generate=True)
    with torch.no_grad():
        torch.manual_seed(0)
        model.generate(prompt, max_new_tokens=L, max_denoising_steps=N, stability_threshold=None,
                       confidence_threshold=None, **kw)
        prefill_s = encs[0]
        step_times = steps[1 + args.warmup:]
        fwd = fwds[1 + args.warmup:]
        drf = [s - f for s, f in zip(step_times, fwd)]
        cache = reference_encode(model, [prompt.numpy()])
        canvas = torch.as_tensor(fixed_canvas(L, V)).long()
        pos = torch.arange(cache.get_seq_length(), cache.get_seq_length() + L)[None]

        def encode(c):
            model.model.encoder(input_ids=canvas, cache=c, position_ids=pos)

        blk = repeat(encode, args.repeats, args.warmup, setup=lambda: copy.deepcopy(cache))
        e2e = None
        if args.e2e_steps:
            steps.clear()
            encs.clear()
            torch.manual_seed(0)
            t = now()
            out = model.generate(prompt, max_new_tokens=args.e2e_tokens, max_denoising_steps=args.e2e_steps, **kw)
            total = now() - t
            tokens = out.sequences.shape[1] - prompt.shape[1]
            e2e = {"tokens": tokens, "seconds": round(total, 3), "prompt_s": round(encs[0], 3),
                   "tok_s": round(tokens / (total - encs[0]), 3), "passes": len(steps),
                   "tokens_per_forward": round(float(out.tokens_per_forward[0]), 3)}
    del np
    return dict(
        torch=torch.__version__, threads=torch.get_num_threads(), load_s=round(load_s, 2),
        prefill_ms=round(1000 * prefill_s, 2), step_ms=median_ms(step_times), forward_ms=median_ms(fwd),
        drafter_ms=median_ms(drf), block_ms=median_ms(blk), e2e=e2e, peak_rss_gb=peak_rss_gb(),
    )


BENCH = {"mlx_dgemma": bench_ours, "mlx_dgemma+np": bench_ours, "mlx-vlm": bench_vlm,
         "reference": bench_reference}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["build", "bench"])
    p.add_argument("--config", choices=sorted(CONFIGS), required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--backend", choices=sorted(BENCH))
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--bits", type=int, default=0)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--e2e-steps", type=int, default=0)
    p.add_argument("--e2e-tokens", type=int, default=0)
    p.add_argument("--sampler", choices=["mlx", "kernels"], default="kernels")
    args = p.parse_args(argv)
    if args.command == "build":
        build(args)
        return
    c = CONFIGS[args.config]
    args.e2e_tokens = args.e2e_tokens or 2 * c["canvas_length"]
    result = dict(backend=args.backend, config=args.config, prompt=args.prompt, bits=args.bits,
                  repeats=args.repeats, warmup=args.warmup, e2e_steps=args.e2e_steps)
    result.update(BENCH[args.backend](args))
    emit(result)


if __name__ == "__main__":
    main()
