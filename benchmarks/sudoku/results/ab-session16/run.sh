#!/bin/bash
# The A/B's arms one after the other, each alone (the sixteenth session ran enc0-seed0 and
# issue-seed0, which decided it; the seed-1 pair is here for a rerun):
#   benchmarks/sudoku/results/ab-session16/run.sh /work/ab16 enc0-seed0 issue-seed0
# (after mkdata.py; a folder that has saves resumes with --resume). The trainer names
# OpenBLAS's core itself (mlx_dgemma.runtime); the sixteenth session set
# OPENBLAS_CORETYPE=SkylakeX by hand before that landed.
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$1; shift
cd "$HERE/../../../.."
for arm in "$@"; do
  resume=; [ -f "$WORK/$arm/progress.json" ] && resume=--resume
  echo "== $arm $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg) $resume"
  nice -n 2 python -m mlx_dgemma.sudoku.train -c "$HERE/$arm/train.yaml" --out "$WORK/$arm" \
    --record "$WORK/$arm/record" --ship "$WORK/$arm/shipped" $resume >> "$WORK/$arm.log" 2>&1 < /dev/null
  echo "rc=$? $(date -u +%H:%M:%S)"
done
