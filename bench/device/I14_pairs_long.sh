#!/usr/bin/env bash
# Starts from docs/results/head_e2e_idloss/s2_head_bf16, no longer in the tree: first `git checkout 80e51ce -- docs/results/head_e2e_idloss/s2_head_bf16`.
# Device call (nvidia-h200-x2, one call, ~9.5 min; on one H200: two calls, ONLY=s2p6000f5 for the second; resumable: a cut run continues from its last checkpoint when the
# call is repeated while the machine is warm). carry: [".whl", "bench/device"]
# Issue 17, two people: pairs grew with the number of pair steps from `s2` (300 / 500 / 1,000 pair steps: 9 / 19-21 /
# 36-37 %, docs/head.md) with no plateau in sight. 6,000 steps from `s2` at 50 % two-person steps (3,000 pair steps):
# GPU0 as before (joint encoding), GPU1 with `slot_roles` (a learnt offset for the first / second slot: the CPU probe
# in docs/head.md found that a person's token window carries almost nothing of "on the left / right").
# Each run alone on its GPU: ~70 ms/step at batch 256 (I13), so ~420 s of steps + ~90 s of cache and scoring.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=/tmp/site:$PWD/src
R=$PWD/.carry/run14; mkdir -p $R; OUT=${OUT:-$R/out}; mkdir -p $OUT; LIM=${LIM:-560}
for roles in false true; do
  printf 'refs_max: 4\ninit_head: %s\ntwo_person_fraction: 0.5\ntwo_person_images: 8000\nslot_roles: %s\ncheckpoint_every: 500\neval_every: 1000\n' \
    "$PWD/docs/results/head_e2e_idloss/s2_head_bf16" $roles > $R/q$roles.yaml
done
run() {  # name gpu steps roles
  [ -f $R/$1/result.json ] && return 0
  CUDA_VISIBLE_DEVICES=$2 timeout $LIM python3 bench/toyworld_head_e2e.py --out $R/$1 --n-train 1200 --n-test 192 \
    --n-val 96 --n-pairs 48 --head resampler --batch-size 256 --steps $3 --lr 1e-3 --alphas 0.8,1,1.4 \
    --config $R/q$4.yaml >> $R/$1.log 2>&1
  echo "$1 rc=$?" >> $R/$1.log
}
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  run s2p6000f5 0 6000 false & run s2p6000f5roles 1 6000 true & wait
else  # one GPU (x2 not lent): one arm per call, roles first; ONLY=s2p6000f5 for the control
  case ${ONLY:-s2p6000f5roles} in s2p6000f5) run s2p6000f5 0 6000 false;; *) run s2p6000f5roles 0 6000 true;; esac
fi
for n in s2p6000f5 s2p6000f5roles; do  # at most 8 files come back per call
  cp $R/$n/result.json $OUT/$n.json 2>/dev/null; gzip -c $R/$n/head/metrics.jsonl > $OUT/$n.metrics.jsonl.gz 2>/dev/null
  tail -c 3000 $R/$n.log | tr '\r' '\n' | grep -E "alpha|two people|rc=|ceiling|timings" | tail -n 9
done
