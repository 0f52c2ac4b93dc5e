"""``--model demo``: a small DiffusionGemma with RANDOM (untrained) weights, built locally.

Nothing is downloaded: a byte-level BPE tokenizer is trained with the ``tokenizers``
library on a few paragraphs shipped here, a Gemma 4-style chat template (with tools,
:mod:`mlx_dgemma.chat_template`) is written beside it, and the weights are drawn at random. The folder has the converted layout (config.json
with ``model_type: diffusion_gemma`` and a ``text_config``, Hugging Face key names,
safetensors with an index, tokenizer files, chat_template.jinja, generation_config.json)
and is loaded through :func:`mlx_dgemma.load`, so the demo runs the same code path as a
real checkpoint: prefill, block diffusion, streaming, drafts, stats.

The output is gibberish by construction. The random weights give peaked predictions (so
the sampler accepts several tokens per step, as with a trained model), and special or
non-ASCII byte tokens are made unlikely so the text prints cleanly. Random weights never
settle into a stable canvas, so every block runs all its steps: the demo's
generation_config uses 16 denoising steps and a 128-token canvas (the released
checkpoint: 48 and 256) so that it finishes in seconds on a CPU.

The folder lives in ``$MLX_DGEMMA_CACHE/demo`` (default ``~/.cache/mlx_dgemma/demo``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List

import mlx.core as mx
import numpy as np

from .chat_template import CONTROL_TOKENS, GEMMA4_CHAT_TEMPLATE, TOOL_RESPONSE_OPEN
from .config import small_model_config

DEMO_VERSION = 2  # bump when the recipe changes: cached demos are rebuilt
UNTRAINED_NOTICE = "demo model: random, UNTRAINED weights -- the text is gibberish; it shows the pipeline at work"

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", *CONTROL_TOKENS]
PAD, EOS, BOS = 0, 1, 2
TURN_CLOSE = SPECIAL_TOKENS.index("<turn|>")
# end of text, end of turn, and the <|tool_response> a model writes after its calls
STOP_IDS = [EOS, TURN_CLOSE, SPECIAL_TOKENS.index(TOOL_RESPONSE_OPEN)]

# Gemma 4's template (tools, thinking): <|think|> in the system turn switches thinking
# on; with thinking off the generation prompt carries an empty thought channel.
CHAT_TEMPLATE = GEMMA4_CHAT_TEMPLATE

CORPUS = """\
DiffusionGemma writes text in blocks. A causal encoder reads the prompt and keeps its keys
and values in a cache. A bidirectional decoder with the same weights then starts from a
canvas of random tokens and denoises it over a few dozen steps: at each step it predicts
every position at once, keeps the predictions it is most sure of, and draws fresh noise
for the rest. When the canvas stops changing and the model is confident, the block is
committed, encoded into the cache, and the next block begins.
The sampler accepts the tokens with the lowest entropy whose summed uncertainty stays
under a small bound, so easy stretches of text settle in one step and hard ones take many.
The temperature falls linearly from the first step to the last. The previous step's
predictions are fed back to the decoder as a soft embedding, which is called
self-conditioning.
MLX runs the same program on Apple silicon, on the CPU and on CUDA GPUs. Arrays are lazy:
nothing is computed until a value is needed, and memory is shared between the processor
and the graphics cores on a Mac.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.
One, two, three, four, five, six, seven, eight, nine, ten. Monday, Tuesday, Wednesday,
Thursday, Friday, Saturday, Sunday. January, February, March, April, May, June, July.
Hello! How are you today? I am fine, thank you. What would you like to talk about?
Let us think step by step. First, read the question. Then, write the answer clearly.
"""


def demo_config(vocab_size: int, canvas_length: int = 128) -> Dict:
    return small_model_config(
        vocab_size=vocab_size, canvas_length=canvas_length, hidden_size=128, num_hidden_layers=4,
        intermediate_size=256, num_attention_heads=4, head_dim=32, num_experts=8, top_k_experts=2,
        moe_intermediate_size=64, sliding_window=128, max_position_embeddings=4096,
        eos_token_id=STOP_IDS, pad_token_id=PAD, bos_token_id=BOS,
        mlx_dgemma_demo={"version": DEMO_VERSION, "untrained": True, "note": UNTRAINED_NOTICE},
    )


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on CORPUS (deterministic, no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, t
    return tok


def _printable_token_mask(tok, vocab_size: int) -> np.ndarray:
    """True for tokens that decode to plain printable ASCII (with spaces/newlines)."""
    ok = np.zeros(vocab_size, bool)
    for i in range(len(SPECIAL_TOKENS), min(vocab_size, tok.get_vocab_size())):
        s = tok.decode([i], skip_special_tokens=False)
        ok[i] = bool(s) and all(32 <= ord(c) < 127 or c == "\n" for c in s) and "\ufffd" not in s
    return ok


def build_demo(path: Path, seed: int = 0, vocab_size: int = 512, canvas_length: int = 128) -> Path:
    """Write the demo model folder at ``path`` (replacing it)."""
    from .small_model import write_small_model

    path = Path(path)
    tok = build_tokenizer(vocab_size)
    V = tok.get_vocab_size()
    config = demo_config(V, canvas_length)

    def init(args, random_params):
        r = np.random.RandomState(seed)
        # Peaked predictions: large tied embeddings make confident logits (the drafter then
        # accepts many tokens per step and stops early, as with a trained model); special and
        # non-printable byte tokens get tiny rows so they are rarely predicted.
        emb = (r.randn(V, args.hidden_size) * 1.5).astype(np.float32)
        emb[~_printable_token_mask(tok, V)] *= 0.02
        params = {"model.decoder.embed_tokens.weight": mx.array(emb)}
        for k, v in random_params.items():
            if k in params:
                continue
            if k.endswith("layer_scalar"):
                params[k] = mx.array(np.full(v.shape, 1.0, np.float32))
            elif "norm" in k or k.endswith("router.scale") or k.endswith("per_expert_scale"):
                params[k] = mx.array((1.0 + 0.1 * r.randn(*v.shape)).astype(np.float32))
            else:  # projections: fan-in scaled
                params[k] = mx.array((r.randn(*v.shape) * v.shape[-1] ** -0.5).astype(np.float32))
        # weak self-conditioning, as in a trained model that mostly trusts the canvas
        k = "model.decoder.self_conditioning.down_proj.weight"
        params[k] = params[k] * 0.1
        return params

    def write_tokenizer(dst: Path) -> None:
        tok.save(str(dst / "tokenizer.json"))
        (dst / "tokenizer_config.json").write_text(json.dumps(dict(
            tokenizer_class="PreTrainedTokenizerFast",
            bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
            additional_special_tokens=SPECIAL_TOKENS[4:],
            model_max_length=config["text_config"]["max_position_embeddings"],
            clean_up_tokenization_spaces=False,
        ), indent=2))

    write_small_model(
        path, config, seed=seed, init=init, tokenizer=write_tokenizer, chat_template=CHAT_TEMPLATE,
        generation_config=dict(
            # the released checkpoint's settings, except 16 steps (not 48): random weights
            # never settle, and the demo should finish in seconds on a CPU
            max_new_tokens=256, max_denoising_steps=16, sampler_config={"entropy_bound": 0.1},
            t_min=0.4, t_max=0.8, stability_threshold=1, confidence_threshold=0.005,
            eos_token_id=STOP_IDS, pad_token_id=PAD, bos_token_id=BOS,
        ),
        readme="# DiffusionGemma demo (untrained)\n\n" + UNTRAINED_NOTICE + "\n\nBuilt by `mlx_dgemma.demo`.\n",
    )
    return path


def is_current(path: Path) -> bool:
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (cfg.get("mlx_dgemma_demo") or {}).get("version") == DEMO_VERSION


def ensure_demo(path: Path, log: Callable[[str], None] = print) -> Path:
    """The demo folder at ``path`` (builtin.demo_path()), built on first use (and after a
    recipe change)."""
    path = Path(path)
    if not is_current(path):
        log(f"building the demo model (random weights, local tokenizer) in {path} ...")
        path.parent.mkdir(parents=True, exist_ok=True)
        build_demo(path)
    return path
