#!/usr/bin/env bash
# Device call (nvidia-h200-x2: one call, ~9.5 min; on one H200: one call per arm, ONLY=r5000p24k for the second).
# carry: [".site", "bench/device"]. Resumable: a cut run continues from its last checkpoint when repeated while warm.
# Issue 17, two people: `slot_roles` over 3,000 pair steps from `s2` gave 60.4 % both right (46.9 % without, one
# person kept at 81.3 %; docs/head.md), the pair loss still falling. 5,000 more steps at 50 % two-person steps from
# that head (its committed bf16 copy): GPU0 on the same 8,000 rendered training pairs (each pair was already seen
# ~96 times), GPU1 on 24,000 (fresher pairs). 5,000 steps at ~11 steps/s fit one call with scoring.
. bench/device/site.sh || exit  # diffusers + webdataset (carry .site, made by bench/device/pack_site.sh)
R=$PWD/.carry/run15; mkdir -p $R; OUT=${OUT:-$R/out}; mkdir -p $OUT; LIM=${LIM:-560}
for np in 8000 24000; do
  printf 'refs_max: 4\ninit_head: %s\ntwo_person_fraction: 0.5\ntwo_person_images: %s\nslot_roles: true\ncheckpoint_every: 500\neval_every: 1000\n' \
    "$PWD/src/refgen/assets/toyworld/head" $np > $R/q$np.yaml
done
run() {  # name gpu steps pairs
  [ -f $R/$1/result.json ] && return 0
  CUDA_VISIBLE_DEVICES=$2 timeout $LIM python3 bench/toyworld_head_e2e.py --out $R/$1 --n-train 1200 --n-test 192 \
    --n-val 96 --n-pairs 48 --head resampler --batch-size 256 --steps $3 --lr 1e-3 --alphas 0.8,1,1.4 \
    --config $R/q$4.yaml >> $R/$1.log 2>&1
  echo "$1 rc=$?" >> $R/$1.log
}
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  run r5000p8k 0 5000 8000 & run r5000p24k 1 5000 24000 & wait
else
  case ${ONLY:-r5000p8k} in r5000p24k) run r5000p24k 0 5000 24000;; *) run r5000p8k 0 5000 8000;; esac
fi
for n in r5000p8k r5000p24k; do  # at most 8 files come back per call
  cp $R/$n/result.json $OUT/$n.json 2>/dev/null; gzip -c $R/$n/head/metrics.jsonl > $OUT/$n.metrics.jsonl.gz 2>/dev/null
  [ -f $R/$n/result.json ] && cp $R/$n/head/head.safetensors $OUT/$n.head.safetensors && cp $R/$n/head/head.json $OUT/$n.head.json
  [ -f $R/$n.log ] && tail -c 3000 $R/$n.log | tr '\r' '\n' | grep -E "alpha|two people|rc=|ceiling|timings" | tail -n 9
done
