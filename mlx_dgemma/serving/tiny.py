"""Tiny model folders for the server's tests and benchmarks (nothing is downloaded).

``write_byte_tokenizer`` writes a byte-level tokenizer (``tokenizers`` library, no
merges: one token per UTF-8 byte) whose special tokens are Gemma 4's control tokens
(turns, thought channel, tool declarations, calls and results, the ``<|"|>`` string
delimiter), with the Gemma 4-style chat template of :mod:`mlx_dgemma.chat_template`:
tools render, mlx-lm attaches its Gemma 4 tool parser, and, as with the real template,
the generation prompt prefills an empty thought channel when thinking is off, so the
rendered history of the next turn does NOT extend the previous prompt exactly.

``write_random_model`` writes random MLX weights for a DiffusionGemma config (for
timing; tests that compare against the reference build their weights with
``tests/reference/hf_reference.py`` instead).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

from ..chat_template import CONTROL_TOKENS, GEMMA4_CHAT_TEMPLATE, IMAGE_TOKENS, TOOL_RESPONSE_OPEN

SPECIALS = ["<pad>", "<eos>", "<bos>", *CONTROL_TOKENS]
PAD, EOS, BOS = 0, 1, 2
START, END = SPECIALS.index("<|turn>"), SPECIALS.index("<turn|>")
TOOL_RESPONSE = SPECIALS.index(TOOL_RESPONSE_OPEN)

CHAT_TEMPLATE = GEMMA4_CHAT_TEMPLATE

# What tiny models need from config.json to pair with this tokenizer. The stop tokens
# mirror the released checkpoint's [1, 106, 50]: end of text, end of turn, and the
# ``<|tool_response>`` a model writes after its calls (the tools run next).
TOKEN_IDS = dict(pad_token_id=PAD, eos_token_id=[EOS, END, TOOL_RESPONSE], bos_token_id=BOS)


def byte_vocab_size() -> int:
    return len(SPECIALS) + 256


def image_token_ids() -> Dict[str, int]:
    """config.json's image token ids for a byte tokenizer with room for them (the three
    ids right after the bytes: existing ids do not move)."""
    n = byte_vocab_size()
    return dict(boi_token_id=n, image_token_id=n + 1, eoi_token_id=n + 2)


def write_byte_tokenizer(path, vocab_size: Optional[int] = None, chat_template: str = CHAT_TEMPLATE) -> int:
    """Write tokenizer.json and tokenizer_config.json into ``path``; returns the
    vocabulary size (ids past the ``byte_vocab_size()`` used ones are ``<unusedN>``
    special tokens)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab_size = vocab_size or byte_vocab_size()
    if vocab_size < byte_vocab_size():
        raise ValueError(f"a byte-level tokenizer needs vocab_size >= {byte_vocab_size()}, got {vocab_size}")
    vocab: Dict[str, int] = {s: i for i, s in enumerate(SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    images = IMAGE_TOKENS if vocab_size >= len(vocab) + len(IMAGE_TOKENS) else []
    for s in images:  # image_token_ids()
        vocab[s] = len(vocab)
    unused = [f"<unused{i}>" for i in range(len(vocab), vocab_size)]
    for s in unused:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS + images + unused])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "chat_template": chat_template, "model_max_length": 1 << 30,
    }, indent=1))
    return vocab_size


def write_generation_config(path, **values: Any) -> None:
    cfg = {"eos_token_id": TOKEN_IDS["eos_token_id"], "pad_token_id": PAD, "bos_token_id": BOS, **values}
    (Path(path) / "generation_config.json").write_text(json.dumps(cfg, indent=1))


def write_random_model(path, text_config: Dict[str, Any], canvas_length: int = 256, seed: int = 0,
                       dtype: str = "float32", tokenizer: bool = False,
                       generation: Optional[Dict[str, Any]] = None,
                       vision_config: Optional[Dict[str, Any]] = None) -> Path:
    """A DiffusionGemma folder with random MLX weights (HF key names), loadable by
    ``mlx_dgemma.load``. ``text_config``: the text config (hidden_size, layers ...).
    ``tokenizer``: add the byte-level tokenizer (``vocab_size`` must cover it);
    ``generation``: generation_config.json values on top of the token ids.
    ``vision_config``: add a vision tower (``config.small_vision_config``) and the byte
    tokenizer's image token ids."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from ..config import ModelArgs
    from ..folder import hf_weights, write_model_folder
    from ..model import build_model

    config = {"model_type": "diffusion_gemma", "canvas_length": canvas_length,
              "text_config": {"model_type": "diffusion_gemma_text", **TOKEN_IDS, **text_config}}
    if vision_config is not None:
        config.update(vision_config=vision_config, **image_token_ids())
    mx.random.seed(seed)
    model = build_model(ModelArgs.from_config(config))
    weights = {k: v.astype(getattr(mx, dtype)) for k, v in tree_flatten(model.parameters())}
    vocab = config["text_config"]["vocab_size"]
    gen = None if generation is None else {"eos_token_id": TOKEN_IDS["eos_token_id"], "pad_token_id": PAD,
                                           "bos_token_id": BOS, **generation}
    return write_model_folder(path, config, hf_weights(weights), generation_config=gen,
                              tokenizer=(lambda p: write_byte_tokenizer(p, vocab)) if tokenizer else None)
