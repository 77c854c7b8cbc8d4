#!/usr/bin/env bash
# Starts from docs/results/head_e2e_idloss/s2_head_bf16, no longer in the tree: first `git checkout 80e51ce -- docs/results/head_e2e_idloss/s2_head_bf16`.
# Device call (nvidia-h200-x2, one call, ~6 min). carry: [".whl", "bench/device"]
# Issue 17, two people: the I12 recipe (two-person steps from the `s2` head, 50 % of the steps, lr 1e-3) with
# `isolate_slots: true`: each person reaches only its own segment of the prompt in training and in scoring, so the
# second person's words never read the first person's tokens. GPU0: 1,000 steps (the joint control is I12's
# `s2p1000f5`: 20.8 % both right); GPU1: 2,000 steps. Same 1,200 training, 192 test, 96 validation people, 48 pairs.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=/tmp/site:$PWD/src
R=$PWD/.carry/run13; mkdir -p $R; OUT=${OUT:-$R/out}; mkdir -p $OUT; LIM=${LIM:-540}
printf 'refs_max: 4\ninit_head: %s\ntwo_person_fraction: 0.5\ntwo_person_images: 8000\nisolate_slots: true\ncheckpoint_every: 250\neval_every: 250\n' \
  "$PWD/docs/results/head_e2e_idloss/s2_head_bf16" > $R/iso.yaml
run() {  # name gpu steps
  [ -f $R/$1/result.json ] && return 0
  CUDA_VISIBLE_DEVICES=$2 timeout $LIM python3 bench/toyworld_head_e2e.py --out $R/$1 --n-train 1200 --n-test 192 \
    --n-val 96 --n-pairs 48 --head resampler --batch-size 256 --steps $3 --lr 1e-3 --alphas 0.8,1,1.4 \
    --config $R/iso.yaml >> $R/$1.log 2>&1
  echo "$1 rc=$?" >> $R/$1.log
}
run iso1000f5 0 1000 & run iso2000f5 1 2000 & wait
for n in iso1000f5 iso2000f5; do  # at most 8 files come back per call
  cp $R/$n/result.json $OUT/$n.json 2>/dev/null; gzip -c $R/$n/head/metrics.jsonl > $OUT/$n.metrics.jsonl.gz 2>/dev/null
  tail -c 3000 $R/$n.log | tr '\r' '\n' | grep -E "alpha|two people|rc=|ceiling|timings" | tail -n 9
done
