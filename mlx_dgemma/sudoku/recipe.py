"""The Sudoku model's recipe: tokenizer, chat template, architecture, initial weights.

Design (why each choice; the numbers behind them are in benchmarks/sudoku/README.md):

- Tokenizer: one token per character (``tokenizers`` WordLevel over single characters,
  plus the role words), 256 ids of which 9 are digits; the rest are Gemma-style specials
  and ``<unusedN>`` fillers. The drafter renoises with tokens drawn uniformly from the
  WHOLE vocabulary: with 256 ids a noise token is a digit only 9/256 = 3.5% of the time,
  so, as with the released model's 262,144-token vocabulary, noise is easy to tell from a
  committed digit (a 16-token vocabulary would make most noise look like a move).
- Prompt: the puzzle is in the user turn (81 characters, ``.`` for blanks); the reply is
  the 81 digits of the solution then ``<turn|>``. At inference the givens are ALSO pinned
  in the canvas (canvas constraints), and so are the end-of-turn token and the fill after
  it: the model only ever chooses the blanks, and a given can never be changed. The
  puzzle stays in the prompt although pinning alone would carry it (and would halve the
  training cost: 97 tokens a sequence instead of 177) because transformers' ``generate``
  and the autoregressive decoders cannot pin: with the puzzle in the prompt the same
  model runs everywhere, and every training example, at any corruption level, asks for
  the whole solution from the givens.
- canvas_length 88: the 82-token reply rounded up to a multiple of 8. The prompt is 89
  tokens (``<bos><|turn>user\\n`` + 81 + ``<turn|><|turn>model\\n``).
- Architecture: the released model's at a small size (2.2M parameters): 6 layers (5
  sliding, 1 full; full layers with K = V, a double head size and proportional RoPE), MoE
  (8 experts of width 64, top-2, router frozen in training as the recipe does) with the
  dense GeGLU MLP (width 256) beside it, self-conditioning, soft-capped tied logits,
  hidden 128, 4 heads of 32. The sliding window (256) is wider than prompt + reply (177
  tokens), so training and inference see the same keys. Sized for this CPU: a training
  step of 16 examples takes about 3 s here, so the budget is tens of thousands of
  examples, not millions.
- Data: puzzles from their own generator (``data``: randomized-search grids, random
  removal order), three easy to one medium, each line a random symmetry of a base puzzle;
  the held-out sets come from other grids, another removal order and other seeds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import mlx.core as mx

VOCAB_SIZE = 256
CANVAS_LENGTH = 88
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>"]
PAD, EOS, BOS, UNK, TURN_OPEN, TURN_CLOSE = range(6)
WORDS = ["user", "model", "system"]
CHARS = list("\n 0123456789.")
BLANK = "."
# What fills the canvas after <turn|>: the trainer fills a reply's last block with the
# model's first EOS id (config.json's eos_token_id lists <turn|> first), so inference pins
# the same.
FILL = TURN_CLOSE

# No newline between turns: the reply is exactly the 81 digits and <turn|>.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<|turn>' + role + '\\n' + (message['content'] | trim) + '<turn|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}{%- endif -%}"
)


def vocabulary() -> Dict[str, int]:
    names = SPECIAL + WORDS + CHARS
    names += [f"<unused{i}>" for i in range(VOCAB_SIZE - len(names))]
    return {t: i for i, t in enumerate(names)}


def digit_ids() -> Dict[str, int]:
    v = vocabulary()
    return {d: v[d] for d in "123456789"}


def build_tokenizer():
    """A character-level ``tokenizers.Tokenizer`` (deterministic, no training, no download)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = vocabulary()
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words = "|".join(WORDS)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(rf"{words}|[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    specials = [t for t in vocab if t.startswith("<")]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def write_tokenizer(dst: Path) -> None:
    """tokenizer.json and tokenizer_config.json (the callable ``write_model_folder`` takes)."""
    build_tokenizer().save(str(Path(dst) / "tokenizer.json"))
    (Path(dst) / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast",
        bos_token="<bos>", eos_token="<turn|>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<eos>", "<|turn>"],
        model_max_length=512, clean_up_tokenization_spaces=False,
    ), indent=2))


def model_config(
    hidden_size: int = 128,
    num_hidden_layers: int = 6,
    intermediate_size: int = 256,
    num_attention_heads: int = 4,
    head_dim: int = 32,
    num_experts: int = 8,
    top_k_experts: int = 2,
    moe_intermediate_size: int = 64,
) -> Dict[str, Any]:
    """config.json of the Sudoku model (the converted layout, ``model_type: diffusion_gemma``)."""
    from ..config import small_model_config

    ids = dict(eos_token_id=[TURN_CLOSE, EOS], pad_token_id=PAD, bos_token_id=BOS)
    config = small_model_config(
        vocab_size=VOCAB_SIZE, canvas_length=CANVAS_LENGTH, hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers, intermediate_size=intermediate_size,
        num_attention_heads=num_attention_heads, head_dim=head_dim, num_experts=num_experts,
        top_k_experts=top_k_experts, moe_intermediate_size=moe_intermediate_size, sliding_window=256,
        max_position_embeddings=512, **ids)
    return dict(config, **ids)  # the ids at the top level too, as the released config.json has them


GENERATION_CONFIG = dict(
    max_new_tokens=CANVAS_LENGTH,
    max_denoising_steps=24,
    sampler_config={"entropy_bound": 0.1},
    t_min=0.4,
    t_max=0.8,
    stability_threshold=1,
    confidence_threshold=0.005,
    eos_token_id=[TURN_CLOSE, EOS],
    pad_token_id=PAD,
    bos_token_id=BOS,
)


def prompt_messages(puzzle: str, solution: Optional[str] = None) -> List[Dict[str, str]]:
    """The chat of one puzzle (81 characters, ``0`` or ``.`` blanks): the user turn, and
    the model's reply (the 81 digits of the solution) when ``solution`` is given."""
    msgs = [{"role": "user", "content": puzzle.replace("0", BLANK)}]
    if solution is not None:
        msgs.append({"role": "assistant", "content": solution})
    return msgs


def write_initial_model(path, seed: int = 0, readme: Optional[str] = None, **size) -> Path:
    """A freshly initialised (untrained) Sudoku model folder: the trainer's starting point.

    MLX's default initialisations: embeddings N(0, 1/H) (unit-RMS rows after the sqrt(H)
    embedding scale, so the tied head starts with logits of order 1), projections
    U(+-1/sqrt(fan_in)), norms and layer scalars at 1.
    """
    from mlx.utils import tree_flatten

    from ..config import ModelArgs
    from ..folder import hf_weights, write_model_folder
    from ..model import Model

    config = model_config(**size)
    mx.random.seed(seed)
    model = Model(ModelArgs.from_config(config))
    params = dict(tree_flatten(model.parameters()))
    return write_model_folder(
        path, config, hf_weights(params), tokenizer=write_tokenizer, chat_template=CHAT_TEMPLATE,
        generation_config=dict(GENERATION_CONFIG),
        readme=readme or "# DiffusionGemma Sudoku (initial, untrained)\n\nBuilt by `mlx_dgemma.sudoku.recipe`.\n",
    )
