#!/usr/bin/env bash
# Device call (nvidia-h200, one call, ~8 min; carry [".site", "bench/device"]).
# Issues 16/17: identity guidance (SamplingConfig.id_guidance: the prompt without the people as a third CFG row,
# refgen.flow.identity_cfg) on the shipped toy head (the I15 r5000p24k head, bf16), scored on 96 validation people
# + 48 validation pairs (where g is chosen) and on 192 test people + 48 test pairs, alpha 1 (the head's alpha, chosen
# on validation in I15). The CPU probe on 48 validation people (docs/results/id_guidance_cpu) saw pairs 52.9 -> 59.6 %
# at g 1 and one person 83.3 -> 82.3 %. g 0 repeats the bf16 copy's baseline with the same noise.
. bench/device/site.sh || exit  # diffusers + webdataset (carry .site, made by bench/device/pack_site.sh)
R=$PWD/.carry/run16; mkdir -p $R; OUT=${OUT:-$R/out}; mkdir -p $OUT; LIM=${LIM:-560}; T0=$(date +%s)
for g in ${GS:-0 0.5 1}; do
  [ -f $R/g$g/result.json ] || timeout $((LIM - $(date +%s) + T0)) python3 bench/toyworld_head_e2e.py --out $R/g$g \
    --eval-head src/refgen/assets/toyworld/head --n-test 192 --n-val 96 --n-pairs 48 --alphas 1 --id-guidance $g \
    >> $R/g$g.log 2>&1
  echo "g$g rc=$?" >> $R/g$g.log
  cp $R/g$g/result.json $OUT/g$g.json 2>/dev/null
  tail -c 3000 $R/g$g.log | tr '\r' '\n' | grep -E "alpha|two people|rc=|timings" | tail -n 6
done
