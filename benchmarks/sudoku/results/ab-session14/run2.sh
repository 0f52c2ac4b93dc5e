#!/bin/bash
# session 14: after the issue's-recipe arms, run 3's second cycle resumed (alone)
while pgrep -f "ab14/run1.sh|\./run1.sh" > /dev/null; do sleep 5; done
echo "train $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)"
cd /work/main && LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 nice -n 2 /work/venv/bin/python -m mlx_dgemma.sudoku.train --out /work/fork-enc0 --record /work/fork-enc0/record --resume > /work/fork-enc0/log26.txt 2>&1 < /dev/null
echo "trained rc=$? $(date -u +%H:%M:%S)"
