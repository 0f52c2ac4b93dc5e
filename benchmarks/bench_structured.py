"""Structured output, measured: constrained vs unconstrained decoding per mode.

    python benchmarks/bench_structured.py [--out benchmarks/results/structured] [--max-tokens 96]
        [--draft-steps 2] [--seeds 0] [--workloads agent,demo] [--quick]

Two workloads:

- ``demo`` (random weights, the built-in demo model: ``--model demo``): the 21 JSON
  schemas of ``tests/test_structured.py``, one prompt each, as ``response_format``
  json_schema. Only the grammar can make these replies valid;
- ``agent`` (``tests/fixtures/agent-model``, fine-tuned to call ``get_weather``): the six
  conversations of ``benchmarks/verify/agent_prompts.jsonl``, the three that call the tool
  under the grammar of ``tool_choice`` naming it (``grammar.tool_call_spec``: the call in
  Gemma 4's syntax, its arguments under the tool's schema; checked with mlx-lm's Gemma 4
  parser), the three that answer under the regex ``It is (sunny|rainy|snowy).``.

Per workload and mode (diffusion, ar, verified with ``--draft-steps``), each prompt is
run unconstrained and constrained (same seed). Reported: the share of finished
constrained replies that parse and validate (jsonschema / a full match), how many
finished, tokens/s (total tokens / total decode seconds, prompt encoding excluded, and
the median per reply), the constrained / unconstrained ratio, forced tokens (committed
without a forward of their own), and the mask time per generated token. Writes
``structured.json`` and ``structured.md`` into ``--out``. Each mode starts with one
uncounted warm-up pair. Run it under ``flock /work/heavy.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import mlx_dgemma  # noqa: E402,F401  (first: it picks the BLAS)

MODES = ("diffusion", "ar", "verified")


def demo_workload(quick: bool):
    from mlx_dgemma.loader import builtin_model_path, load
    from tests.test_structured import SCHEMAS

    model, tok = load(builtin_model_path("demo", log=lambda s: None))
    schemas = SCHEMAS[:6] if quick else SCHEMAS
    items = []
    for i, schema in enumerate(schemas):
        rf = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}

        def check(text, toks, schema=schema):
            import jsonschema

            try:
                jsonschema.validate(json.loads(text), schema)
                return True
            except (ValueError, jsonschema.ValidationError):
                return False

        items.append(dict(prompt=f"Fill in form {i}", kwargs=dict(response_format=rf), check=check))
    return "demo (random weights, 21 JSON schemas)", "demo", model, tok, items


def agent_workload(quick: bool):
    from mlx_lm.tool_parsers.gemma4 import parse_tool_call

    from mlx_dgemma.grammar import GrammarSpec, tool_call_spec
    from mlx_dgemma.loader import load

    path = ROOT / "tests" / "fixtures" / "agent-model"
    model, tok = load(path)
    vocab = tok._tokenizer.get_vocab()
    tools = [{"type": "function", "function": {  # the tool the fixture was trained with
        "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                              "required": ["city"]}}}]
    call = tool_call_spec(tools, "get_weather", vocab["<|tool_call>"], vocab["<tool_call|>"], vocab['<|"|>'])
    said = r"It is (sunny|rainy|snowy)\."

    def called(text, toks):
        raw = tok.decode(toks, skip_special_tokens=False)
        if not (raw.startswith("<|tool_call>") and "<tool_call|>" in raw):
            return False
        args = parse_tool_call(raw[len("<|tool_call>"):raw.index("<tool_call|>")])["arguments"]
        return isinstance(args.get("city"), str) and set(args) == {"city"}

    items = []
    lines = (ROOT / "benchmarks" / "verify" / "agent_prompts.jsonl").read_text().splitlines()
    for line in lines[:2] if quick else lines:
        rec = json.loads(line)
        if rec["answer"].startswith("call:"):
            items.append(dict(prompt=rec["prompt"], kwargs=dict(grammar=call), check=called))
        else:
            items.append(dict(prompt=rec["prompt"], kwargs=dict(grammar=GrammarSpec("regex", said)),
                              check=lambda text, toks: re.fullmatch(said, text) is not None))
    return "agent fixture (tests/fixtures/agent-model, fine-tuned, 6 conversations)", str(path.relative_to(ROOT)), \
        model, tok, items


def run(model, tok, prompt, mode: str, seed: int, max_tokens: int, draft_steps: int, **kwargs) -> Dict[str, Any]:
    from mlx_dgemma.generate import stream_generate

    kw = dict(draft_steps=draft_steps) if mode == "verified" else {}
    text, last, toks = [], None, []
    for r in stream_generate(model, tok, prompt, max_tokens=max_tokens, seed=seed, decode=mode,
                             chat_template=isinstance(prompt, str), **kw, **kwargs):
        text.append(r.text)
        toks += r.tokens
        last = r
    n = last.generation_tokens
    wall = n / last.generation_tps if last.generation_tps else 0.0
    return dict(text="".join(text), toks=toks, tokens=len(toks), wall_s=wall, finish=last.finish_reason,
                forced=last.forced_tokens, mask_s=last.mask_seconds, masks=last.masks,
                forwards=last.model_forwards)


def summarise(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    toks = sum(r["tokens"] for r in runs)
    wall = sum(r["wall_s"] for r in runs)
    return dict(replies=len(runs), tokens=toks, decode_s=wall, tok_s=toks / wall if wall else 0.0,
                median_tok_s=statistics.median([r["tokens"] / r["wall_s"] for r in runs if r["wall_s"] > 0] or [0]),
                finished=sum(r["finish"] == "stop" for r in runs), forced=sum(r.get("forced", 0) for r in runs),
                mask_ms_per_token=1e3 * sum(r.get("mask_s", 0.0) for r in runs) / max(toks, 1),
                forwards=sum(r["forwards"] for r in runs))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "structured"))
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--draft-steps", type=int, default=2)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--quick", action="store_true", help="a few prompts per workload (a smoke run)")
    ap.add_argument("--workloads", default="agent,demo", help="comma-separated: agent, demo (default: both)")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    builders = {"agent": agent_workload, "demo": demo_workload}
    for build in [builders[w] for w in args.workloads.split(",")]:
        label, model_name, model, tok, items = build(args.quick)
        for mode in MODES:
            it = items[0]  # warm-up (first-call compilation, caches), not counted
            run(model, tok, it["prompt"], mode, 0, args.max_tokens, args.draft_steps)
            run(model, tok, it["prompt"], mode, 0, args.max_tokens, args.draft_steps, **it["kwargs"])
            free, bound = [], []
            valid = 0
            for seed in seeds:
                for it in items:
                    free.append(run(model, tok, it["prompt"], mode, seed, args.max_tokens, args.draft_steps))
                    r = run(model, tok, it["prompt"], mode, seed, args.max_tokens, args.draft_steps, **it["kwargs"])
                    r["valid"] = r["finish"] == "stop" and bool(it["check"](r["text"], r["toks"]))
                    valid += r["valid"]
                    bound.append(r)
            u, c = summarise(free), summarise(bound)
            results.append(dict(workload=label, model=model_name, mode=mode, unconstrained=u, constrained=c,
                                finished_valid=valid, finished=c["finished"],
                                ratio=c["tok_s"] / u["tok_s"] if u["tok_s"] else 0.0,
                                samples=[{k: r[k] for k in ("text", "finish", "tokens", "forced")} for r in bound[:3]]))
            print(f"{model_name} {mode}: {valid}/{c['finished']} finished replies valid ({c['replies']} run), "
                  f"{u['tok_s']:.1f} -> {c['tok_s']:.1f} tok/s ({results[-1]['ratio']:.2f}x), forced {c['forced']}, "
                  f"mask {c['mask_ms_per_token']:.3f} ms/token", flush=True)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    import mlx.core as mx

    machine = f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, MLX {mx.__version__} " \
              f"{mx.default_device()}, load {load:.1f} at the end"
    cmd = "python benchmarks/bench_structured.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = dict(command=cmd.strip(), machine=machine, max_tokens=args.max_tokens, draft_steps=args.draft_steps,
               seeds=seeds, results=results)
    tmp = out / "structured.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out / "structured.json")
    lines = [f"`{doc['command']}` ({machine}; max {args.max_tokens} tokens, verified drafts of "
             f"{args.draft_steps} steps)", "",
             "| workload | mode | valid / finished | finished / run | tok/s free | tok/s constrained | ratio | "
             "median tok/s free / constrained | forced tokens | mask ms / token |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        u, c = r["unconstrained"], r["constrained"]
        lines.append(f"| {r['model']} | {r['mode']} | {r['finished_valid']}/{r['finished']} | "
                     f"{c['finished']}/{c['replies']} | {u['tok_s']:.1f} | {c['tok_s']:.1f} | {r['ratio']:.2f}x | "
                     f"{u['median_tok_s']:.1f} / {c['median_tok_s']:.1f} | {c['forced']} / {c['tokens']} | "
                     f"{c['mask_ms_per_token']:.3f} |")
    tmp = out / "structured.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "structured.md")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
