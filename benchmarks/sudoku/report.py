"""results.md (tables) and results.png (solve rate and time against the step budget;
the samplers) from run.py's results.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def write_report(r: Dict[str, Any], out: Path) -> None:
    lines = ["# Sudoku benchmark results", "",
             f"Machine: {r.get('machine', {}).get('platform', '?')}, {r.get('machine', {}).get('cpus', '?')} CPUs, "
             f"load {r.get('machine', {}).get('load_at_start', 0):.1f} at start, {r.get('load_at_end', 0):.1f} at end.", ""]
    d = r.get("difficulty")
    if d:
        lines += ["## Solve rate by difficulty (default settings)", "",
                  f"Default: up to {r.get('attempts', 1)} samples a puzzle (a grid that breaks the rules is drawn "
                  "again with a new seed); \"one sample\": the model's first sample alone. Steps count every sample's.", "",
                  "| set | puzzles | solved | solve rate | samples | steps | tokens/forward | blanks/forward | batched s/puzzle |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for k, v in d.items():
            lines.append(f"| {k.replace('_', ' ')} | {v['n']} | {v['solved']} | {pct(v['solve_rate'])} | "
                         f"{v.get('samples', 1):.2f} | {v['passes']:.1f} | "
                         f"{v['tokens_per_forward']:.1f} | {v['cells_per_forward']:.1f} | {v['batched_s_per_puzzle']:.3f} |")
        lines.append("")
    if r.get("latency"):
        la = r["latency"]
        one = f" (easy, one sample: {la['easy_one_sample_s']:.3f} s)" if "easy_one_sample_s" in la else ""
        lines += [f"One puzzle alone (batch 1, median): easy {la['easy_s']:.3f} s, medium {la['medium_s']:.3f} s{one}.", ""]
        if "easy_mean_s" in la:
            lines += [f"All {la['easy_n']} easy puzzles one by one: mean {la['easy_mean_s']:.3f} s, slowest "
                      f"{la['easy_max_s']:.3f} s (a puzzle the model cannot solve takes every attempt).", ""]
    if r.get("classical"):
        c = r["classical"]
        lines += [f"Classical solver (propagation + search, pure Python): easy {1e3 * c['easy_s']:.2f} ms, "
                  f"medium {1e3 * c['medium_s']:.2f} ms per puzzle (median).", ""]
    if r.get("steps"):
        lines += ["## Step budget and entropy bound (easy, one sample a puzzle)", "",
                  "| entropy bound | steps | solve rate | steps used | tokens/forward | s/puzzle (batch 1) |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for v in r["steps"]:
            lines.append(f"| {v['entropy_bound']} | {v['steps']} | {pct(v['solve_rate'])} | {v['passes']:.1f} | "
                         f"{v['tokens_per_forward']:.1f} | {v['latency_s']:.3f} |")
        lines.append("")
    if r.get("sampler"):
        lines += ["## Samplers (easy, default step budget, one sample a puzzle)", "",
                  "| sampler | setting | solve rate | steps used | tokens/forward |", "|---|---:|---:|---:|---:|"]
        for v in r["sampler"]:
            setting = f"entropy bound {v['entropy_bound']}" if v["sampler"] == "entropy-bound" else f"threshold {v['threshold']}"
            lines.append(f"| {v['sampler']} | {setting} | {pct(v['solve_rate'])} | {v['passes']:.1f} | {v['tokens_per_forward']:.1f} |")
        lines.append("")
    q = r.get("quantized")
    if q:
        lines += ["## float32 against 4-bit", "", "| weights | size | easy | easy, one sample | medium | s/puzzle (batch 1) |",
                  "|---|---:|---:|---:|---:|---:|"]
        one = lambda v: pct(v["solve_rate"]) if v else "-"  # noqa: E731
        if d and r.get("latency"):
            lines.append(f"| float32 | {q['float32_bytes'] / 1e6:.1f} MB | {pct(d['easy']['solve_rate'])} | "
                         f"{one(d.get('easy_one_sample'))} | {pct(d['medium']['solve_rate'])} | {r['latency']['easy_s']:.3f} |")
        for v in q["rows"]:
            lines.append(f"| 4-bit {v['recipe']} | {v['bytes'] / 1e6:.1f} MB | {pct(v['easy']['solve_rate'])} | "
                         f"{one(v.get('easy_one_sample'))} | {pct(v['medium']['solve_rate'])} | {v['latency_s']:.3f} |")
        lines.append("")
    t = r.get("transformers")
    if t:
        lines += ["## transformers' own generate (exported model, one sample a puzzle)", ""]
        if "error" in t or "error" in t.get("easy", {}):
            lines.append(f"Not measured: {t.get('error') or t['easy']['error']}")
        else:
            e, o = t["easy"], t["ours_unpinned_same_puzzles"]
            lines += ["| runtime | puzzles | solve rate | tokens/forward | s/puzzle |", "|---|---:|---:|---:|---:|",
                      f"| transformers generate (puzzle in the prompt) | {e['n']} | {pct(e['solve_rate'])} | "
                      f"{e['tokens_per_forward']:.1f} | {e['s_per_puzzle']:.3f} |",
                      f"| mlx_dgemma, same, unpinned | {o['n']} | {pct(o['solve_rate'])} | {o['tokens_per_forward']:.1f} | "
                      f"{o['batched_s_per_puzzle']:.3f} |"]
        lines.append("")
    (out / "results.md").write_text("\n".join(lines))
    plot(r, out / "results.png")


def plot(r: Dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    rows = r.get("steps") or []
    for eb in sorted({v["entropy_bound"] for v in rows}):
        sub = [v for v in rows if v["entropy_bound"] == eb]
        ax[0].plot([v["steps"] for v in sub], [v["solve_rate"] for v in sub], "o-", label=f"entropy bound {eb}")
        ax[1].plot([v["steps"] for v in sub], [v["latency_s"] for v in sub], "o-", label=f"entropy bound {eb}")
    ax[0].set_xlabel("step budget"), ax[0].set_ylabel("solve rate (easy)"), ax[0].set_ylim(0, 1.02), ax[0].legend()
    ax[1].set_xlabel("step budget"), ax[1].set_ylabel("seconds per puzzle (batch 1)"), ax[1].legend()
    s = r.get("sampler") or []
    labels = [("EB " + str(v["entropy_bound"])) if v["sampler"] == "entropy-bound" else f"conf {v['threshold']}" for v in s]
    ax[2].bar(range(len(s)), [v["solve_rate"] for v in s])
    ax2 = ax[2].twinx()
    ax2.plot(range(len(s)), [v["tokens_per_forward"] for v in s], "ko-")
    ax[2].set_xticks(range(len(s)), labels, rotation=30)
    ax[2].set_ylabel("solve rate (bars)"), ax2.set_ylabel("tokens per forward (line)"), ax[2].set_ylim(0, 1.02)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results"
    write_report(json.loads((out / "results.json").read_text()), out)
