#!/usr/bin/env bash
# Line (and branch) coverage of the MoE code against the acceptance gates, a measurement run by hand (pytest-cov is
# not part of the README's CI test command).
#
#   bash bench/moe_coverage.sh                    # wp2 (issue 21, B10): compression + evaluation >= 85 %, over tests/moe
#   bash bench/moe_coverage.sh wp2 tests          # the same over the whole suite (about 8 min)
#   bash bench/moe_coverage.sh wp1                # issue 20, A7: graph >= 90 %, RL env (routing) >= 90 %, monitor
#                                                 #   >= 85 %, over the WP1 tests only, and their wall time (<= 10 min)
#   OUT=/tmp/cov bash bench/moe_coverage.sh ...   # where the data and coverage.json go (default: a temp dir)
#
# wp2 modules (the code the two commands run; a module both use is counted once in the total):
#   compression = `refgen moe compress`: compress, qat, prune, lowrank, finetune, int4, and what it calls to write
#                 and check every variant: export, manifest, onnxrun, plots (accuracy_vs_size)
#   evaluation  = `refgen moe eval`: evaluate, calibration, pareto, corruptions, plots, and onnxrun / manifest /
#                 export (loading and verifying the setups)
#   Not counted: refgen/moe/cli.py (every moe command's argument parsing, not just these two).
# wp1 tests = tests/moe minus the WP2 files (issue 21: compress, export, evaluate/calibration/pareto, serve and its
# load test, robustness augmentation, the CUDA-graph / per-joule bench), listed in WP2_TESTS below.
# Prints pytest-cov's term-missing table (statements + branches), then per module and per gated group the LINE
# coverage (covered statements / statements) and the branch coverage; exits 2 if a group is below its gate.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-wp2}
shift $(( $# > 0 ? 1 : 0 ))
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
case $MODE in
  wp2)
    COMP="compress qat prune lowrank finetune int4 export manifest onnxrun plots"
    EVAL="evaluate calibration pareto corruptions plots onnxrun manifest export"
    MODS=$(echo $COMP $EVAL | tr ' ' '\n' | sort -u | tr '\n' ' ')
    # name:gate:modules (gate 0 = reported, not gated)
    GROUPS_="compression:0:${COMP// /,};evaluation:0:${EVAL// /,};total:85:$(echo $MODS | tr ' ' ,)"
    TESTS=("${@:-tests/moe}") ;;
  wp1)
    MODS="graph routing monitor"
    GROUPS_="graph:90:graph;routing:90:routing;monitor:85:monitor"
    WP2_TESTS="test_augment test_bench_cuda_graph test_compress test_compress_eval_failures test_evaluate
               test_export test_serve test_serve_load"
    TESTS=()
    for f in tests/moe/test_*.py; do
        case " $(echo $WP2_TESTS) " in *" $(basename "$f" .py) "*) ;; *) TESTS+=("$f") ;; esac
    done
    echo "WP1 tests: ${TESTS[*]}" ;;
  *) echo "usage: bash bench/moe_coverage.sh [wp2 [pytest paths...] | wp1]" >&2; exit 64 ;;
esac
ARGS=()
for m in $MODS; do ARGS+=("--cov=refgen.moe.$m"); done
START=$(date +%s)
# the tests' own pass/fail does not stop the report (a failing test elsewhere still leaves coverage data)
COVERAGE_FILE="$OUT/.coverage" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} python3 -m pytest "${TESTS[@]}" -q \
    -p no:cacheprovider --cov-branch "${ARGS[@]}" --cov-report=term-missing --cov-report="json:$OUT/coverage.json" \
    || echo "(pytest exit $? — coverage below is still measured over the tests that ran)"
echo "$MODE tests + coverage: $(( $(date +%s) - START )) s; data in $OUT"
GROUPS_="$GROUPS_" python3 - "$OUT/coverage.json" <<'EOF'
import json, os, sys

files = json.load(open(sys.argv[1]))["files"]
by_mod = {os.path.basename(k)[:-3]: v["summary"] for k, v in files.items()}


def total(mods):
    s = [by_mod[m] for m in mods]
    st, cov = sum(x["num_statements"] for x in s), sum(x["covered_lines"] for x in s)
    br, cbr = sum(x["num_branches"] for x in s), sum(x["covered_branches"] for x in s)
    return st, cov, br, cbr


def row(name, mods, gate=0):
    st, cov, br, cbr = total(mods)
    line = 100 * cov / st
    verdict = "" if not gate else f"  gate {gate} %: {'ok' if line >= gate else 'BELOW'}"
    print(f"{name:<14}{st:>7}{st - cov:>6}{line:>7.1f}%{br:>10}{100 * cbr / max(br, 1):>7.1f}%{verdict}")
    return line >= gate


print(f"\n{'module':<14}{'stmts':>7}{'miss':>6}{'lines':>8}{'branches':>10}{'br cov':>8}")
for m in sorted(by_mod):
    row(m, [m])
print()
ok = True
for g in os.environ["GROUPS_"].split(";"):
    name, gate, mods = g.split(":")
    ok &= row(name, mods.split(","), int(gate))
sys.exit(0 if ok else 2)
EOF
