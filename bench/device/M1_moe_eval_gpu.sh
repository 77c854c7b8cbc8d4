#!/usr/bin/env bash
# Device call (nvidia-h200, one GPU, ~3 min). carry: [".whl_moe"] = jsonschema and pymoo with their wheels: referencing,
# jsonschema-specifications, rpds-py, attrs, moocore, cffi, pycparser, platformdirs, autograd, cma, alive-progress,
# about-time, graphemeu, Deprecated, wrapt (no diffusers needed; `python3 -m pip download --no-deps` as the device
# README says, for Python 3.12; the H200 image lacks cffi and platformdirs, which pymoo's hypervolume imports).
# Issue 21, B6 through `refgen moe eval` itself: a ToyWorld-27 graph-MoE (seed 17) trained on the GPU, exported by
# the eval's own stage, evaluated clean + 7 corruptions at severity 3 with --device cuda: batch-1 latency on the
# H200 and NVML energy windows per PyTorch setup -> accuracy/ms there and accuracy %/J, beside the CPU latency.
# MOE_SMOKE=1: the same flow on the CPU with the digits set (seconds; energy off).
set -u
if [ -z "${MOE_SMOKE:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_moe/*.whl || exit
  export PYTHONPATH=/tmp/site:$PWD/src
  CFG=configs/moe_toyworld27.yaml DEV=cuda EXTRA=""
else
  CFG=configs/moe_digits.yaml DEV=cpu EXTRA="--no-energy --energy-seconds 5"
fi
R=$PWD/.carry/runm; mkdir -p $R; OUT=${OUT:-$R/out}; mkdir -p $OUT
t0=$(date +%s)
[ -f $R/m_s17/moe.json ] || python3 -m refgen.cli moe train --config $CFG --out $R/m_s17 --seed 17 --device $DEV \
  --quiet > $R/train.log 2>&1 || { tail -n 20 $R/train.log; exit 1; }
echo "train: $(( $(date +%s) - t0 )) s"
cat > $R/eval.yaml <<YAML
setups:
  - {name: float, method: graph-moe, path: $R/m_s17}
  - {name: int8, method: graph-moe, path: $R/m_export}
exports:
  - {model: $R/m_s17, out: $R/m_export, config: configs/moe_export.yaml}
seeds: [17]
severities: [3]
latency_iters: 1000
YAML
python3 -m refgen.cli moe eval --config $R/eval.yaml --out $R/eval --device $DEV $EXTRA --quiet > $R/eval.log 2>&1 \
  || { tail -n 30 $R/eval.log; exit 1; }
echo "total: $(( $(date +%s) - t0 )) s"
cp $R/eval/eval_matrix.md $R/eval/eval.json $R/eval.log $OUT/; cp $R/m_s17/moe.json $OUT/train_moe.json
gzip -c $R/eval/eval_raw.jsonl > $OUT/eval_raw.jsonl.gz; nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/gpu.txt 2>/dev/null
git log -1 --format=%H > $OUT/commit.txt 2>/dev/null
cat $R/eval/eval_matrix.md
