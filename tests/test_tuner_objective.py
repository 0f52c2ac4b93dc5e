"""The training objective against a PyTorch computation of it on transformers' model.

The PyTorch side is written here from the recipe's description (NeMo AutoModel's
DiffusionGemmaSFTRecipe), not from our code: per example, the encoder runs over the clean
prefix before the scored block into a DynamicCache (sliding layers keep their last
``sliding_window - 1`` tokens, as at inference); pass 1 decodes the corrupted canvas
without gradients; pass 2 decodes it with pass 1's logits as the self-conditioning signal,
gated per example by ``self_conditioning_mask``; the encoder's next-token loss comes from a
second causal pass over the whole clean sequence. Same clean tokens, same draws.

Bounds: float32 sums of a few dozen cross-entropies of size ~5 round at ~1e-6 relative;
1e-4 leaves room for BLAS orderings. Gradients pass through two attention stacks and the
softmax of the self-conditioning signal, which amplify rounding: measured, each float32
side lies ~1e-4 of the largest entry from a float64 run of the reference, so 1e-3 is
~5-10x their disagreement. Both models route decisively (top_k == num_experts: no
near-ties, so expert selection cannot flip between the two implementations).
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from mlx_dgemma import backend, load_model
from mlx_dgemma.tuner.draws import make_draws
from mlx_dgemma.tuner.objective import objective, prefix_span
from tests.reference.hf_reference import build_reference, save_checkpoint, tiny_config

# Compared with the reference: CI runs these under both BLAS libraries (README, Tests).
pytestmark = pytest.mark.reference

V, L = 160, 8
EOS = 1
PROMPTS, RESPONSES = (11, 5), (13, 6)  # prompts longer than the sliding window (8)


def make_batch(seed: int = 0, sc_p: float = 0.5, iteration: int = 1):
    """Two examples of different lengths: clean sequences, EOS fill, the draws."""
    rng = np.random.default_rng(seed)
    seqs, lengths = [], []
    for p, r in zip(PROMPTS, RESPONSES):
        n = p + -(-r // L) * L
        seq = np.full(n, EOS, np.int32)
        seq[: p + r] = rng.integers(3, V, p + r)
        seqs.append(seq)
        lengths.append(n)
    T = max(lengths) + 3  # some padding past the longest
    tokens = np.zeros((2, T), np.int32)
    for b, s in enumerate(seqs):
        tokens[b, : len(s)] = s
    blocks = [-(-r // L) for r in RESPONSES]
    d = make_draws(seed, iteration, [0, 1], blocks, L, V, self_conditioning_p=sc_p)
    batch = dict(tokens=tokens, prompt_lengths=np.array(PROMPTS, np.int32), lengths=np.array(lengths, np.int32),
                 blocks=d["blocks"], corrupt=d["corrupt"], noise=d["noise"], self_condition=d["self_condition"])
    return batch


def as_mx(batch):
    return {k: mx.array(v) for k, v in batch.items()}


def softcap_logits(ref, h):
    cap = ref.config.text_config.final_logit_softcapping
    return torch.tanh(ref.lm_head(h).float() / cap) * cap


def reference_terms(ref, batch, self_conditioning=True):
    """Per example on transformers' DiffusionGemmaForBlockDiffusion: the scored canvas's [L]
    cross-entropies (differentiable), and the encoder's summed next-token cross-entropy and
    its token count."""
    from transformers.cache_utils import DynamicCache

    ce = torch.nn.functional.cross_entropy
    rows, enc_sum, enc_n = [], 0.0, 0
    for b in range(batch["tokens"].shape[0]):
        x = torch.as_tensor(batch["tokens"][b, : batch["lengths"][b]]).long()
        # encoder loss: next-token CE over the clean sequence
        h = ref.model.encoder(input_ids=x[None]).last_hidden_state
        enc_sum = enc_sum + ce(softcap_logits(ref, h)[0, :-1], x[1:], reduction="sum")
        enc_n += len(x) - 1
        # the scored block: clean prefix in the cache, corrupted canvas in the decoder
        s = int(batch["prompt_lengths"][b] + batch["blocks"][b] * L)
        cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
        ref.model.encoder(input_ids=x[None, :s], cache=cache)
        clean = x[s : s + L]
        canvas = torch.where(torch.as_tensor(batch["corrupt"][b]), torch.as_tensor(batch["noise"][b]).long(), clean)
        pos = torch.arange(s, s + L)[None]
        sc = sc_mask = None
        if self_conditioning:
            with torch.no_grad():
                sc = ref(decoder_input_ids=canvas[None], cache=cache, decoder_position_ids=pos).logits
            sc_mask = torch.as_tensor(batch["self_condition"][b : b + 1])
        logits = ref(decoder_input_ids=canvas[None], cache=cache, decoder_position_ids=pos,
                     self_conditioning_logits=sc, self_conditioning_mask=sc_mask).logits
        rows.append(ce(logits[0], clean, reduction="none"))
    return rows, enc_sum, enc_n


def reference_objective(ref, batch, self_conditioning=True, encoder_loss_weight=1.0):
    """(total, diffusion mean, encoder mean) on transformers' DiffusionGemmaForBlockDiffusion."""
    rows, enc_sum, enc_n = reference_terms(ref, batch, self_conditioning)
    diffusion, encoder = torch.cat(rows).sum() / (len(rows) * L), enc_sum / enc_n
    return diffusion + encoder_loss_weight * encoder, diffusion, encoder


def ours(model, batch, **kw):
    out = objective(model, as_mx(batch), **kw)
    return float(out.loss), float(out.diffusion / out.diffusion_tokens), float(out.encoder / out.encoder_tokens)


def rel(a, b):
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = build_reference(tiny_config(canvas_length=L, top_k_experts=8), seed=3)
    model, _ = load_model(save_checkpoint(ref, tmp_path_factory.mktemp("obj")))
    return ref, model


@pytest.fixture(params=["one pass", "causal halves"])
def encoder_attention(request, monkeypatch):
    """The encoder's attention as one pass, or in causal halves (backend.causal_halves, which
    the CPU path takes for whole sequences from CAUSAL_SPLIT_MIN tokens: lowered here so
    that these short sequences take it too)."""
    calls = []
    if request.param == "causal halves":
        monkeypatch.setattr(backend, "CAUSAL_SPLIT_MIN", 4)
        real = backend.causal_halves
        monkeypatch.setattr(backend, "causal_halves", lambda *a: calls.append(1) or real(*a))
    yield request.param
    assert bool(calls) == (request.param == "causal halves"), "the halves were not taken: the test tests nothing"


@pytest.mark.parametrize("sc", [True, False])
def test_loss_matches_reference(pair, sc, encoder_attention):
    ref, model = pair
    batch = make_batch(seed=4)
    assert batch["self_condition"].any() and (batch["corrupt"].mean() > 0.1), "draws too tame to test anything"
    with torch.no_grad():
        r = [float(v) for v in reference_objective(ref, batch, self_conditioning=sc)]
    o = ours(model, batch, self_conditioning=sc)
    for name, a, b in zip(("total", "diffusion", "encoder"), o, r):
        assert rel(a, b) < 1e-4, f"{name}: ours {a:.7g} vs reference {b:.7g}"
    # the trainer's shortcut: the decoder reads only the encoder positions a canvas can see
    span = prefix_span(as_mx(batch), 1)
    assert span < batch["tokens"].shape[1]
    assert rel(ours(model, batch, self_conditioning=sc, span=span)[0], r[0]) < 1e-4


@pytest.mark.parametrize("coins", [(True, False), (False, True), (True, True), (False, False)])
def test_pass_one_on_the_heads_rows_alone_gives_the_same_loss(pair, coins):
    """A batch that lists its heads rows (``self_conditioned``, as make_batch's do) runs
    pass 1 on those rows alone: the reference's loss, whichever rows have heads, none included."""
    ref, model = pair
    batch = dict(make_batch(seed=4), self_condition=np.array(coins))
    with torch.no_grad():
        r = float(reference_objective(ref, batch)[0])
    listed = dict(batch, self_conditioned=np.flatnonzero(coins).astype(np.int32))
    heads, every = ours(model, listed)[0], ours(model, batch)[0]
    assert rel(heads, r) < 1e-4, f"ours {heads:.7g} vs reference {r:.7g}"
    assert rel(heads, every) < 1e-5, f"heads rows alone {heads:.7g} vs every row {every:.7g}"


def test_without_the_encoder_loss_the_encoder_runs_over_the_span_alone(pair):
    """``encoder_loss_weight=0``: the loss is the reference's diffusion mean, and its gradients
    are those of the diffusion term through the full encoder pass (the shortened pass, over
    the positions the decoder reads and without the head, changes no number that counts)."""
    ref, model = pair
    batch = make_batch(seed=4)
    with torch.no_grad():
        _, diffusion, _ = reference_objective(ref, batch)
    span = prefix_span(as_mx(batch), 1)
    assert span < batch["tokens"].shape[1]
    for s in (None, span):
        out = objective(model, as_mx(batch), encoder_loss_weight=0.0, span=s)
        assert rel(float(out.loss), float(diffusion)) < 1e-4
        assert float(out.encoder) == 0 and float(out.encoder_tokens) == 0

    def full(m, b):
        out = objective(m, b, span=span)
        return out.diffusion / out.diffusion_tokens

    short = nn.value_and_grad(model, lambda m, b: objective(m, b, encoder_loss_weight=0.0, span=span).loss)
    (v1, g1), (v2, g2) = nn.value_and_grad(model, full)(model, as_mx(batch)), short(model, as_mx(batch))
    g1, g2 = dict(tree_flatten(g1)), dict(tree_flatten(g2))
    assert rel(float(v2), float(v1)) < 1e-5 and g1.keys() == g2.keys() and len(g1) > 10
    # Relative to each gradient, plus a floor from the largest one: a gradient that sums to
    # almost nothing (a layer scalar's, ~1e-7 of the largest) keeps the rounding of the terms
    # that cancelled, which scale with the whole gradient (1e-7 apart on AMD with OpenBLAS).
    largest = max(float(mx.abs(g).max()) for g in g1.values())
    for k in g1:
        scale = float(mx.abs(g1[k]).max())
        assert float(mx.abs(g1[k] - g2[k]).max()) <= 1e-4 * scale + 1e-6 * largest, k


LORA_LAYERS, SCALE, RANK = (1, 2), 2.0, 4


def add_lora(model, ref, seed=0):
    """The same LoRA (q_proj of layers 1 and 2, B non-zero so both factors get gradients)
    on our model (mlx-lm's LoRALinear) and on the reference (forward hooks on the encoder's
    and the decoder's copy of the tied projection)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    linear_to_lora_layers(model, len(model.layers), {"rank": RANK, "scale": SCALE, "dropout": 0.0,
                                                     "keys": ["self_attn.q_proj"]})
    rng = np.random.default_rng(seed)
    torch_params = {}
    for i in LORA_LAYERS:
        lin = model.layers[i].self_attn.q_proj
        lin.lora_a = mx.array(rng.normal(0, 0.2, lin.lora_a.shape).astype(np.float32))
        lin.lora_b = mx.array(rng.normal(0, 0.2, lin.lora_b.shape).astype(np.float32))
        A = torch.tensor(np.array(lin.lora_a), requires_grad=True)
        B = torch.tensor(np.array(lin.lora_b), requires_grad=True)
        torch_params[i] = (A, B)
        for layers in (ref.model.encoder.language_model.layers, ref.model.decoder.layers):
            layers[i].self_attn.q_proj.register_forward_hook(
                lambda mod, inp, out, A=A, B=B: out + SCALE * (inp[0] @ A) @ B)
    for i in range(len(model.layers)):
        if i not in LORA_LAYERS:  # linear_to_lora_layers wrapped every layer: make the rest no-ops
            model.layers[i].self_attn.q_proj.lora_b = mx.zeros_like(model.layers[i].self_attn.q_proj.lora_b)
    return torch_params


def close(ours_g, ref_g, what):
    ours_g, ref_g = np.asarray(ours_g, np.float64), ref_g.detach().double().numpy()
    err, scale = np.abs(ours_g - ref_g).max(), np.abs(ref_g).max()
    assert scale > 0, f"{what}: zero reference gradient proves nothing"
    assert err <= 1e-3 * scale, f"{what}: max |diff| {err:.3e} > 1e-3 x max |grad| {scale:.3e}"


def test_gradients_match_reference(tmp_path, encoder_attention):
    """LoRA A/B, a dense MLP weight and an expert weight (full fine-tuning), with
    self-conditioning on; the router's gradient exists but training never applies it
    (see test_tuner_train.py::test_router_is_frozen)."""
    ref = build_reference(tiny_config(canvas_length=L, top_k_experts=8), seed=5)
    model, _ = load_model(save_checkpoint(ref, tmp_path / "m"))
    lora = add_lora(model, ref)
    batch = make_batch(seed=6)
    assert batch["self_condition"].any() and not batch["self_condition"].all()

    ref.zero_grad()
    total, _, _ = reference_objective(ref, batch)
    total.backward()

    model.unfreeze()
    # pass 1 on every row (the signal of tails rows zeroed), then on the heads rows alone
    # (the batch lists them, as make_batch's do): the same loss and gradients
    listed = dict(batch, self_conditioned=np.flatnonzero(batch["self_condition"]).astype(np.int32))
    for b in (batch, listed):
        value, grads = nn.value_and_grad(model, lambda m, b: objective(m, b).loss)(model, as_mx(b))
        assert rel(float(value), float(total.detach())) < 1e-4
        g = dict(tree_flatten(grads))
        pre = "model.decoder.layers"
        for i, (A, B) in lora.items():
            close(g[f"{pre}.{i}.self_attn.q_proj.lora_a"], A.grad, f"layer {i} lora_a")
            close(g[f"{pre}.{i}.self_attn.q_proj.lora_b"], B.grad, f"layer {i} lora_b")
        dense = ref.model.decoder.layers[2].mlp.down_proj.weight.grad
        close(g[f"{pre}.2.mlp.down_proj.weight"], dense, "dense MLP down_proj")
        gate_up = ref.model.decoder.layers[3].experts.gate_up_proj.grad  # [E, 2I, H]: gate rows first
        I = gate_up.shape[1] // 2
        close(g[f"{pre}.3.experts.switch_glu.gate_proj.weight"], gate_up[:, :I], "expert gate_proj")
        close(g[f"{pre}.3.experts.switch_glu.up_proj.weight"], gate_up[:, I:], "expert up_proj")
        close(g[f"{pre}.0.experts.switch_glu.down_proj.weight"], ref.model.decoder.layers[0].experts.down_proj.grad,
              "expert down_proj")


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(pair):
    """``checkpoint`` (the trainer's grad_checkpoint) recomputes each layer in the backward
    pass: the same loss and gradients, the encoder's K/V included (they are outputs of the
    checkpointed function), and the layers are plain again afterwards."""
    from mlx_dgemma.model import DecoderLayer

    _, model = pair
    batch = as_mx(make_batch(seed=4))
    model.unfreeze()
    out = []
    for ckpt in (False, True):
        value, grads = nn.value_and_grad(model, lambda m, b: objective(m, b, checkpoint=ckpt).loss)(model, batch)
        out.append((float(value), dict(tree_flatten(grads))))
    assert all(type(layer) is DecoderLayer for layer in model.layers)
    (v0, g0), (v1, g1) = out
    assert rel(v1, v0) < 1e-5
    for k in ("model.decoder.layers.0.self_attn.k_proj.weight", "model.decoder.layers.3.mlp.down_proj.weight",
              "model.decoder.layers.1.encoder_layer_scalar", "model.decoder.embed_tokens.weight"):
        a, b = np.array(g1[k]), np.array(g0[k])
        assert np.abs(b).max() > 0, k
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max(), k
