"""transformers' own ``generate`` on an exported Sudoku model (run by run.py in a clean
process: without the OpenBLAS preload, which slows torch down).

    python benchmarks/sudoku/hf_generate.py HF_FOLDER PAIRS.txt [STEPS]

Prints one JSON line: solve rate, seconds per puzzle, tokens per forward. The puzzle is in
the prompt only (transformers cannot pin canvas positions); the sampler settings are the
folder's generation_config.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))


def main() -> int:
    import torch
    from transformers import AutoTokenizer
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaForBlockDiffusion

    from mlx_dgemma.sudoku.grid import is_solution
    from mlx_dgemma.sudoku.recipe import prompt_messages

    folder, pairs_file = Path(sys.argv[1]), Path(sys.argv[2])
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else None
    pairs = [line.split() for line in pairs_file.read_text().splitlines() if line.strip()]
    tok = AutoTokenizer.from_pretrained(folder)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=torch.float32).eval()
    torch.manual_seed(0)
    solved, tpf, t0 = 0, [], time.perf_counter()
    batch = 16
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        ids = [tok.apply_chat_template(prompt_messages(p), add_generation_prompt=True, tokenize=True) for p, _ in chunk]
        ids = [x["input_ids"] if hasattr(x, "keys") else x for x in ids]
        kw = {"max_denoising_steps": steps} if steps else {}
        with torch.no_grad():
            out = model.generate(torch.tensor(ids), max_new_tokens=model.config.canvas_length, **kw)
        gen = out.sequences[:, len(ids[0]):].tolist()
        tpf += [float(x) for x in out.tokens_per_forward]
        for (p, s), row in zip(chunk, gen):
            text = tok.decode(row[:81])
            solved += is_solution(p, text if len(text) == 81 else "")
    n = len(pairs)
    print(json.dumps({"n": n, "solved": solved, "solve_rate": solved / n, "s_per_puzzle": (time.perf_counter() - t0) / n,
                      "tokens_per_forward": sum(tpf) / len(tpf), "batch": batch}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
