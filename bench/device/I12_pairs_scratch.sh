#!/usr/bin/env bash
# Device calls (nvidia-h200 or -x2), ~25 GPU-minutes: run it three times back to back (LIM seconds each, default 570);
# each call resumes the head from its last checkpoint (every 200 steps) on the still-warm machine.
# carry: [".site", "bench/device"]  (.site = diffusers + webdataset + braceexpand + importlib_metadata, Python 3.12)
# Issue 17, two people: the recipe of the best one-person head (`s2` in docs/head.md: from scratch, 1,200 people,
# resampler, 3,000 steps x 256, lr 2e-3, refs_max 4, id_weight 0.2) with 30 % two-person steps (8,000 rendered pairs,
# each slot its own person's head output, and `slot_roles` since I14), scored on 192 test / 96 validation people and 48 test pairs.
. bench/device/site.sh || exit  # diffusers + webdataset (carry .site, made by bench/device/pack_site.sh)
R=$PWD/.carry/run12; mkdir -p $R; OUT=${OUT:-$R/out}; mkdir -p $OUT; LIM=${LIM:-570}; GPU=${GPU:-0}
printf 'refs_max: 4\nid_weight: 0.2\ncheckpoint_every: 200\neval_every: 500\ntwo_person_fraction: 0.3\ntwo_person_images: 8000\nslot_roles: true\n' > $R/p.yaml
if [ ! -f $R/p/result.json ]; then
  CUDA_VISIBLE_DEVICES=$GPU timeout $LIM python3 bench/toyworld_head_e2e.py --out $R/p --n-train 1200 --n-test 192 \
    --n-val 96 --n-pairs 48 --head resampler --batch-size 256 --steps 3000 --lr 2e-3 --alphas 0.8,1,1.4 \
    --config $R/p.yaml >> $R/p.log 2>&1
  echo "rc=$?" >> $R/p.log
fi
git log -1 --format=%H > $OUT/commit.txt 2>/dev/null
tail -c 2000 $R/p.log | tr '\r' '\n' | grep -v "^$" | tail -n 14
# at most 8 files come back per call: only the ones that matter
if [ -f $R/p/result.json ]; then
  cp $R/p/result.json $OUT/; cp $R/p/head/head.json $OUT/head.json
  gzip -c $R/p/head/metrics.jsonl > $OUT/metrics.jsonl.gz; tar czf $OUT/log.tgz -C $R p.log
fi
