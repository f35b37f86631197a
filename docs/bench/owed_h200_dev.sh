#!/usr/bin/env bash
# Issue #16's measurements still owed on an H200 (dev script, session 50), for one device call:
#   1. the teacher-forcing step table at configs/arc1.yaml, 32 x 2048 (~250 s);
#   2. issue #16's rollout baseline (the code of 2026-11-26, commit 40d6ed0: its 22.9k) timed
#      beside today's rollout, in the same call (~150 s).
# Prepare here (git is not on the device's copy; .devrun is ignored, so it travels by carry):
#   echo /.devrun/ >> .git/info/exclude
#   mkdir -p .devrun/old && git archive 40d6ed0 | tar -x -C .devrun/old
# then run with carry [".devrun"] and a timeout of ~560 s:
#   bash docs/bench/owed_h200_dev.sh          (STEP_ONLY=1: the step table alone)
# On any card but an H200 it stops at once (an H100's numbers are in docs/benchmarks.md).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "card: $card" | tee "$OUT/card.txt"
case "$card" in *H200*) ;; *) echo "not an H200: nothing run"; exit 3 ;; esac
python -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/card.txt"
python -m train.bench --config configs/arc1.yaml --only train --lens 2048 --routings target \
  --out "$OUT/bench_train_h200.json" > "$OUT/bench_train_h200.log" 2>&1
echo "step table: rc=$?"; tail -30 "$OUT/bench_train_h200.log"
[ "${STEP_ONLY:-0}" = 1 ] && exit 0
if [ -d .devrun/old ]; then
  (cd .devrun/old && PYTHONPATH=$PWD python ../../docs/bench/rollout_baseline_dev.py \
     "$OUT/rollout_baseline_40d6ed0_h200.json") > "$OUT/rollout_baseline.log" 2>&1
  echo "baseline: rc=$?"; tail -20 "$OUT/rollout_baseline.log"
else
  echo "no .devrun/old: the baseline is not timed (see the head of this script)"
fi
python -m train.bench --config configs/arc1.yaml --only decode --lens 2048 \
  --sets fused_xla_block_moe --out "$OUT/decode_h200.json" > "$OUT/decode_h200.log" 2>&1
echo "decode: rc=$?"; tail -20 "$OUT/decode_h200.log"
