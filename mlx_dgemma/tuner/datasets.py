"""Training data: mlx-lm's JSONL formats, made into block-diffusion batches.

The formats are mlx-lm's (its ``create_dataset`` picks one from the first record):
chat (``{"messages": [...], "tools": [...]}``), completions (``{"prompt", "completion"}``)
and text (``{"text"}``). What differs is what gets supervised:

- chat and completions: only the final assistant reply. The prompt is the conversation
  before it rendered with the generation prompt, exactly as ``mlx_dgemma.generate``
  renders it; the reply is the final turn as the template renders it AFTER the model-turn
  header (its content and the turn's close), because the released template has no
  generation tags and a naive split would teach the model to write the header again.
- text: the whole text after the BOS token, with an EOS appended (as mlx-lm does).

A batch row is ``prompt + reply + EOS fill``: the reply is cut into canvases of
``canvas_length`` aligned to its first token, and the last canvas is filled with EOS up
to its end (the fill is attended and supervised). Rows are right-padded.

A record may also carry ``"pinned"``: indices of the reply's positions (its tokens, then
the EOS fill of its last canvas) that inference pins in the canvas (e.g. a Sudoku's
givens). With ``BatchSpec.corrupt_only_free`` those positions are never corrupted: they
stay clean in the scored canvas, as pinning keeps them at inference. Without the field
(or with the option off) every position is corrupted as the published objective does.

Errors are one line and name the file and line (or the split) that is wrong.
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .draws import EPS, make_draws
from ..errors import DataError  # noqa: F401  (raised here; defined with the others)

SPLITS = ("train", "valid", "test")


@dataclass
class Example:
    prompt: List[int]
    response: List[int]
    source: str = ""  # "file:line", for messages
    pinned: Tuple[int, ...] = ()  # reply positions inference pins (see the module's docstring)

    def __len__(self) -> int:
        return len(self.prompt) + len(self.response)


def read_jsonl(path: Path) -> List[Tuple[int, Any]]:
    """(line number, record) for every non-blank line of ``path``."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        records.append((n, rec))
    return records


def _template(tokenizer, messages, tools, **kw):
    return tokenizer.apply_chat_template(messages, tools=tools, enable_thinking=False, **kw)


def _ids(x) -> List[int]:
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    return [int(t) for t in x]


REPLY_MARK = "MLXDGEMMAREPLYMARK"


def chat_example(tokenizer, messages: List[Dict[str, Any]], tools=None, source: str = "") -> Example:
    """Prompt = the history with the generation prompt (as inference renders it); response
    = the final assistant turn as the template renders it after the turn's header: its
    content (stripped, as the template does) and the turn's close."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise DataError(f"{source}: 'messages' must be a non-empty list of message objects")
    last = messages[-1].get("role")
    if last != "assistant":
        raise DataError(f"{source}: no assistant turn to train on (the last message's role is {last!r})")
    if len(messages) < 2:
        raise DataError(f"{source}: the assistant reply has no prompt before it")
    # The marker stands for the whole reply: without the reply's tool calls, which the
    # template renders BEFORE the content (the calls would otherwise count as prompt).
    reply = {k: v for k, v in messages[-1].items() if k != "tool_calls"}
    marked = messages[:-1] + [{**reply, "content": REPLY_MARK}]
    try:
        prompt = _ids(_template(tokenizer, messages[:-1], tools, add_generation_prompt=True, tokenize=True))
        full = _template(tokenizer, messages, tools, tokenize=False)
        before, found, _ = _template(tokenizer, marked, tools, tokenize=False).partition(REPLY_MARK)
    except Exception as e:  # template errors (bad roles, bad tool specs)
        raise DataError(f"{source}: the chat template failed ({type(e).__name__}: {e})".splitlines()[0]) from None
    # Where the reply starts: right after the model turn's header, found by rendering the
    # conversation with a marker as the reply (the header may differ from the generation
    # prompt, which can prefill more, e.g. an empty thought channel).
    if not found or not full.startswith(before):
        raise DataError(f"{source}: cannot find the assistant reply in the chat template's rendering")
    response = _ids(tokenizer.encode(full[len(before):], add_special_tokens=False))
    if not response:
        raise DataError(f"{source}: the assistant reply is empty")
    return Example(prompt, response, source)


def text_example(tokenizer, text: str, source: str = "") -> Example:
    if not isinstance(text, str) or not text:
        raise DataError(f"{source}: the text is empty")
    ids = _ids(tokenizer.encode(text))
    eos = tokenizer.eos_token_id
    if eos is not None and ids[-1] != eos:
        ids.append(eos)
    bos = getattr(tokenizer, "bos_token_id", None)
    k = 1 if ids and bos is not None and ids[0] == bos else 0
    if len(ids) <= k:
        raise DataError(f"{source}: the text is empty")
    return Example(ids[:k], ids[k:], source)


def read_pinned(value: Any, source: str) -> Tuple[int, ...]:
    """The record's ``"pinned"`` field: distinct non-negative integer positions of the reply."""
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise DataError(f"{source}: 'pinned' must be a list of integer reply positions, got {json.dumps(value)[:60]}")
    bad = [i for i in value if i < 0]
    if bad:
        raise DataError(f"{source}: 'pinned' position {bad[0]} is negative "
                        "(positions count from the reply's first token)")
    if len(set(value)) != len(value):
        dup = next(i for i in value if value.count(i) > 1)
        raise DataError(f"{source}: 'pinned' lists position {dup} twice")
    return tuple(sorted(value))


def check_pinned(dataset: Sequence[Example], canvas_length: int) -> None:
    """Every pinned position lies in the reply's canvases (its tokens and the EOS fill)."""
    for ex in dataset:
        if ex.pinned:
            end = num_blocks(ex, canvas_length) * canvas_length
            if ex.pinned[-1] >= end:
                raise DataError(
                    f"{ex.source}: 'pinned' position {ex.pinned[-1]} is past the reply's canvases ({end} positions: "
                    f"{len(ex.response)} reply tokens and the EOS fill to a multiple of {canvas_length})")


def _format_of(records, tokenizer, config, path: Path):
    """mlx-lm's dataset for the first record (which fixes the format and the key names)."""
    from mlx_lm.tuner.datasets import create_dataset

    try:
        return create_dataset([records[0][1]], tokenizer, config)
    except ValueError:
        keys = ", ".join(sorted(records[0][1])) or "none"
        raise DataError(
            f"{path}:{records[0][0]}: unknown record format (keys: {keys}); expected 'messages' (chat), "
            "'prompt' and 'completion' (completions) or 'text'"
        ) from None


def load_split(path: Path, tokenizer, config=None, max_seq_length: Optional[int] = None) -> List[Example]:
    """The examples of one JSONL file; the format comes from its first record."""
    from mlx_lm.tuner.datasets import ChatDataset, CompletionsDataset

    config = config or types.SimpleNamespace()
    records = read_jsonl(path)
    if not records:
        raise DataError(f"{path}: the split is empty")
    fmt = _format_of(records, tokenizer, config, path)
    out = []
    truncated = 0
    for n, rec in records:
        src = f"{path}:{n}"
        if isinstance(fmt, ChatDataset):
            if fmt.chat_key not in rec:
                raise DataError(f"{src}: no {fmt.chat_key!r} key (the file's first record is in chat format)")
            ex = chat_example(tokenizer, rec[fmt.chat_key], rec.get("tools"), src)
        elif isinstance(fmt, CompletionsDataset):
            missing = [k for k in (fmt.prompt_key, fmt.completion_key) if k not in rec]
            if missing:
                raise DataError(f"{src}: no {missing[0]!r} key (the file's first record is in completions format)")
            messages = [{"role": "user", "content": rec[fmt.prompt_key]},
                        {"role": "assistant", "content": rec[fmt.completion_key]}]
            ex = chat_example(tokenizer, messages, rec.get("tools"), src)
        else:
            if fmt.text_key not in rec:
                raise DataError(f"{src}: no {fmt.text_key!r} key (the file's first record is in text format)")
            ex = text_example(tokenizer, rec[fmt.text_key], src)
        if "pinned" in rec:
            ex.pinned = read_pinned(rec["pinned"], src)
        if max_seq_length is not None:
            if len(ex.prompt) >= max_seq_length:
                raise DataError(
                    f"{src}: the prompt alone is {len(ex.prompt)} tokens, no room for a reply within "
                    f"--max-seq-length {max_seq_length}"
                )
            if len(ex) > max_seq_length:
                ex.response = ex.response[: max_seq_length - len(ex.prompt)]
                truncated += 1
        out.append(ex)
    if truncated:
        print(f"[WARNING] {path}: {truncated} replies truncated to fit --max-seq-length {max_seq_length}")
    return out


def load_dataset(args, tokenizer) -> Tuple[List[Example], List[Example], List[Example]]:
    """``train``, ``valid``, ``test`` from the folder ``args.data`` (mlx-lm's layout).

    A split that training (``args.train``) or testing (``args.test``) needs must exist and
    be non-empty; ``valid.jsonl`` is optional (training then runs without validation).
    """
    data = Path(args.data)
    if not data.is_dir():
        raise DataError(f"--data {data}: not a folder (expected train.jsonl, valid.jsonl, test.jsonl in it)")
    max_len = getattr(args, "max_seq_length", None)
    needed = {"train": bool(getattr(args, "train", False)), "valid": False, "test": bool(getattr(args, "test", False))}
    out = []
    for name in SPLITS:
        path = data / f"{name}.jsonl"
        if not path.exists():
            if needed[name]:
                raise DataError(f"{path}: missing ({'--train' if name == 'train' else '--test'} needs it)")
            out.append([])
            continue
        out.append(load_split(path, tokenizer, args, max_len))
    return tuple(out)


# -- batches ---------------------------------------------------------------------------


def num_blocks(ex: Example, canvas_length: int) -> int:
    return -(-len(ex.response) // canvas_length)


def collate(examples: Sequence[Example], canvas_length: int, eos: int, pad: int, pad_to: int = 32):
    """``tokens`` [B, T] (prompt + reply + EOS fill, right-padded with ``pad`` to a multiple
    of ``pad_to``), ``prompt_lengths`` [B], ``lengths`` [B] (end of the fill)."""
    ends = [len(e.prompt) + num_blocks(e, canvas_length) * canvas_length for e in examples]
    T = max(ends)
    T = -(-T // pad_to) * pad_to if pad_to > 1 else T
    tokens = np.full((len(examples), T), pad, dtype=np.int32)
    for b, (e, end) in enumerate(zip(examples, ends)):
        n = len(e)
        tokens[b, :n] = e.prompt + e.response
        tokens[b, n:end] = eos
    return {
        "tokens": tokens,
        "prompt_lengths": np.array([len(e.prompt) for e in examples], np.int32),
        "lengths": np.array(ends, np.int32),
    }


@dataclass
class BatchSpec:
    """What turns examples into batches: the model's geometry and the draws' settings."""

    canvas_length: int
    vocab_size: int
    eos: int
    pad: int
    seed: int = 0
    self_conditioning_p: float = 0.5
    pad_to: int = 32
    corrupt_only_free: bool = False  # never corrupt an example's pinned positions
    corrupted_loss_weight: float = 1.0  # the diffusion loss's weight on corrupted positions (clean: 1)
    min_corruption_level: float = EPS  # corruption levels are drawn uniform over [this, 1)


def draw_batch(examples: Sequence[Example], ids: Sequence[int], iteration: int,
               spec: BatchSpec) -> Dict[str, np.ndarray]:
    """The draws of ``examples`` (dataset indices ``ids``) at ``iteration``; with
    ``spec.corrupt_only_free`` the pinned positions of each scored block are taken out of
    its corruption mask (every other draw unchanged: the same keys)."""
    L = spec.canvas_length
    d = make_draws(spec.seed, iteration, ids, [num_blocks(e, L) for e in examples], L, spec.vocab_size,
                   spec.self_conditioning_p, eps=spec.min_corruption_level)
    if spec.corrupt_only_free:
        for b, (e, block) in enumerate(zip(examples, d["blocks"])):
            at = [p - block * L for p in e.pinned if block * L <= p < (block + 1) * L]
            d["corrupt"][b, at] = False
    return d


def diffusion_weight(examples: Sequence[Example], ids: Sequence[int], iteration: int, spec: BatchSpec) -> float:
    """The diffusion loss's denominator for these examples: their scored positions (whole
    canvases), corrupted ones counted ``spec.corrupted_loss_weight`` times."""
    n = len(examples) * spec.canvas_length
    if spec.corrupted_loss_weight == 1.0 or not examples:
        return float(n)
    corrupted = int(draw_batch(examples, ids, iteration, spec)["corrupt"].sum())
    return float(n + (spec.corrupted_loss_weight - 1.0) * corrupted)


def make_batch(examples: Sequence[Example], ids: Sequence[int], iteration: int, spec: BatchSpec,
               group: Sequence[Example], diffusion_denominator: Optional[float] = None) -> Dict[str, mx.array]:
    """One (local) batch with its draws, keyed by dataset index ``ids``; the loss
    denominators count the whole ``group`` (every example of the optimizer step, on every
    process), so that splitting a step over processes or micro-batches changes nothing.
    ``diffusion_denominator``: the group's weighted count (``diffusion_weight`` summed over
    the step's micro-batches); by default ``group``'s positions, with ``group`` drawn at
    ``iteration`` as if it were these examples (exact when ``group`` is this batch)."""
    L = spec.canvas_length
    batch = collate(examples, L, spec.eos, spec.pad, spec.pad_to)
    d = draw_batch(examples, ids, iteration, spec)
    batch.update({k: d[k] for k in ("blocks", "corrupt", "noise", "self_condition")})
    # the rows whose coin is heads: the objective runs self-conditioning's pass 1 on them alone
    batch["self_conditioned"] = np.flatnonzero(d["self_condition"]).astype(np.int32)
    enc = sum(len(e.prompt) + num_blocks(e, L) * L - 1 for e in group)
    if diffusion_denominator is None:
        diffusion_denominator = len(group) * L
        if spec.corrupted_loss_weight != 1.0 and list(group) == list(examples):
            diffusion_denominator = diffusion_weight(examples, ids, iteration, spec)
    batch["denominators"] = np.array([diffusion_denominator, enc], np.float32)
    return {k: mx.array(v) for k, v in batch.items()}


def iterate_batches(
    dataset: Sequence[Example],
    batch_size: int,
    spec: BatchSpec,
    loop: bool = False,
    shuffle: bool = True,
    comm_group=None,
    accumulation_steps: int = 1,
    start_iteration: int = 1,
) -> Iterator[Tuple[Dict[str, mx.array], bool]]:
    """``(batch, last)`` pairs, ``last`` marking a step's last micro-batch. Batches are made
    as mlx-lm makes them (examples sorted by length, ``batch_size`` per global batch, in a
    seeded random order, process ``r`` of ``n`` taking rows ``r::n``), with the objective's
    draws keyed by (seed, iteration, dataset index)."""
    if len(dataset) < batch_size:
        raise DataError(f"the dataset has {len(dataset)} examples, fewer than --batch-size {batch_size}")
    rank, size = (comm_group.rank(), comm_group.size()) if comm_group is not None else (0, 1)
    if spec.corrupt_only_free:
        check_pinned(dataset, spec.canvas_length)
    if batch_size % size:
        raise DataError(f"--batch-size {batch_size} is not divisible by the {size} processes")
    order = sorted(range(len(dataset)), key=lambda i: len(dataset[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    rng = np.random.default_rng(spec.seed)
    it = start_iteration
    while True:
        perm = rng.permutation(len(batches)) if shuffle else np.arange(len(batches))
        for g in range(0, len(perm), accumulation_steps):
            step = [batches[i] for i in perm[g : g + accumulation_steps]]
            group = [dataset[j] for b in step for j in b]
            den = None
            if spec.corrupted_loss_weight != 1.0:  # the whole step's weighted count, every process alike
                den = sum(diffusion_weight([dataset[j] for j in ids], ids, it + k, spec) for k, ids in enumerate(step))
            for k, ids in enumerate(step):
                mine = ids[rank::size]
                yield make_batch([dataset[j] for j in mine], mine, it, spec, group, den), k == len(step) - 1
                it += 1
        if not loop:
            return
