#!/usr/bin/env bash
# Device call (nvidia-h200, one call, ~9 min; carry [".site", "bench/device"]).
# Issue 16, item 5 at full size (random weights): the wide-slot token-inversion step (slot_repeat 3, the toy
# world's default) beside the 3-token rows of docs/results/identity_bench_fullsize_tokens/full_tok.json, then the
# render section for its `refgen_1_id_guidance` row (a third CFG row), cut at the call's limit: rows are printed as
# they are measured, so the log keeps what was reached.
. bench/device/site.sh || exit
R=$PWD/.carry/run21; mkdir -p $R; OUT=${OUT:-$R/out}; mkdir -p $OUT; LIM=${LIM:-560}; T0=$(date +%s)
timeout 240 python3 bench/identity_bench.py --section invert --parts eager --parametrisation tokens --slot-repeat 3 \
  --out $OUT/full_tok_wide.json > $OUT/full_tok_wide.log 2>&1; echo "invert rc=$?"
grep "^|" $OUT/full_tok_wide.log
timeout $((LIM - $(date +%s) + T0)) python3 bench/identity_bench.py --section render --out $OUT/render.json \
  > $OUT/render.log 2>&1; echo "render rc=$?"
grep "^|" $OUT/render.log
