"""Self-speculative decoding, measured: diffusion vs verified (greedy, sample; over draft
step budgets) vs ar, on one model and a set of prompts.

    python benchmarks/bench_verify.py --model PATH_OR_NAME [--prompts FILE.jsonl]
        [--max-tokens 128] [--draft-steps 2,4,8,16] [--seeds 0] [--score exact]
        [--label TEXT] [--out benchmarks/results/verify]
    python benchmarks/bench_verify.py --model sudoku --sudoku benchmarks/sudoku/heldout_easy.txt --limit 50

Per mode, summed over prompts and seeds: tokens, model forwards after the prompt
(decoder passes + encoder passes), tokens per model forward, draft tokens accepted per
verification, decode wall time (prompt encoding excluded: it is the same in every mode)
and tokens/s; with ``--score``, the fraction of replies scored right (the Sudoku solve
rate with a Sudoku checker). The script also checks the guarantee on every run:
verified must give exactly ar's tokens for the same rule and seed.

``--prompts``: JSONL, one ``{"prompt": str or [token ids], "answer": str (optional)}``
per line (default: a few built-in prompts). ``--score``: ``exact`` (reply == answer,
both stripped), ``contains`` (answer in reply) or ``module:function`` (any callable
``f(record, reply_text) -> bool``). ``--sudoku FILE`` (lines ``puzzle [solution]``, as
``benchmarks/sudoku/heldout_*.txt``): the puzzles in the Sudoku model's prompt format,
scored by ``sudoku.is_solution`` (the solve rate), plus a "diffusion pinned" mode with
the givens pinned in the canvas as ``sudoku.solve`` does (ar and verified cannot pin).

Writes ``verify.json``, ``verify.md`` (table) and ``verify.png`` (chart) into ``--out``,
each through a temporary file renamed into place. Run it under
``flock /work/heavy.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BUILTIN_PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain why the sky is blue in three sentences.",
    "List five uses of a paperclip.",
    "What is 17 times 23? Show your work.",
]


def load_prompts(path: Optional[str]) -> List[Dict[str, Any]]:
    if path is None:
        return [{"prompt": p} for p in BUILTIN_PROMPTS]
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: {path}:{i}: not valid JSON ({e.msg})")
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), (str, list)):
            raise SystemExit(f"error: {path}:{i}: expected an object with a \"prompt\" (text or token ids)")
        out.append(rec)
    if not out:
        raise SystemExit(f"error: {path}: no prompts")
    return out


def load_sudoku(path: str, limit: int) -> List[Dict[str, Any]]:
    from mlx_dgemma.sudoku import SudokuInputError, parse

    out = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            fields = line.split()
            out.append({"puzzle": parse(fields[0], what=f"{path}:{i}")})
            if len(fields) > 1:
                out[-1]["solution"] = parse(fields[1], what=f"{path}:{i} solution")
        except SudokuInputError as e:
            raise SystemExit(f"error: {e}")
        if len(out) == limit:
            break
    if not out:
        raise SystemExit(f"error: {path}: no puzzles")
    return out


def scorer(spec: Optional[str]) -> Optional[Callable[[Dict[str, Any], str], bool]]:
    if spec is None:
        return None
    if spec == "exact":
        return lambda rec, text: text.strip() == str(rec.get("answer", "")).strip()
    if spec == "contains":
        return lambda rec, text: str(rec.get("answer", "")).strip() in text
    mod, _, fn = spec.partition(":")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError, ValueError) as e:
        raise SystemExit(f"error: --score {spec}: expected exact, contains or module:function ({e})")


def modes(draft_steps: List[int], diffusion_steps: Optional[int], pinned: bool) -> List[Dict[str, Any]]:
    out = [dict(name="diffusion", decode="diffusion", steps=diffusion_steps)]
    if pinned:
        out.append(dict(name="diffusion pinned", decode="diffusion", steps=diffusion_steps, pin=True))
    for verify in ("greedy", "sample"):
        out.append(dict(name=f"ar {verify}", decode="ar", verify=verify))
        for n in draft_steps:
            out.append(dict(name=f"verified {verify} {n}", decode="verified", verify=verify, steps=n))
    return out


def run_one(model, ids: List[int], mode: Dict[str, Any], seed: int, max_tokens: int, eos, pad, base_settings,
            pins=None):
    """Tokens, counters and decode wall time of one generation."""
    import mlx.core as mx

    from mlx_dgemma.drafter import DenoiseSettings
    from mlx_dgemma.generate import generate_blocks, generate_steps

    settings = base_settings
    if mode.get("steps"):
        settings = DenoiseSettings(**{**base_settings.__dict__, "max_denoising_steps": mode["steps"]})
    t0 = time.perf_counter()
    if mode["decode"] == "diffusion":
        tokens, passes, blocks, t_first = [], 0, 0, None
        for b in generate_blocks(model, ids, settings=settings, max_tokens=max_tokens, seeds=seed,
                                 eos_token_ids=eos, pad_token_id=pad,
                                 constraints=[pins] if mode.get("pin") else None):
            t_first = t_first or b.elapsed
            row = [int(t) for t in b.tokens[0]]
            if b.finished[0]:
                first = next((i for i, t in enumerate(row) if t in eos), None)
                row = row if first is None else row[: first + 1]
            tokens += row
            passes, blocks = int(b.total_passes[0]), b.index + 1
        tokens = tokens[:max_tokens]
        wall = b.elapsed
        rec = dict(decoder_passes=passes, encoder_passes=blocks - 1, verifications=0, accepted=0)
    else:
        last = None
        tokens = []
        for s in generate_steps(model, ids, decode=mode["decode"], verify=mode["verify"], draft_settings=settings,
                                max_tokens=max_tokens, seeds=seed, eos_token_ids=eos):
            tokens += s.tokens[0]
            last = s
        wall = last.elapsed
        rec = dict(decoder_passes=int(last.decoder_passes[0]), encoder_passes=int(last.encoder_passes[0]),
                   verifications=int(last.verifications[0]), accepted=int(last.accepted_total[0]))
    mx.synchronize()
    rec.update(tokens=tokens, n_tokens=len(tokens), wall_s=wall, total_s=time.perf_counter() - t0)
    return rec


def summarise(runs: List[Dict[str, Any]], scored: bool) -> Dict[str, Any]:
    tok = sum(r["n_tokens"] for r in runs)
    fwd = sum(r["decoder_passes"] + r["encoder_passes"] for r in runs)
    ver = sum(r["verifications"] for r in runs)
    wall = sum(r["wall_s"] for r in runs)
    out = dict(
        runs=len(runs), tokens=tok, decoder_passes=sum(r["decoder_passes"] for r in runs),
        encoder_passes=sum(r["encoder_passes"] for r in runs), model_forwards=fwd,
        tokens_per_model_forward=tok / fwd if fwd else None,
        verifications=ver, accepted_per_verification=sum(r["accepted"] for r in runs) / ver if ver else None,
        decode_s=wall, tokens_per_s=tok / wall if wall > 0 else None,
        median_decode_s=statistics.median(r["wall_s"] for r in runs),
    )
    if scored:
        out["score"] = sum(bool(r["correct"]) for r in runs) / len(runs)
    blanks = [b for r in runs for b in r.get("blanks", ())]
    if blanks:  # Sudoku: the blanks filled right (moves long before the solve rate does)
        out["blanks_right"] = sum(blanks) / len(blanks)
    return out


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def table(result: Dict[str, Any]) -> str:
    scored = any("score" in m for m in result["modes"].values())
    head = "| mode | tokens | model forwards (dec + enc) | tok / model forward | accepted / verification | decode s | tok/s |"
    sep = "|---|---:|---:|---:|---:|---:|---:|"
    if scored:
        head, sep = head + (" solve rate |" if result.get("sudoku") else " score |"), sep + "---:|"
    blanks = any("blanks_right" in m for m in result["modes"].values())
    if blanks:
        head, sep = head + " blanks right |", sep + "---:|"
    lines = [f"### {result['label']}", "", f"model `{result['model']}`, {result['prompts']} prompts x "
             f"{len(result['seeds'])} seeds, max {result['max_tokens']} tokens; {result['machine']}", "", head, sep]
    for name, m in result["modes"].items():
        row = (f"| {name} | {m['tokens']} | {m['model_forwards']} ({m['decoder_passes']} + {m['encoder_passes']}) | "
               f"{_fmt(m['tokens_per_model_forward'])} | {_fmt(m['accepted_per_verification'])} | "
               f"{m['decode_s']:.2f} | {_fmt(m['tokens_per_s'], '.1f')} |")
        if scored:
            row += f" {_fmt(m.get('score'), '.0%')} |"
        if blanks:
            row += f" {_fmt(m.get('blanks_right'), '.1%')} |"
        lines.append(row)
    lines.append("")
    lines.append(f"verified == ar (same rule, seed) on every run: {result['verified_equals_ar']}")
    return "\n".join(lines) + "\n"


def plot(result: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = result["modes"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, title in zip(axes, ("tokens_per_model_forward", "accepted_per_verification", "tokens_per_s"),
                              ("tokens per model forward", "draft tokens accepted per verification",
                               "decode tokens/s")):
        for verify, colour in (("greedy", "tab:blue"), ("sample", "tab:orange")):
            pts = sorted((int(n.split()[-1]), m[key]) for n, m in ms.items()
                         if n.startswith(f"verified {verify}") and m[key] is not None)
            if pts:
                ax.plot(*zip(*pts), "o-", color=colour, label=f"verified {verify}")
            ar = ms.get(f"ar {verify}", {}).get(key)
            if ar is not None:
                ax.axhline(ar, color=colour, ls=":", label=f"ar {verify}")
        d = ms.get("diffusion", {}).get(key)
        if d is not None:
            ax.axhline(d, color="tab:green", ls="--", label="diffusion")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("draft steps")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(result["label"], fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a model folder or a name --model accepts (demo, ...)")
    p.add_argument("--prompts", default=None, help="JSONL of {\"prompt\": ..., \"answer\": ...} (default: built in)")
    p.add_argument("--sudoku", default=None, metavar="FILE", help="Sudoku puzzles (lines: puzzle [solution]), "
                   "scored by the solve rate")
    p.add_argument("--limit", type=int, default=20, help="--sudoku: puzzles to use (default 20)")
    p.add_argument("--no-chat-template", action="store_true", help="send prompts as raw text")
    p.add_argument("--max-tokens", type=int, default=None, help="default 128 (--sudoku: one canvas)")
    p.add_argument("--draft-steps", default="2,4,8,16", help="verified draft step budgets (comma separated)")
    p.add_argument("--diffusion-steps", type=int, default=None, help="diffusion steps (default: generation_config)")
    p.add_argument("--seeds", default="0", help="seeds (comma separated)")
    p.add_argument("--score", default=None, help="exact | contains | module:function")
    p.add_argument("--label", default=None, help="title of the run (say what model this is)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "verify"))
    args = p.parse_args(argv)
    try:
        draft_steps = [int(s) for s in args.draft_steps.split(",") if s]
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        raise SystemExit("error: --draft-steps and --seeds take comma-separated integers")
    if not draft_steps or min(draft_steps) < 1 or (args.max_tokens or 1) < 1 or not seeds:
        raise SystemExit("error: --draft-steps must be >= 1, --max-tokens >= 1, and at least one seed")
    if args.sudoku and (args.prompts or args.score):
        raise SystemExit("error: --sudoku brings its own prompts and score; drop --prompts / --score")
    records = load_sudoku(args.sudoku, args.limit) if args.sudoku else load_prompts(args.prompts)
    score = scorer(args.score)

    import mlx.core as mx

    from mlx_dgemma.chat import encode_prompt
    from mlx_dgemma.cli import resolve_model
    from mlx_dgemma.generate import generation_defaults, make_settings, resolve_ids

    model, tok, is_demo = resolve_model(args.model, lambda m: print(m, file=sys.stderr))
    eos, pad = resolve_ids(model, generation_defaults(model))
    base = make_settings(model, None)
    label = args.label or (f"{args.model} (UNTRAINED demo weights: checks the script, not a result)"
                           if is_demo else args.model)
    pins = [None] * len(records)
    if args.sudoku:
        from mlx_dgemma.sudoku import _grid_of, blanks_right, constraints_for, is_solution  # the package's own reading
        from mlx_dgemma.sudoku.recipe import prompt_messages

        prompts = [encode_prompt(tok, prompt_messages(r["puzzle"])) for r in records]
        pins = [constraints_for(r["puzzle"], tok) for r in records]

        def score(rec, text, tokens):
            return is_solution(rec["puzzle"], _grid_of(tokens, tok))
    else:
        prompts = [r["prompt"] if isinstance(r["prompt"], list) else
                   encode_prompt(tok, r["prompt"], chat_template=not args.no_chat_template) for r in records]
        if score is not None:
            text_score = score

            def score(rec, text, tokens):
                return text_score(rec, text)
    max_tokens = args.max_tokens or (model.args.canvas_length if args.sudoku else 128)

    runs: Dict[str, List[Dict[str, Any]]] = {}
    ar_tokens: Dict[tuple, List[int]] = {}
    equal = True
    for mode in modes(draft_steps, args.diffusion_steps, pinned=bool(args.sudoku)):
        runs[mode["name"]] = []
        for i, (rec, ids) in enumerate(zip(records, prompts)):
            for seed in seeds:
                r = run_one(model, ids, mode, seed, max_tokens, eos, pad, base, pins[i])
                if score is not None:
                    text = tok.decode([t for t in r["tokens"] if t not in eos], skip_special_tokens=True)
                    r["correct"] = bool(score(rec, text, r["tokens"]))
                if args.sudoku and rec.get("solution"):
                    r["blanks"] = blanks_right(rec["puzzle"], _grid_of(r["tokens"], tok), rec["solution"])
                key = (mode.get("verify"), i, seed)
                if mode["decode"] == "ar":
                    ar_tokens[key] = r["tokens"]
                elif mode["decode"] == "verified" and r["tokens"] != ar_tokens.get(key):
                    equal = False
                    print(f"MISMATCH: {mode['name']} prompt {i} seed {seed} differs from ar", file=sys.stderr)
                runs[mode["name"]].append(r)
        s = summarise(runs[mode["name"]], score is not None)
        print(f"{mode['name']:>22}: {s['tokens']} tok, {_fmt(s['tokens_per_model_forward'])} tok/forward, "
              f"{_fmt(s['accepted_per_verification'])} accepted/verification, {s['decode_s']:.2f} s", flush=True)

    result = dict(
        label=label, model=args.model, untrained=is_demo, prompts=len(records), seeds=seeds,
        max_tokens=max_tokens, sudoku=args.sudoku, draft_steps=draft_steps, diffusion_steps=args.diffusion_steps or base.max_denoising_steps,
        machine=f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, MLX {mx.__version__} "
                f"{'GPU' if mx.default_device() == mx.gpu else 'CPU'}, load {os.getloadavg()[0]:.1f}",
        verified_equals_ar=equal,
        modes={name: summarise(rs, score is not None) for name, rs in runs.items()},
        runs={name: [{k: v for k, v in r.items() if k not in ("tokens", "blanks")} for r in rs] for name, rs in runs.items()},
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "verify.json", json.dumps(result, indent=1))
    _write(out / "verify.md", table(result))
    plot(result, out / "verify.png")
    print(table(result))
    print(f"wrote {out}/verify.json, verify.md, verify.png")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
