#!/usr/bin/env bash
# Device call (nvidia-h200, one call, ~5 min; carry [".site", "bench/device"]).
# Issue 16, items 3 and 4 with wide slots: per-person inversion of the 48 test people (200000-200047, 24 pairs) from
# the prediction of the wide one-person head (`w`, docs/head.md), anchored to it (start_weight 1), 50 and 150 steps
# (150 = a quarter of the 600-step teacher), beside the 600-step inversion from the placeholder. The settings come
# from a CPU probe on 8 tuning people (docs/results/wide_head_start_cpu: head alone 90.0 %, +50 or +150 anchored
# steps 95.0 %, 600 steps from the placeholder 97.5 %; scene 100 / 100 / 98.8 %); nothing is chosen on test people.
# The head is not in the tree (no room beside the shipped one in a call's 64 MiB): put its kept copy in the shipped
# head's place for the call and restore it after (as for I19 with W_HEAD):
#   cp .carry/heads/w_bf16/head.* src/refgen/assets/toyworld/head/   ...   git checkout -- src/refgen/assets/toyworld/head
# Since the fourteenth session the shipped head is wp itself: without the swap this script starts from wp.
. bench/device/site.sh || exit
# RUN=wp: a second run (another start head, HEAD=...) beside the first
R=$PWD/.carry/run20${RUN:+_$RUN}; mkdir -p $R; OUT=${OUT:-$R/out}; mkdir -p $OUT; LIM=${LIM:-560}
H=${HEAD:-src/refgen/assets/toyworld/head}
python3 -c "import sys; from refgen.identity.head import check_start_head; check_start_head(sys.argv[1], 'tokens', 3)" $H \
  || { echo "$H is not a slot_repeat 3 head: copy .carry/heads/w_bf16 into it first"; exit 1; }
timeout $LIM python3 bench/toyworld_invert_sweep.py --out $R/t --n-test 48 --n-pairs 24 --short-steps 50,150 \
  --start-head $H --variant '{"image_prompts": true, "slot_repeat": 3, "steps": 600, "start_weight": 1.0}' > $R/t.log 2>&1
echo "rc=$?"; cp $R/t/v0/benchmark.json $OUT/test48_from_${RUN:-w}.json 2>/dev/null
tail -c 4000 $R/t.log | tr '\r' '\n' | grep -vE "Loading|it/s" | tail -n 16
