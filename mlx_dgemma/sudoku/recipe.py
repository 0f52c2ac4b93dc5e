"""The Sudoku model's recipe: tokenizer, chat template, architecture, initial weights.

Design (why each choice; the numbers behind them are in benchmarks/sudoku/README.md):

- Tokenizer: one token per character (``tokenizers`` WordLevel over single characters,
  plus the role words) and one token per puzzle CELL and its content: ``A15`` is "row A,
  column 1 holds a 5", ``A2.`` "row A, column 2 is blank" (81 cells x 10 contents). 896
  ids, of which 9 are the reply's digits. The drafter renoises with tokens drawn uniformly
  from the WHOLE vocabulary: a noise token is a digit only 9/896 = 1% of the time, so, as
  with the released model's 262,144-token vocabulary, noise is easy to tell from a
  committed digit (a 16-token vocabulary would make most noise look like a move).
- Why cell tokens: RoPE is relative. Cells of a column are a fixed distance apart, but
  whether two cells share a row or a box depends on their ABSOLUTE position, which a
  decoder with plain digit tokens can only infer by counting from the prompt's start.
  With cell tokens, each canvas position finds its own cell at one fixed distance back in
  the prompt (the canvas starts 85 tokens after the first cell), and from then on
  "same row, column or box" is a match between embeddings. The first run with one token
  per character had 37% of the blanks right after 1,000 iterations and no puzzle solved.
- Prompt: the puzzle is in the user turn (81 cell tokens); the reply is the 81 digits of
  the solution then ``<turn|>``. At inference the givens are ALSO pinned
  in the canvas (canvas constraints), and so are the end-of-turn token and the fill after
  it: the model only ever chooses the blanks, and a given can never be changed. The
  puzzle stays in the prompt although pinning alone would carry it (``prompt: pins``,
  ``PINS_CHAT_TEMPLATE``: 96 tokens a sequence instead of 177) because it learns more
  per example: a 9x9 A/B from scratch (1,200 iterations) had 46% of the blanks right with
  the cells against 33% with the pins alone, whose step was only ~1.4x faster (the
  decoder still runs over the whole canvas); without cell tokens a blank's row and box
  must come from its distance to the canvas's pins. And transformers' ``generate`` and
  the autoregressive decoders cannot pin: with the puzzle in the prompt the same model
  runs everywhere.
- canvas_length 88: the 82-token reply rounded up to a multiple of 8. The prompt is 89
  tokens (``<bos><|turn>user\\n`` + 81 + ``<turn|><|turn>model\\n``).
- Architecture: the released model's at a small size (2.2M parameters): 6 layers (5
  sliding, 1 full; full layers with K = V, a double head size and proportional RoPE), MoE
  (8 experts of width 64, top-2, router frozen in training as the recipe does) with the
  dense GeGLU MLP (width 256) beside it, self-conditioning, soft-capped tied logits,
  hidden 128, 4 heads of 32. The sliding window (256) is wider than prompt + reply (177
  tokens), so training and inference see the same keys. Sized for this CPU: a training
  step of 16 examples took about 3 s here when it was chosen, so the budget is tens of
  thousands of examples, not millions. Deeper since run 3's iteration 7,217: 11 layers
  (10 sliding, 1 full; 4.1M parameters), grown from the trained 6 (``grow_layers``),
  because 6x6 pilots with twice the layers broke the plateau the shallower ones sat on.
- Data: puzzles from their own generator (``data``: randomized-search grids, random
  removal order), three easy to one medium, each line a random symmetry of a base puzzle;
  the held-out sets come from other grids, another removal order and other seeds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import mlx.core as mx

VOCAB_SIZE = 896
CANVAS_LENGTH = 88
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>"]
PAD, EOS, BOS, UNK, TURN_OPEN, TURN_CLOSE = range(6)
WORDS = ["user", "model", "system"]
CHARS = list("\n 0123456789.")
BLANK = "."
ROWS = "ABCDEFGHI"
# "A15": row A, column 1, digit 5; "A2.": row A, column 2, blank
CELLS = [f"{r}{c}{x}" for r in ROWS for c in "123456789" for x in BLANK + "123456789"]
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
# The pin-only prompt: the user turn is left empty, so the puzzle reaches the model only as
# the canvas's pins (89 + 88 tokens a training sequence become 8 + 88). The template, not
# the data, says so: a folder's chat_template.jinja tells every caller (solve, the trainer's
# tokenizer, transformers) which prompt its model reads.
PINS_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("(message['content'] | trim)",
                                           "('' if role == 'user' else message['content'] | trim)")
PROMPTS = {"cells": CHAT_TEMPLATE, "pins": PINS_CHAT_TEMPLATE}


def chat_template(prompt: str = "cells") -> str:
    """The chat template of a prompt format: ``cells`` (the puzzle's 81 cell tokens in the
    user turn, and pinned in the canvas) or ``pins`` (the canvas's pins alone)."""
    if prompt not in PROMPTS:
        raise ValueError(f"prompt must be one of {sorted(PROMPTS)}, got {prompt!r}")
    return PROMPTS[prompt]


def reads_prompt(tok) -> bool:
    """Whether a loaded Sudoku tokenizer's template puts the puzzle in the prompt (``cells``),
    not in the canvas's pins alone (``pins``)."""
    from ..chat import encode_prompt

    return len(encode_prompt(tok, prompt_messages("1" + "0" * 80))) > 81


def vocabulary() -> Dict[str, int]:
    names = SPECIAL + WORDS + CHARS + CELLS
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
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(rf"[A-I][1-9][.1-9]|{words}|[\s\S]"), behavior="isolated")
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
    grown_from: Optional[int] = None,
) -> Dict[str, Any]:
    """config.json of the Sudoku model (the converted layout, ``model_type: diffusion_gemma``).
    ``grown_from`` (a layer count) changes only how the weights start (``grow_layers``)."""
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


def cell_text(puzzle: str) -> str:
    """The user turn of a puzzle (81 characters, ``0`` or ``.`` blanks): its 81 cell tokens."""
    p = puzzle.replace("0", BLANK)
    return "".join(f"{ROWS[i // 9]}{i % 9 + 1}{x}" for i, x in enumerate(p))


def prompt_messages(puzzle: str, solution: Optional[str] = None) -> List[Dict[str, str]]:
    """The chat of one puzzle (81 characters, ``0`` or ``.`` blanks): the user turn (the
    cell tokens), and the model's reply (the 81 digits of the solution) when ``solution``
    is given."""
    msgs = [{"role": "user", "content": cell_text(puzzle)}]
    if solution is not None:
        msgs.append({"role": "assistant", "content": solution})
    return msgs


def structured_cell_embeddings(embed: mx.array) -> mx.array:
    """Initial embeddings of the cell tokens: ``(2 content + row + column + box) / sqrt(7)``.

    ``content`` is the embedding of the cell's character (its digit or ``.``), the three
    others random vectors of the embeddings' scale, one per row, column and box: at
    initialisation a cell token already reads as its digit (the reply's tokens are plain
    digits, and the tied head predicts them), and two cells of one unit already share a
    component. Training moves them freely. Dividing by sqrt(7) keeps the rows' scale.
    """
    import numpy as np

    vocab = vocabulary()
    E = np.array(embed)
    rng = np.random.default_rng(0)
    units = rng.normal(0.0, float(E.std()), (27, E.shape[1])).astype(E.dtype)
    for name in CELLS:
        r, c, x = ROWS.index(name[0]), int(name[1]) - 1, name[2]
        box = r // 3 * 3 + c // 3
        E[vocab[name]] = (2 * E[vocab[x]] + units[r] + units[9 + c] + units[18 + box]) / 7**0.5
    return mx.array(E)


_LAYER = re.compile(r"^(model\.decoder\.layers\.)(\d+)(\..*)$")


def layer_count(weights: Dict[str, mx.array]) -> int:
    """How many decoder layers a flat weight (or optimizer-state) dict holds."""
    return 1 + max((int(m.group(2)) for m in map(_LAYER.match, weights) if m), default=-1)


def grow_layers(weights: Dict[str, mx.array], old: int, new: int, fresh: str = "copy") -> Dict[str, mx.array]:
    """A ``new``-layer model's flat weights from an ``old``-layer one's, computing the same
    function: the recipe's layers are ``old - 1`` sliding ones and a full one last, so the
    sliding stack is repeated (new layer ``i`` in ``old - 1 .. new - 2`` is a copy of
    sliding layer ``(i - old + 1) % (old - 1)``) and the full layer moves to the end.

    ``fresh="copy"``: the added layers start as copies with their two post-norm weights
    (after attention, after the feed-forward sum) at zero, so each adds nothing to the
    residual stream until training grows those weights; the norm's gradient is its
    normalised input, so they grow smoothly (zeroing the projections instead would make
    the norm of a near-zero vector jump to full size at the first step) and their output
    scalars at 1 (they scale the residual stream too). ``fresh="zeros"``:
    the added layers' entries are zeros (Adam's moments of weights never trained). Keys
    outside the layers are kept. Progressive stacking, as BERT's was grown (Gong et al. 2019).
    """
    if not 1 < old < new:
        raise ValueError(f"grow_layers: can grow {old} layers only to more, not {new}")
    if fresh not in ("copy", "zeros"):
        raise ValueError(f"grow_layers: fresh must be 'copy' or 'zeros', got {fresh!r}")
    if layer_count(weights) != old:
        raise ValueError(f"grow_layers: the weights hold {layer_count(weights)} layers, expected {old}")
    source = list(range(old - 1)) + [(i - old + 1) % (old - 1) for i in range(old - 1, new - 1)] + [old - 1]
    by_layer: Dict[int, Dict[str, mx.array]] = {}
    out: Dict[str, mx.array] = {}
    for k, v in weights.items():
        m = _LAYER.match(k)
        if m:
            by_layer.setdefault(int(m.group(2)), {})[m.group(3)] = v
        else:
            out[k] = v
    for i, src in enumerate(source):
        added = old - 1 <= i < new - 1
        for rest, v in by_layer[src].items():
            post_norm = rest.startswith((".post_attention_layernorm.", ".post_feedforward_layernorm."))
            if added and (fresh == "zeros" or post_norm):
                v = mx.zeros_like(v)
            elif added and rest in (".layer_scalar", ".encoder_layer_scalar"):  # scales the whole output
                v = mx.ones_like(v)
            out[f"model.decoder.layers.{i}{rest}"] = v
    return out


def write_initial_model(path, seed: int = 0, readme: Optional[str] = None, prompt: str = "cells", **size) -> Path:
    """A freshly initialised (untrained) Sudoku model folder: the trainer's starting point.
    ``prompt``: the folder's prompt format (``chat_template``).

    MLX's default initialisations: embeddings N(0, 1/H) (unit-RMS rows after the sqrt(H)
    embedding scale, so the tied head starts with logits of order 1), projections
    U(+-1/sqrt(fan_in)), norms and layer scalars at 1; the cell tokens'
    embeddings are built from their digit's and their units' (``structured_cell_embeddings``).
    """
    from mlx.utils import tree_flatten

    from ..small_model import small_model, write_small_model

    def init(args, params):
        key = "model.decoder.embed_tokens.weight"
        return {**params, key: structured_cell_embeddings(params[key])}

    params = None
    if size.get("grown_from"):  # the smaller recipe's initial model, grown: its frozen routers included
        old = int(size["grown_from"])
        base = small_model(model_config(**dict(size, num_hidden_layers=old, grown_from=None)), seed)
        params = grow_layers(init(base.args, dict(tree_flatten(base.parameters()))), old,
                             int(size.get("num_hidden_layers", 6)))
    return write_small_model(
        path, model_config(**size), seed=seed, init=init, params=params, tokenizer=write_tokenizer,
        chat_template=chat_template(prompt),
        generation_config=dict(GENERATION_CONFIG),
        readme=readme or "# DiffusionGemma Sudoku (initial, untrained)\n\nBuilt by `mlx_dgemma.sudoku.recipe`.\n",
    )
