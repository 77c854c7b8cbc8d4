#!/usr/bin/env bash
# Device call (nvidia-h200-x2), run twice back to back: the second call resumes where the first was cut.
# GPU0: head from scratch, 1,200 people, the c1200 recipe + id_weight 0.2               (issue 17, one person)
# GPU1: same + 30 % two-person steps (8,000 pairs)                                          (issue 17, pairs)
# carry: [".whl", "bench/device"]
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=/tmp/site:$PWD/src
R=$PWD/.carry/run8; mkdir -p $R
git log -1 --format=%H > $OUT/commit.txt 2>/dev/null; nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/gpu.txt
printf 'refs_max: 4\nid_weight: 0.2\ncheckpoint_every: 200\neval_every: 500\n' > $R/a.yaml
printf 'refs_max: 4\nid_weight: 0.2\ncheckpoint_every: 200\neval_every: 500\ntwo_person_fraction: 0.3\ntwo_person_images: 8000\n' > $R/b.yaml
LIM=${LIM:-575}
run() {  # name gpu yaml
  CUDA_VISIBLE_DEVICES=$2 timeout $LIM python3 bench/toyworld_head_e2e.py --out $R/$1 --n-train 1200 --n-test 192 \
    --n-val 96 --n-pairs 48 --head resampler --batch-size 256 --steps 3000 --lr 2e-3 --alphas 0.8,1,1.4 \
    --config $3 >> $R/$1.log 2>&1
  echo "$1 rc=$?" >> $R/$1.log
}
[ -f $R/a/result.json ] || run a 0 $R/a.yaml &
[ -f $R/b/result.json ] || run b 1 $R/b.yaml &
wait
for n in a b; do
  mkdir -p $OUT/$n; cp $R/$n.log $OUT/$n/ 2>/dev/null
  cp $R/$n/result.json $OUT/$n/ 2>/dev/null
  cp $R/$n/head/head.json $R/$n/head/*.safetensors $OUT/$n/ 2>/dev/null
  gzip -c $R/$n/head/metrics.jsonl > $OUT/$n/metrics.jsonl.gz 2>/dev/null
  tail -c 1500 $R/$n.log | tr '\r' '\n' | tail -n 8
done
ls -la $R/a/head $R/b/head 2>/dev/null | head -30
