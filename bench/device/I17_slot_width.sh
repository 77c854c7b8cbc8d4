#!/usr/bin/env bash
# Device call (nvidia-h200, one call, ~2.5 min per entry of STEPS; carry [".site", "bench/device"]).
# Issue 16: a CPU probe (8 tuning people, 600 steps) read token inversion at 38.8 % with the 3-token `~ID~` slot and
# 97.5 % with the placeholder's ids three times (9 tokens). The GPU check on the 24 tuning people 500000-500023 with
# the default teacher (1,500 steps x 8 images, image prompts), whose 3-token control read 63.7 % at alpha 1
# (docs/benchmarks.md, "The ID loss in inversion", second call).
. bench/device/site.sh || exit  # diffusers + webdataset (carry .site, made by bench/device/pack_site.sh)
R=$PWD/.carry/run17; mkdir -p $R; OUT=${OUT:-$R/out}; mkdir -p $OUT; LIM=${LIM:-400}
# The first call (1,500 steps) ran docs/results/token_capacity_cpu/wide_sweep.py 3 (the width patched in); refgen has
# the setting now: InvertConfig.slot_repeat. STEPS="600 1000": does a shorter fit keep the scene (93.3 % at 1,500)?
# Each entry of STEPS is one run on the same 24 tuning people; the call stops at LIM seconds in all.
T0=$(date +%s)
for S in ${STEPS:-1500}; do
  N=k${K:-3}s$S; LEFT=$((LIM - $(date +%s) + T0)); [ $LEFT -gt 30 ] || break
  timeout $LEFT python3 bench/toyworld_invert_sweep.py --out $R/$N --test-seed 500000 --n-test 24 --n-pairs 12 \
    --variant "{\"image_prompts\": true, \"slot_repeat\": ${K:-3}, \"steps\": $S}" > $R/$N.log 2>&1
  echo "$N rc=$?"
  cp $R/$N/v0/benchmark.json $OUT/$N.json 2>/dev/null
  tail -c 3000 $R/$N.log | tr '\r' '\n' | grep -vE "Loading|it/s" | tail -n 8
done
