#!/bin/bash
# session 14: after the start-of-session CI, the recipe in the A/B's harness, two seeds, one after the other
while ! grep -q "^rc=" /tmp/ci1.log; do sleep 5; done
cd /work/main
for arm in today-seed0 today-seed1; do
  echo "== $arm $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)"
  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 nice -n 2 /work/venv/bin/python -m mlx_dgemma.sudoku.train \
    -c /work/ab14/$arm.yaml --out /work/ab14/$arm --record /work/ab14/$arm/record --ship /work/ab14/$arm/shipped > /work/ab14/$arm.log 2>&1 < /dev/null
  echo "rc=$? $(date -u +%H:%M:%S)"
done
