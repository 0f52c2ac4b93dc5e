"""The A/B's data: one folder of training lines for the four arms (made once, ~7 minutes
here), copied into each arm's folder under its own stamp. The lines carry their 'pinned'
field, which only corrupt_only_free reads, so the issue's-recipe arms use the same lines.

    python benchmarks/sudoku/results/ab-session16/mkdata.py /work/ab16
"""
import json
import shutil
import sys
from pathlib import Path

import yaml

from mlx_dgemma.sudoku.data import chat_line, write_training_data
from mlx_dgemma.sudoku.train import _same_data

HERE = Path(__file__).resolve().parent
ARMS = ["enc0-seed0", "enc0-seed1", "issue-seed0", "issue-seed1"]


def stamp(cfg):  # what sudoku.train compares before it remakes a data folder
    line = chat_line("1" + "0" * 80, "1" * 81, pinned=bool(cfg.get("corrupt_only_free", False)))
    return json.dumps(dict(_same_data(cfg["data"]), format=line), sort_keys=True)


work = Path(sys.argv[1])
cfgs = {n: yaml.safe_load((HERE / n / "train.yaml").read_text()) for n in ARMS}
assert all(_same_data(c["data"]) == _same_data(cfgs[ARMS[0]]["data"]) for c in cfgs.values())
src = work / "data-pinned"
if not (src / "stamp").is_file():
    write_training_data(src, **cfgs[ARMS[0]]["data"])
    (src / "stamp").write_text(stamp(cfgs[ARMS[0]]))
for n, c in cfgs.items():
    d = work / n / "data"
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(src, d)
    (d / "stamp").write_text(stamp(c))
