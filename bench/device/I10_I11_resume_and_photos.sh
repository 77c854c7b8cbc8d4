#!/usr/bin/env bash
# Device call (nvidia-h200-x2), repeated until done: GPU0 resumes I10 arm a (head from scratch + id_weight 0.2);
# GPU1 runs I11 (teacher with exactly 3 / 10 / 20 photos, 20 at 3,000 steps; tuning people 500000-500023).
# Finished pieces are skipped; cut ones resume (head checkpoints, per-identity inversion checkpoints).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=/tmp/site:$PWD/src
R=$PWD/.carry/run8; mkdir -p $R
git log -1 --format=%H > $OUT/commit.txt 2>/dev/null
LIM=${LIM:-570}
one() {  # name gpu photos variant
  [ -f $R/$1/sweep.json ] && return 0
  CUDA_VISIBLE_DEVICES=$2 python3 bench/toyworld_invert_sweep.py --out $R/$1 --test-seed 500000 --n-test 24 \
    --n-pairs 12 --photos $3 --variant "$4" >> $R/$1.txt 2>&1
  echo "$1 rc=$?" >> $R/$1.txt
}
( [ -f $R/a/result.json ] || { CUDA_VISIBLE_DEVICES=0 python3 bench/toyworld_head_e2e.py --out $R/a --n-train 1200 \
    --n-test 192 --n-val 96 --n-pairs 48 --head resampler --batch-size 256 --steps 3000 --lr 2e-3 \
    --alphas 0.8,1,1.4 --config $R/a.yaml >> $R/a.log 2>&1; echo "a rc=$?" >> $R/a.log; } ) &
( one k3 1 3 '{"image_prompts": true}'; one k10 1 10 '{"image_prompts": true}'
  one k20 1 20 '{"image_prompts": true}'; one k20s3000 1 20 '{"image_prompts": true, "steps": 3000}' ) &
sleep $LIM; pkill -f toyworld_head_e2e; pkill -f toyworld_invert_sweep; sleep 3
mkdir -p $OUT/a; cp $R/a.log $R/a/result.json $R/a/head/head.json $OUT/a/ 2>/dev/null
[ -f $R/a/result.json ] && { cp $R/a/head/head.safetensors $OUT/a/; gzip -c $R/a/head/metrics.jsonl > $OUT/a/metrics.jsonl.gz; }
for n in k3 k10 k20 k20s3000; do cp $R/$n/sweep.json $OUT/$n.json 2>/dev/null; cp $R/$n.txt $OUT/ 2>/dev/null; done
tail -c 600 $R/a.log | tr '\r' '\n' | tail -n 3
for n in k3 k10 k20 k20s3000; do grep -v -i warn $R/$n.txt 2>/dev/null | tail -n 4; done
