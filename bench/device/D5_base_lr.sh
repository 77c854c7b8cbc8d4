#!/usr/bin/env bash
# Device call (nvidia-h200-x2, one call, ~9.5 min). carry: [".site", "bench/device"]
# Issue 22 follow-up (docs/dit.md, "Next"): is the base model's ~75 % caption plateau the learning rate, and is it
# binding (the scorings split one- and two-person images)? The base yardstick at lr 3e-4 (GPU0) and 6e-4 (GPU1)
# against the committed 1e-4 curve, each cut at 540 s (scorings are kept after every eval).
. bench/device/site.sh || exit  # diffusers + webdataset (carry .site, made by bench/device/pack_site.sh)
R=$PWD/.carry/run_d5; mkdir -p $R; OUT=${OUT:-$R/out}; mkdir -p $OUT
for x in "0 3e-4 lr3" "1 6e-4 lr6"; do
  set -- $x
  CUDA_VISIBLE_DEVICES=$1 timeout 540 python3 bench/dit_yardstick.py --config configs/dit_yardstick_base.yaml \
    --compile --n-train 30000 --steps 20000 --lr $2 --out $R/$3 > $R/$3.log 2>&1 &
done
wait
git log -1 --format=%H > $OUT/commit.txt 2>/dev/null
for n in lr3 lr6; do  # at most 8 files come back per call
  cp $R/$n/yardstick.json $OUT/$n.json 2>/dev/null; cp $R/$n/yardstick.png $OUT/$n.png 2>/dev/null
  tail -c 1500 $R/$n.log | tr '\r' '\n' | grep -v "^$" | tail -n 6
done
