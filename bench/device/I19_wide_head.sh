#!/usr/bin/env bash
# Device calls (nvidia-h200, two or three calls back to back, ~9 min each; carry [".site", "bench/device"]).
# Resumable: a cut stage continues from its last checkpoint when the call is repeated while the machine is warm.
# Issues 16/17: wide slots (slot_repeat 3, `~ID~` = the placeholder's ids three times) lifted the teacher from 63.7 to
# 84.2 % on tuning people (docs/benchmarks.md, "Wider slots"). Does the head gain too? The two stages of the shipped
# head's recipe at that width (docs/head.md): stage w = `s2` from scratch (1,200 people, resampler, 3,000 x 256, lr
# 2e-3, refs_max 4, ID loss 0.2); stage wp = from w, 3,000 steps at 50 % two-person steps with slot_roles on 8,000
# rendered pairs, lr 1e-3 (I14's roles arm). Each scored on 192 test / 96 validation people and 48 test pairs.
# W_HEAD=folder: stage w was trained in an earlier session; start wp from that head instead. A device call sends
# the working tree (64 MiB with what it carries), which has no room for a second head beside the shipped one: put
# the kept copy in the shipped head's place for the call, and restore it after (bench/device/ORDER.md):
#   cp .carry/heads/w_bf16/head.* src/refgen/assets/toyworld/head/      (then, after the call)
#   git checkout -- src/refgen/assets/toyworld/head
# GS="0.5": wp is also scored with identity guidance G (the value chosen on validation for the shipped head).
# Since the fourteenth session the shipped head IS wp (slot_repeat 3): W_HEAD must then be w's copy, never the shipped
# head as it stands (the width check cannot tell w from wp).
. bench/device/site.sh || exit  # diffusers + webdataset (carry .site, made by bench/device/pack_site.sh)
R=$PWD/.carry/run19; mkdir -p $R; OUT=${OUT:-$R/out}; mkdir -p $OUT; LIM=${LIM:-560}; T0=$(date +%s)
W=${W_HEAD:+$PWD/$W_HEAD}; W=${W:-$R/w/head}
if [ -n "$W_HEAD" ]; then  # refuse a head of the wrong width (e.g. the shipped head left in place)
  python3 -c "import sys; from refgen.identity.head import check_start_head; check_start_head(sys.argv[1], 'tokens', 3)" $W \
    || { echo "W_HEAD $W is not a slot_repeat 3 head: copy .carry/heads/w_bf16 into it first"; exit 1; }
  mkdir -p $R/w; echo '{"from": "'$W_HEAD'"}' > $R/w/result.json
fi
printf 'slot_repeat: 3\nrefs_max: 4\nid_weight: 0.2\ncheckpoint_every: 200\neval_every: 1000\n' > $R/w.yaml
printf 'slot_repeat: 3\nrefs_max: 4\ninit_head: %s\ntwo_person_fraction: 0.5\ntwo_person_images: 8000\nslot_roles: true\ncheckpoint_every: 200\neval_every: 1000\n' \
  "$W" > $R/wp.yaml
run() {  # name lr
  [ -f $R/$1/result.json ] && return 0
  LEFT=$((LIM - $(date +%s) + T0)); [ $LEFT -gt 60 ] || return 1
  timeout $LEFT python3 bench/toyworld_head_e2e.py --out $R/$1 --n-train 1200 --n-test 192 --n-val 96 --n-pairs 48 \
    --head resampler --batch-size 256 --steps 3000 --lr $2 --alphas 0.8,1,1.4 --config $R/$1.yaml >> $R/$1.log 2>&1
  echo "$1 rc=$?" >> $R/$1.log
}
run w 2e-3 && run wp 1e-3
for g in ${GS:-}; do
  [ -f $R/wp/result.json ] && [ ! -f $R/wpg$g/result.json ] && timeout $((LIM - $(date +%s) + T0)) python3 \
    bench/toyworld_head_e2e.py --out $R/wpg$g --eval-head $R/wp/head --n-test 192 --n-val 96 --n-pairs 48 --alphas 1 \
    --id-guidance $g >> $R/wpg$g.log 2>&1
  cp $R/wpg$g/result.json $OUT/wpg$g.json 2>/dev/null
  tail -c 3000 $R/wpg$g.log | tr '\r' '\n' | grep -E "alpha|two people|rc=" | tail -n 6
done
for n in w wp; do  # at most 8 files come back per call
  [ -f $R/$n.log ] || continue
  tail -c 3000 $R/$n.log | tr '\r' '\n' | grep -E "alpha|two people|rc=|ceiling|timings|step" | tail -n 9
  [ -f $R/$n/head/head.json ] || continue
  cp $R/$n/result.json $OUT/$n.json; gzip -c $R/$n/head/metrics.jsonl > $OUT/$n.metrics.jsonl.gz
  cp $R/$n/head/head.safetensors $OUT/$n.head.safetensors; cp $R/$n/head/head.json $OUT/$n.head.json
done
