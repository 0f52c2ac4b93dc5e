"""The command line of ``python -m mlx_dgemma.generate`` (and ``python -m mlx_dgemma``):
arguments, model resolution (built-in names, hub ids, Google's unconverted checkpoints
converted on first use), the terminal view of committed text and drafts. The library
loop it drives is :mod:`mlx_dgemma.generate`."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

from .drafter import SettingsError
from .generate import GenerateInputError, GenerationResponse, format_stats, make_settings, stream_generate
from .verify import DECODE_MODES

DEFAULT_MODEL = "mlx-community/diffusiongemma-26B-A4B-it-4bit"


class TerminalView:
    """Writes committed text, and (on a terminal) redraws the current draft in place.

    The draft is drawn after the committed text; before the next draft or the next
    committed text it is erased by moving the cursor back to where it started (relative
    moves, so scrolling does not matter) and clearing to the end of the screen. The
    cursor column is tracked with the terminal's autowrap rules; drafts are sanitised
    (no control characters) and cut to fit the screen.
    """

    DIM, DRAFT, RESET = "\x1b[2m", "\x1b[2;36m", "\x1b[0m"

    def __init__(self, out, tty: bool):
        import shutil

        self.out, self.tty = out, tty
        self._size = shutil.get_terminal_size
        self.col = 0
        self.draft_rows = None  # rows moved down by the draft on screen, None when no draft

    @staticmethod
    def _cells(ch: str) -> int:
        import unicodedata

        if unicodedata.combining(ch):
            return 0
        return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1

    def _put(self, text: str, width: int) -> int:
        """Write ``text``; returns the rows the cursor moved down."""
        rows = 0
        for ch in text:
            if ch == "\n":
                self.col, rows = 0, rows + 1
                continue
            w = self._cells(ch)
            if self.col + w > width:
                self.col, rows = 0, rows + 1
            self.col += w
        self.out.write(text)
        return rows

    def clear_draft(self) -> None:
        if self.draft_rows is None:
            return
        seq = f"\x1b[{self.draft_rows}A" if self.draft_rows else ""
        seq += "\r" + (f"\x1b[{self._start_col}C" if self._start_col else "") + "\x1b[J"
        self.out.write(seq)
        self.col = self._start_col
        self.draft_rows = None
        self.out.flush()

    def committed(self, text: str, dim: bool = False) -> None:
        self.clear_draft()
        if not text:
            return
        width = max(self._size().columns, 1)
        if dim and self.tty:
            self.out.write(self.DIM)
        self._put(text, width)
        if dim and self.tty:
            self.out.write(self.RESET)
        self.out.flush()

    def draft(self, status: str, text: str) -> None:
        if not self.tty:
            return
        self.clear_draft()
        size = self._size()
        width, lines = max(size.columns, 1), max(size.lines, 4)
        if self.col >= width:  # pending wrap: start the draft on the next line
            self.out.write("\r\n")
            self.col = 0
        clean = "".join(c if c.isprintable() else ("\u21b5" if c == "\n" else " ") for c in text)
        body = f"{status} {clean}"
        room = (lines - 2) * width - self.col - 1
        if len(body) > room:  # never scroll the draft's start off the screen
            body = body[: max(room - 1, 0)] + "\u2026"
        self._start_col = self.col
        self.out.write(self.DRAFT)
        self.draft_rows = self._put(body, width)
        self.out.write(self.RESET)
        self.out.flush()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_dgemma.generate",
        description="Generate text with DiffusionGemma (block diffusion) on MLX. Text streams "
        "block by block; a stats line ends the run.",
        epilog="examples:\n"
        "  python -m mlx_dgemma.generate --model demo --prompt 'Hello'    (offline, untrained)\n"
        "  python -m mlx_dgemma.generate --prompt 'Why is the sky blue?' --show-drafts\n"
        "  python -m mlx_dgemma.generate --model google/diffusiongemma-26B-A4B-it --prompt hi\n"
        "sampler defaults come from the model's generation_config.json, then the reference's\n"
        "(48 steps, entropy bound 0.1, temperature 0.8 -> 0.4).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="a model folder, a hub id (downloaded on first use; google/... originals are "
                        "converted to 4-bit on first use), 'demo': a small random-weight model built "
                        "locally, no download, or 'sudoku': the small Sudoku model shipped with the "
                        "package (default: %(default)s)")
    p.add_argument("--adapter-path", default=None,
                   help="fine-tuned adapters to apply (a folder written by python -m mlx_dgemma.lora)")
    p.add_argument("--prompt", required=True, help="the prompt (a user message unless --no-chat-template)")
    p.add_argument("--system", default=None, help="a system message (chat template only)")
    p.add_argument("--image", action="append", default=None, metavar="PATH",
                   help="an image file to show the model before the prompt (repeatable; model folders "
                        "with a vision tower)")
    p.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                   help="refuse larger --image files before decoding them (default: 50,000,000)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most (default: 256)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps per block at most (default: generation_config, else 48)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same text (default: 0)")
    p.add_argument("--no-chat-template", action="store_true", help="send the prompt as raw text")
    p.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=False,
                   help="Gemma 4 thinking mode; the thought is shown apart from the answer (default: off)")
    p.add_argument("--show-drafts", action="store_true",
                   help="redraw the canvas in place while it denoises (terminals only)")
    p.add_argument("--entropy-bound", type=float, default=None,
                   help="tokens accepted per step: higher accepts more (default: generation_config, else 0.1)")
    p.add_argument("--t-min", type=float, default=None, help="temperature at the last step (default: 0.4)")
    p.add_argument("--t-max", type=float, default=None, help="temperature at the first step (default: 0.8)")
    p.add_argument("--sc-top-k", type=int, default=None, metavar="K",
                   help="approximate self-conditioning from the K most likely tokens per position "
                        "(faster, opt-in; default: exact)")
    p.add_argument("--sampler", choices=("entropy-bound", "confidence"), default=None,
                   help="acceptance rule: the reference's entropy bound (default), or 'confidence': "
                        "accept positions whose top probability exceeds --threshold (at least one per step)")
    p.add_argument("--threshold", type=float, default=None,
                   help="top-probability threshold of --sampler confidence (default: 0.9)")
    p.add_argument("--canvas-template", default=None, metavar="TEXT",
                   help="pin the output to a template: every --hole marker is one free token, the rest "
                        "is kept as written (fill-in-the-middle, JSON skeletons, forms)")
    p.add_argument("--hole", default="_", help="the hole marker of --canvas-template (default: _)")
    p.add_argument("--decode", choices=DECODE_MODES, default="diffusion",
                   help="diffusion: block diffusion (default); ar: the encoder alone, one token per forward; "
                        "verified: the decoder drafts each block and the encoder verifies it, writing exactly "
                        "what ar writes")
    p.add_argument("--verify", choices=("greedy", "sample"), default="greedy",
                   help="the encoder's rule for --decode ar/verified: its argmax, or a sample at --temperature "
                        "keyed by seed and position (default: greedy)")
    p.add_argument("--draft-steps", type=int, default=None, metavar="N",
                   help="denoising steps per draft for --decode verified (default: --steps)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="the encoder's sampling temperature for --verify sample (default: 1.0)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json-schema", default=None, metavar="FILE",
                   help="structured output: the reply is JSON matching this JSON schema file (any --decode)")
    g.add_argument("--grammar", default=None, metavar="FILE",
                   help="structured output: the reply matches this grammar file: a .lark file is a Lark grammar "
                        "(llguidance's dialect), a .json file a JSON schema, any other file ONE regular "
                        "expression (its text without the final newline)")
    return p


def _is_original_checkpoint(spec: str) -> bool:
    """Hub ids of Google's unconverted checkpoints (converted on first use)."""
    return spec.lower().startswith("google/") and spec.count("/") == 1


def resolve_model(spec: str, log: Callable[[str], None], adapter_path: Optional[str] = None):
    """``(model, tokenizer, is_demo)`` for a --model value (with fine-tuned adapters applied)."""
    from .errors import ConfigError
    from .builtin import BUILTIN_MODELS, builtin_model_path, cache_root
    from .loader import load

    if spec in BUILTIN_MODELS:
        path = builtin_model_path(spec, log=log)
        if spec == "demo":
            from .demo import UNTRAINED_NOTICE

            log(UNTRAINED_NOTICE)
        model, tok = load(path, adapter_path=adapter_path)
        return model, tok, spec == "demo"
    local = Path(spec).expanduser()
    if not local.exists() and _is_original_checkpoint(spec):
        dest = cache_root() / "models" / (spec.replace("/", "--") + "-4bit")
        if not (dest / "config.json").is_file():
            try:
                from .convert import convert
            except ImportError as e:
                raise ConfigError(f"{spec}: converting needs mlx_dgemma.convert, which is unavailable ({e})") from None
            log(f"{spec}: converting to 4-bit MLX in {dest} (first use only) ...")
            convert(spec, dest, quantize=True, q_bits=4, log=log)
        spec = str(dest)
    elif not local.exists():
        log(f"{spec}: loading from the hub (downloaded once, then cached) ...")
    model, tok = load(spec, adapter_path=adapter_path)
    return model, tok, False


def _fail(msg: str) -> int:
    print(f"error: {msg}".splitlines()[0], file=sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    from .errors import ConfigError, WeightsError

    args = build_parser().parse_args(argv)
    if not args.prompt.strip():
        return _fail("--prompt is empty")
    if args.max_tokens < 1:
        return _fail(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.steps is not None and args.steps < 1:
        return _fail(f"--steps must be >= 1, got {args.steps}")
    if args.entropy_bound is not None and not args.entropy_bound > 0:
        return _fail(f"--entropy-bound must be > 0, got {args.entropy_bound}")
    for name in ("t_min", "t_max"):
        v = getattr(args, name)
        if v is not None and not v >= 0:
            return _fail(f"--{name.replace('_', '-')} must be >= 0, got {v}")
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        return _fail(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.canvas_template is not None and not args.canvas_template:
        return _fail("--canvas-template is empty")
    if not args.hole:
        return _fail("--hole is empty")
    if args.draft_steps is not None and args.draft_steps < 1:
        return _fail(f"--draft-steps must be >= 1, got {args.draft_steps}")
    if args.max_image_pixels is not None and args.max_image_pixels < 1:
        return _fail(f"--max-image-pixels must be >= 1, got {args.max_image_pixels}")
    if args.image and args.decode != "diffusion":
        return _fail(f"--image works with --decode diffusion only, not {args.decode}")
    if not (args.temperature > 0 and math.isfinite(args.temperature)):
        return _fail(f"--temperature must be a finite number > 0, got {args.temperature}")

    spec = None
    if args.json_schema is not None or args.grammar is not None:
        from .grammar import GrammarError, from_file

        try:  # checked before the model loads
            spec = from_file(args.json_schema, "json_schema") if args.json_schema else from_file(args.grammar)
        except GrammarError as e:
            return _fail(str(e))
        if args.canvas_template is not None:
            return _fail("--canvas-template and a grammar cannot be combined (the grammar decides every token)")
        if args.thinking:
            return _fail("a grammar constrains the whole reply: leave --thinking off")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    from . import runtime

    runtime.announce()  # which BLAS MLX's matmuls use (Linux), and how to get the fast one
    try:
        model, tokenizer, _ = resolve_model(args.model, log, args.adapter_path)
    except (ConfigError, WeightsError, SettingsError, GenerateInputError, OSError, ValueError) as e:
        return _fail(str(e) or type(e).__name__)

    out = sys.stdout
    tty = out.isatty()
    if args.show_drafts and not tty:
        log("--show-drafts: stdout is not a terminal, showing committed blocks only")
    view = TerminalView(out, tty)
    last: Optional[GenerationResponse] = None
    shown_thought = shown_answer = False
    steps_cap = None
    try:
        stream = stream_generate(
            model, tokenizer, args.prompt, max_tokens=args.max_tokens, seed=args.seed, steps=args.steps,
            entropy_bound=args.entropy_bound, t_min=args.t_min, t_max=args.t_max,
            show_drafts=args.show_drafts and tty, chat_template=not args.no_chat_template,
            thinking=args.thinking, system=args.system, sc_top_k=args.sc_top_k,
            sampler=args.sampler, threshold=args.threshold, canvas_template=args.canvas_template, hole=args.hole,
            decode=args.decode, verify=args.verify, draft_steps=args.draft_steps, temperature=args.temperature,
            images=args.image, max_image_pixels=args.max_image_pixels, grammar=spec,
        )
        draft_cap = args.draft_steps if args.decode == "verified" else None
        steps_cap = draft_cap or args.steps or make_settings(
            model, None, entropy_bound=args.entropy_bound, t_min=args.t_min, t_max=args.t_max, sampler=args.sampler,
            threshold=args.threshold).max_denoising_steps
        for r in stream:
            if r.kind == "draft":
                what = "draft" if args.decode == "verified" else "block"
                view.draft(f"[{what} {r.block + 1} \u00b7 step {r.step}/{steps_cap}]", r.text)
                continue
            if r.thought:
                if not shown_thought:
                    view.committed("Thinking:\n", dim=True)
                    shown_thought = True
                view.committed(r.thought, dim=True)
            if r.text:
                if shown_thought and not shown_answer:
                    view.committed("\n\nAnswer:\n", dim=True)
                shown_answer = True
                view.committed(r.text)
            last = r
    except GenerateInputError as e:
        view.clear_draft()
        return _fail(str(e))
    except KeyboardInterrupt:
        view.clear_draft()
        out.write("\n")
        out.flush()
        if last is None:
            log("[interrupted before the first block was committed]")
        else:
            log("[interrupted: the text above is what was committed]")
            log(format_stats(last) + " | interrupted")
        return 130
    except BrokenPipeError:
        return 0
    view.clear_draft()
    out.write("\n")
    out.flush()
    if last is not None:
        if not shown_answer and not shown_thought:
            log("(the model produced no text: it ended with an end-of-turn token right away)")
        log(format_stats(last) + f" | {last.finish_reason}")
    return 0


