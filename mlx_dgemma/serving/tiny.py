"""Tiny model folders for the server's tests and benchmarks (nothing is downloaded).

``write_byte_tokenizer`` writes a byte-level tokenizer (``tokenizers`` library, no
merges: one token per UTF-8 byte) with Gemma-style special tokens and a chat template
that, like Gemma 4's, prefills an empty thought channel after the generation prompt
when thinking is off. So the rendered history of the next turn does NOT extend the
previous prompt exactly, as with the real template.

``write_random_model`` writes random MLX weights for a DiffusionGemma config (for
timing; tests that compare against the reference build their weights with
``tests/reference/hf_reference.py`` instead).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<|channel>", "<channel|>"]
PAD, EOS, BOS, START, END = 0, 1, 2, 3, 4

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
    "{% if not enable_thinking %}<|channel>thought\n<channel|>{% endif %}{% endif %}"
)

# What tiny models need from config.json to pair with this tokenizer.
TOKEN_IDS = dict(pad_token_id=PAD, eos_token_id=[EOS, END], bos_token_id=BOS)


def byte_vocab_size() -> int:
    return len(SPECIALS) + 256


def write_byte_tokenizer(path, vocab_size: Optional[int] = None, chat_template: str = CHAT_TEMPLATE) -> int:
    """Write tokenizer.json and tokenizer_config.json into ``path``; returns the
    vocabulary size (ids past the 263 used ones are ``<unusedN>`` special tokens)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab_size = vocab_size or byte_vocab_size()
    if vocab_size < byte_vocab_size():
        raise ValueError(f"a byte-level tokenizer needs vocab_size >= {byte_vocab_size()}, got {vocab_size}")
    vocab: Dict[str, int] = {s: i for i, s in enumerate(SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    unused = [f"<unused{i}>" for i in range(len(vocab), vocab_size)]
    for s in unused:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS + unused])
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
                       generation: Optional[Dict[str, Any]] = None) -> Path:
    """A DiffusionGemma folder with random MLX weights (HF key names), loadable by
    ``mlx_dgemma.load``. ``text_config``: the text config (hidden_size, layers ...).
    ``tokenizer``: add the byte-level tokenizer (``vocab_size`` must cover it);
    ``generation``: generation_config.json values on top of the token ids."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from ..config import ModelArgs
    from ..folder import hf_weights, write_model_folder
    from ..model import Model

    config = {"model_type": "diffusion_gemma", "canvas_length": canvas_length,
              "text_config": {"model_type": "diffusion_gemma_text", **TOKEN_IDS, **text_config}}
    mx.random.seed(seed)
    model = Model(ModelArgs.from_config(config))
    weights = {k: v.astype(getattr(mx, dtype)) for k, v in tree_flatten(model.parameters())}
    vocab = config["text_config"]["vocab_size"]
    gen = None if generation is None else {"eos_token_id": TOKEN_IDS["eos_token_id"], "pad_token_id": PAD,
                                           "bos_token_id": BOS, **generation}
    return write_model_folder(path, config, hf_weights(weights), generation_config=gen,
                              tokenizer=(lambda p: write_byte_tokenizer(p, vocab)) if tokenizer else None)
