#!/usr/bin/env bash
# Device call (nvidia-h200, one call, ~7 min; carry [".site", "bench/device"]).
# Issue 16, item 3 ("identity rising with alpha up to the best alpha") for the teacher from the shipped wide pair head's
# start: the 48 test people inverted 50 anchored steps from its prediction (as in I20, RUN=wp), the prediction and
# the refined residuals each scored at alpha 0.5 / 0.8 / 1 / 1.4 / 1.8 (I20 scored them at alpha 1 only). Nothing is
# chosen here. Then, at full size (random weights), the residual mode at slot_repeat 3 under `--offload model`
# (item 5: the 48 GB card's route), cut at the call's limit.
. bench/device/site.sh || exit
R=$PWD/.carry/run22; mkdir -p $R; OUT=${OUT:-$R/out}; mkdir -p $OUT; LIM=${LIM:-560}; T0=$(date +%s)
H=src/refgen/assets/toyworld/head
timeout 300 python3 bench/toyworld_invert_sweep.py --out $R/t --n-test 48 --n-pairs 24 --short-steps 50 \
  --start-head $H --start-head-alphas 0.5,0.8,1,1.4,1.8 \
  --variant '{"image_prompts": true, "slot_repeat": 3, "steps": 600, "start_weight": 1.0}' > $R/t.log 2>&1
echo "sweep rc=$?"; cp $R/t/v0/benchmark.json $OUT/test48_wp_alphas.json 2>/dev/null
tail -c 5000 $R/t.log | tr '\r' '\n' | grep -vE "Loading|it/s" | tail -n 16
timeout $((LIM - $(date +%s) + T0)) python3 bench/identity_bench.py --section invert --parts offload \
  --parametrisation free --slot-repeat 3 --out $OUT/offload_free_wide.json > $OUT/offload_free_wide.log 2>&1
echo "offload rc=$?"; grep "^|" $OUT/offload_free_wide.log | head -n 12
