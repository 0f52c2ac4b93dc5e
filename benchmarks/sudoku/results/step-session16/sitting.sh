#!/bin/bash
# The step against the issue's tree, one sitting, alone (session 16, an Intel Xeon of family 6
# model 207): A B C C B A. OpenBLAS 0.3.21 takes this CPU for a Prescott, so every arm runs
# with OPENBLAS_CORETYPE=SkylakeX (this tree's runtime names it itself; the issue's tree is
# given it in the environment, so both multiply with the same kernels).
R=/work/main/benchmarks/sudoku/results/step-session16
PRE=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
DATA=${DATA:-/work/ab16/data-pinned/train.jsonl}
issue() {  # the issue's own tree (7e2c49b), its trainer, one process (its config), 40 iterations
  rm -rf /tmp/it-run$1
  (cd /tmp/issue-tree && OPENBLAS_CORETYPE=SkylakeX LD_PRELOAD=$PRE /work/venv/bin/python -m mlx_dgemma.sudoku.train \
     -c $R/../step-session13/issue-tree-train.yaml --out /tmp/it-run$1 --record /tmp/it-run$1/record \
     --ship /tmp/it-run$1/ship > $R/issue-tree-run$1.log 2>&1)
}
bench() {  # this tree's trainer through bench_step.py, two ring processes (train.yaml's), 40 iterations
  name=$1; shift
  (cd /work/main && /work/venv/bin/python benchmarks/sudoku/bench_step.py --batches 16 --processes 2 --iters 40 \
     --no-torch --data $DATA "$@" --out $R/$name > $R/$name.log 2>&1)
}
echo "start $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)"
issue 1; echo "issue1 $(date -u +%H:%M:%S)"
bench cells1 --prompt cells; echo "cells1 $(date -u +%H:%M:%S)"
bench enc0-1 --encoder-loss-weight 0; echo "enc0-1 $(date -u +%H:%M:%S)"
bench enc0-2 --encoder-loss-weight 0; echo "enc0-2 $(date -u +%H:%M:%S)"
bench cells2 --prompt cells; echo "cells2 $(date -u +%H:%M:%S)"
issue 2; echo "issue2 $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)"
