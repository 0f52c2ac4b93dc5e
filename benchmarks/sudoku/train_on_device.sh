#!/usr/bin/env bash
# Sudoku training on a lent GPU machine (issue 19, item 4) and the CUDA checks, in device
# calls prepared here: run 3 continues from the checkpoint committed in the tree on MLX's CUDA
# backend, stops with a save before the call's limit (SIGTERM: tuner.stop), and the save comes
# back in parts under the device tool's 16 MiB a file.
#
# 1. Here, in the project root (downloads MLX's CUDA build and mlx-lm for the machine's
#    Python 3.12, in parts that fit beside the working tree in one call's 64 MiB):
#      bash benchmarks/sudoku/train_on_device.sh --prepare
#    It prints the device calls: one per part (carry [".whl/N"]), back to back (a machine
#    stays warm ~30 s), the last of which trains:
#      mkdir -p /tmp/mlxwhl && cp .whl/N/* /tmp/mlxwhl/ && bash benchmarks/sudoku/train_on_device.sh 520
# 2. Here, afterwards (FILES_AT: the last reply's files_at):
#      bash benchmarks/sudoku/train_on_device.sh --unpack FILES_AT /work/run-device
#      python -m mlx_dgemma.sudoku.train --out /work/run-device --record /work/run-device/record --resume
#    (or --export-checkpoint to commit it); FILES_AT also holds the training log and the CUDA
#    checks' summary.
#
# The budget (seconds, from the script's start): installing, then the CUDA checks at most
# 120 s, then the data (made by every core: the same lines, data.make_puzzles), tokenizing
# and training take what is left but 45 s, which packing needs. DRY_RUN=1 tries it where
# there is no CUDA (the CPU trains, nothing installed, no CUDA checks; RUN=a folder that
# holds data/ already saves making it).
set -uo pipefail
PY=${PYTHON:-python3}

if [ "${1:-}" = "--prepare" ]; then
  set -e
  bash ../shared/device/prepare-mlx-cuda.sh  # .whl/a and .whl/b: the parts of its own split
  tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
  room=$(( 64 * 1024 * 1024 - tree - 3 * 1024 * 1024 ))  # a call's 64 MiB less the tree, less a margin
  name=$(cat .whl/b/NAME)
  cat .whl/a/cuda.part-* .whl/b/cuda.part-* > ".whl/$name"
  mkdir -p .whl/parts && split -b "$room" -d ".whl/$name" .whl/parts/cuda.part-
  n=$(ls .whl/parts | wc -l)
  for i in $(seq 1 "$n"); do mkdir -p ".whl/$i" && mv ".whl/parts/cuda.part-$(printf %02d $((i - 1)))" ".whl/$i/"; done
  mv .whl/a/mlx-*.whl .whl/b/mlx_lm-*.whl .whl/b/NAME ".whl/$n/"
  rm -rf .whl/a .whl/b .whl/parts ".whl/$name"
  du -sh .whl/*
  for i in $(seq 1 $((n - 1))); do
    echo "device call $i: carry [\".whl/$i\"]: mkdir -p /tmp/mlxwhl && cp .whl/$i/* /tmp/mlxwhl/"
  done
  echo "device call $n: carry [\".whl/$n\"], timeout_s 600:" \
       "mkdir -p /tmp/mlxwhl && cp .whl/$n/* /tmp/mlxwhl/ && bash benchmarks/sudoku/train_on_device.sh 520"
  exit
fi

if [ "${1:-}" = "--unpack" ]; then
  src=${2:?FILES_AT}; dst=${3:?a run folder}
  mkdir -p "$dst" && cat "$src"/run.tgz.part-* | tar -xz -C "$dst" \
    && echo "unpacked the save $(cat "$dst/progress.json") into $dst"
  exit
fi

BUDGET=${1:-520}
START=$(date +%s)
OUT_DIR=${OUT:-/tmp/sudoku-device}
RUN=${RUN:-/tmp/sudoku-run}
DRY_RUN=${DRY_RUN:-0}
mkdir -p "$OUT_DIR" "$RUN"
export PYTHONUNBUFFERED=1
if [ "$DRY_RUN" != 1 ]; then
  # MLX's CUDA build, from the parts the calls brought (--prepare)
  w=/tmp/mlxwhl
  cat "$w"/cuda.part-* > "$w/$(cat "$w/NAME")" && rm -f "$w"/cuda.part-* \
    && $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$w"/*.whl \
    || { echo "installing MLX's CUDA build failed" | tee "$OUT_DIR/train.log"; exit 2; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
if [ "$DRY_RUN" != 1 ]; then
  if ! $PY -c "import mlx.core as mx, sys; sys.exit(0 if mx.cuda.is_available() else 1)"; then
    echo "MLX's CUDA backend is not available here" | tee "$OUT_DIR/train.log"
    exit 2
  fi
  # 1. The CUDA kernels' checks (they have never run on a GPU): their summary alone comes back.
  timeout -s TERM 120 bash tests/device/run_cuda_checks.sh /tmp/cuda_checks > /tmp/cuda_checks.log 2>&1
  echo "run_cuda_checks.sh: exit $?" >> /tmp/cuda_checks/summary.txt
  cp /tmp/cuda_checks/summary.txt "$OUT_DIR/cuda_checks.txt"
fi

# 2. Training: train.yaml with what this machine changes (every core makes the data, one
# process, no solve-rate evaluations inside the call), from the committed checkpoint.
$PY - "$RUN/train.yaml" <<'PY'
import os, sys, yaml
from mlx_dgemma.sudoku.train import CONFIG, read_config
cfg = read_config(CONFIG)
cfg["data"]["workers"] = os.cpu_count()
cfg.update(processes=1, steps_per_solve_eval=10**9)
open(sys.argv[1], "w").write(yaml.safe_dump(cfg))
PY
left=$(( BUDGET - 45 - ($(date +%s) - START) ))
echo "training for at most $left s" | tee "$OUT_DIR/train.log"
timeout -s TERM -k 30 "$left" $PY -m mlx_dgemma.sudoku.train -c "$RUN/train.yaml" --out "$RUN" \
  --record "$RUN/record" --resume >> "$OUT_DIR/train.log" 2>&1
echo "train: exit $? (124: stopped at the time limit, with a save)" >> "$OUT_DIR/train.log"

# 3. The last save (weights, the moving average, Adam's state, progress.json, the curve), in parts.
if [ -f "$RUN/progress.json" ]; then
  it=$($PY -c "import json; print(json.load(open('$RUN/progress.json'))['iteration'])")
  (cd "$RUN" && tar -cf - progress.json config.json record/curve.jsonl adapters/adapter_config.json \
     "adapters/$(printf %07d "$it")_adapters.safetensors" adapters/average.safetensors \
     adapters/optimizer.safetensors 2>/dev/null | gzip -1 | split -b 15M -d - "$OUT_DIR/run.tgz.part-")
  echo "packed iteration $it: $(ls "$OUT_DIR" | grep -c run.tgz.part-) parts" | tee -a "$OUT_DIR/train.log"
fi
